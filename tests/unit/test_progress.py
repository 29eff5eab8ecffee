"""The closing table of `harness run`: what it says for guests KVM never ran (TCG)."""

from __future__ import annotations

from rich.console import Console

from harness.progress import TCG_NOTE, summary_table
from harness.results import RunResult
from harness.trace.model import PhaseTrace
from tests.unit.synthetic_results import result


def traced(accelerator: str, exits: int = 0) -> RunResult:
    r = result("r1", 100.0, accelerator=accelerator)
    # What the tracer records for a phase in which no KVM event of this guest fired.
    r.runs[0].phases[0].trace = PhaseTrace(
        attribution="host-window", markers_seen=0, marker_ns=0,
        exits={"HLT": exits} if exits else {},
    )
    return r


def text(r: RunResult) -> str:
    console = Console(record=True, width=400)
    console.print(summary_table(r))
    return console.export_text()


def test_a_tcg_phase_says_no_kvm_events_instead_of_zero() -> None:
    out = text(traced("tcg"))
    row = next(line for line in out.splitlines() if "touch" in line and "vm1" in line)
    assert TCG_NOTE in row and row.count("n/a") == 4
    assert " 0 " not in row
    assert "ran under TCG" in out.splitlines()[-2] + out.splitlines()[-1]  # the caption


def test_a_kvm_phase_with_no_events_keeps_its_zeros() -> None:
    out = text(traced("kvm"))
    row = next(line for line in out.splitlines() if "touch" in line and "vm1" in line)
    assert "n/a" not in row and TCG_NOTE not in out
    assert "host-window" in row


def test_events_under_tcg_are_shown_as_counted() -> None:
    out = text(traced("tcg", exits=3))
    row = next(line for line in out.splitlines() if "touch" in line and "vm1" in line)
    assert "n/a" not in row and " 3 " in row


def test_boots_and_warm_ups_are_told_apart() -> None:
    r = traced("kvm")
    first = r.runs[0]
    first.boot, first.warmup = "vm1-b1", True
    second = first.model_copy(update={"boot": "vm1-b2", "warmup": False})
    r.runs.append(second)
    rows = [line for line in text(r).splitlines() if "touch" in line]
    assert "vm1-b1" in rows[0] and "1 (warm-up)" in rows[0]
    assert "vm1-b2" in rows[1] and "warm-up" not in rows[1]
