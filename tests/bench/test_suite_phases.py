"""Every phase of the suite `tox -e bench` just ran, as a pytest-benchmark entry.

The harness measured the phases (per repetition, between its markers); this
module hands those durations to pytest-benchmark through a replay clock, so
``--benchmark-autosave`` stores them and ``pytest-benchmark compare`` works on
them like on any benchmark. Nothing is re-run and nothing is timed here.

Which result: ``HARNESS_BENCH_RESULT`` if set, else the newest complete
result in results/ (the one `harness run` wrote just before, in tox -e bench).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from harness.analysis.benchentries import BenchEntry, entries, newest_complete
from harness.paths import RESULTS_DIR
from harness.results import load


class ReplayClock:
    """A pytest-benchmark timer that returns recorded phase boundaries, two reads a round."""

    __name__ = "harness_replayed_phase_durations"

    def __init__(self, durations_s: tuple[float, ...]) -> None:
        self._reads: Iterator[float] = iter(
            t for d in durations_s for t in (0.0, d)  # start, end of each round
        )

    def __call__(self) -> float:
        return next(self._reads)


def _result_path() -> Path | None:
    given = os.environ.get("HARNESS_BENCH_RESULT")
    return Path(given) if given else newest_complete(RESULTS_DIR)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "entry" not in metafunc.fixturenames:
        return
    path = _result_path()
    if path is None:
        metafunc.parametrize("entry", [None], ids=["no-result"])
        return
    params = [
        pytest.param(
            e, id=e.id, marks=pytest.mark.benchmark(group=e.group, timer=ReplayClock(e.durations_s))
        )
        for e in entries(load(path))
    ]
    metafunc.parametrize("entry", params)


def test_phase(benchmark: BenchmarkFixture, entry: BenchEntry | None) -> None:
    """One phase: its recorded durations as rounds, its figures in extra_info."""
    assert entry is not None, (
        f"no complete result in {RESULTS_DIR} and HARNESS_BENCH_RESULT is unset "
        "(fix: run `harness run` first, as `tox -e bench` does)"
    )
    benchmark.extra_info.update(entry.extra_info)
    benchmark.pedantic(lambda: None, rounds=len(entry.durations_s), iterations=1)
    assert benchmark.stats is not None
    got = sorted(benchmark.stats.stats.data)
    assert got == pytest.approx(sorted(entry.durations_s)), "replayed rounds differ"
