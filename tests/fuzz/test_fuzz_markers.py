"""Fuzz phase attribution with forged guest markers.

A guest knows its own marker token, so it can mark any phase number it likes, as often
as it likes, at any time (issue 17: "forges another run's phase markers"). Whatever it
marks, attribution must neither lose nor double-count an event: the phases (with phase
0, outside any phase) add up to the VM's unphased totals, and another VM's events never
count for this one.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from harness.trace.correlate import phase_traces, unphased_totals
from harness.trace.parse import snapshot_from_lines
from harness.trace.probes import probe_id
from harness.trace.program import TraceTarget

pytestmark = pytest.mark.timeout(120)

VM = TraceTarget("vm", 100, 1)
OTHER = 200
PROBES = [probe_id(n) for n in ("kvm_exit", "kvm_cpuid", "kvm_emulate_insn", "kvm_mmu_get_page")]
PHASE_NUMBERS = st.one_of(st.integers(0, 5), st.sampled_from([7, 255, 2**31 - 1, 2**32 - 1]))
EVENT = st.tuples(st.sampled_from([VM.pid, OTHER]), st.integers(1, 3), PHASE_NUMBERS,
                  PHASE_NUMBERS, st.sampled_from(PROBES))


def line(name: str, values: dict[tuple[int, ...], int]) -> str:
    data = {",".join(map(str, k)): v for k, v in values.items()}
    return json.dumps({"type": "map", "data": {f"@{name}": data}})


@settings(max_examples=200)
@given(
    st.dictionaries(EVENT, st.integers(1, 10**6), max_size=20),
    st.dictionaries(st.tuples(st.sampled_from([VM.pid, OTHER]), PHASE_NUMBERS),
                    st.integers(1, 5), max_size=6),
)
@example({(100, 1, 9, 9, PROBES[0]): 5, (200, 1, 1, 1, PROBES[0]): 7}, {(100, 9): 1})
def test_forged_markers_neither_lose_nor_double_count(
    evt: dict[tuple[int, int, int, int, int], int], markers: dict[tuple[int, int], int]
) -> None:
    snap = snapshot_from_lines([line("evt", dict(evt)), line("markers", dict(markers))])
    traces = phase_traces(snap, VM, [1, 2, 3])
    assert set(traces) == {0, 1, 2, 3}
    totals = unphased_totals(snap, VM)
    for probe, total in totals.items():
        assert sum(t.events_by_probe.get(probe, 0) for t in traces.values()) == total
    ours = sum(n for (pid, *_), n in evt.items() if pid == VM.pid)
    assert sum(t.events_total for t in traces.values()) == ours
