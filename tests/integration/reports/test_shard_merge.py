"""Shards of a suite, merged, compare like the unsharded run: every phase matched once.

The paging guest's traced MMU counts are exact (test_paging_guest.py), so the
merged shards must also give the same counts as the unsharded run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.analysis.compare import compare
from harness.analysis.resultset import load_side
from harness.paths import SUITES_DIR
from harness.results import load
from tests.integration.reports.real_results import run_suite

pytestmark = pytest.mark.integration


def test_merged_shards_compare_like_the_unsharded_run(tmp_path: Path,
                                                      paging_result: Path) -> None:
    # The same tracer backend as the unsharded run: auto could pick another one if the
    # libbpf build changed in between, and compare would rightly call that unfair.
    backend = {v.trace.backend for v in load(paging_result).vms if v.trace}.pop() or "auto"
    shards = [run_suite(SUITES_DIR / "paging-kvm.toml", tmp_path / f"s{k}", "--shard", f"{k}/3",
                        "--tracer", backend)
              for k in (1, 2, 3)]
    runs = [r for s in shards for r in load(s).runs]
    whole = load(paging_result).runs
    key = lambda r: (r.workload, sorted(r.params.items()), r.repetition)  # noqa: E731
    assert sorted(map(key, runs)) == sorted(map(key, whole))  # each run once, none lost

    merged = compare(load_side("base", [paging_result]), load_side("candidate", shards))
    itself = compare(load_side("base", [paging_result]), load_side("candidate",
                                                                   [paging_result]))
    assert merged.unmatched_phases == [] and not merged.unfair
    assert {(f.phase.label(), f.figure) for f in merged.figures} == {
        (f.phase.label(), f.figure) for f in itself.figures
    }
    exact = [f for f in merged.figures if f.figure == "events.kvm_mmu_get_page"]
    assert exact and all(f.median_base == f.median_candidate for f in exact)
