"""`harness compare` over 200 result files: its speed, and what its memory grows with.

The files are made here from one real, traced result (the micro-kvm suite run
under real KVM at the start of this module) with jittered values: 100 files a
side. Goals, read from the saved benchmark rather than asserted as timings:
the comparison of 200 files within 2 s on this machine (seen: 0.45 s); peak
memory that grows with phases and keys and not with the number of traced
events: every count x1000 gives x1.00, twice the phases x1.3 (the loaded
results, the report and SciPy's working memory are shared costs). The memory
ratios are asserted: they are not timings and do not flake.
"""

from __future__ import annotations

import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from harness.analysis.compare import ComparisonReport, compare
from harness.analysis.resultset import load_side
from harness.paths import SUITES_DIR
from harness.results import RunResult, load, write_atomic

pytestmark = pytest.mark.integration

FILES_PER_SIDE = 100


@pytest.fixture(scope="module")
def real_result(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """A real traced result: the micro-kvm suite under real KVM."""
    out = tmp_path_factory.mktemp("compare-real")
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(SUITES_DIR / "micro-kvm.toml"),
         "--results-dir", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("*.json")
    return load(path)


def jittered(real: RunResult, i: int, *, count_scale: int = 1, phase_copies: int = 1) -> RunResult:
    """A copy of ``real`` with every metric and count jittered by about 3% (seeded by ``i``)."""
    rng = np.random.default_rng(i)
    r = real.model_copy(deep=True)
    r.run_id = f"{real.run_id}-j{i:04d}"

    def j(x: float) -> float:
        return float(x * rng.lognormal(0.0, 0.03))

    for run in r.runs:
        copies = []
        for phase in run.phases:
            phase.metrics = {k: j(v) for k, v in phase.metrics.items()}
            if phase.duration_s is not None:
                phase.duration_s = j(phase.duration_s)
            if phase.trace is not None:
                t = phase.trace
                t.events_by_probe = {
                    k: round(j(v) * count_scale) for k, v in t.events_by_probe.items()
                }
                t.events_total = sum(t.events_by_probe.values())
                t.emulated_insns = t.events_by_probe.get("kvm_emulate_insn", 0)
            for n in range(1, phase_copies):
                copy = phase.model_copy(deep=True)
                copy.name = f"{phase.name}-copy{n}"
                copies.append(copy)
        run.phases.extend(copies)
    return r


def make_files(dir_: Path, real: RunResult, **kw: int) -> tuple[list[Path], list[Path]]:
    sides: tuple[list[Path], list[Path]] = ([], [])
    for i in range(2 * FILES_PER_SIDE):
        side = sides[i % 2]
        path = dir_ / f"{'base' if i % 2 == 0 else 'cand'}-{i:04d}.json"
        write_atomic(jittered(real, i, **kw), path)
        side.append(path)
    return sides


def run_compare(base: list[Path], cand: list[Path]) -> ComparisonReport:
    return compare(load_side("base", base), load_side("candidate", cand))


def peak_bytes(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.benchmark(group="compare")
def test_compare_200_files(
    benchmark: BenchmarkFixture, real_result: RunResult, tmp_path: Path
) -> None:
    for sub in ("plain", "events", "phases"):
        (tmp_path / sub).mkdir()
    base, cand = make_files(tmp_path / "plain", real_result)
    report = benchmark.pedantic(run_compare, args=(base, cand), rounds=3, iterations=1)
    assert report.exit_status in (0, 1)
    assert len(report.base.run_ids) == FILES_PER_SIDE
    assert report.tested > 0

    t0 = time.perf_counter()
    for p in base + cand:
        load(p)
    load_s = time.perf_counter() - t0

    more_events = make_files(tmp_path / "events", real_result, count_scale=1000)
    more_phases = make_files(tmp_path / "phases", real_result, phase_copies=2)
    plain_peak = peak_bytes(lambda: run_compare(base, cand))
    events_peak = peak_bytes(lambda: run_compare(*more_events))
    phases_peak = peak_bytes(lambda: run_compare(*more_phases))

    assert benchmark.stats is not None
    median_s = benchmark.stats.stats.median
    info = {
        "files": 2 * FILES_PER_SIDE,
        "figures": len(report.figures),
        "compare_s_median": median_s,
        "load_only_s": load_s,
        "compare_over_load": median_s / load_s,
        "peak_mib": plain_peak / 2**20,
        "peak_ratio_events_x1000": events_peak / plain_peak,
        "peak_ratio_phases_x2": phases_peak / plain_peak,
    }
    benchmark.extra_info.update(info)
    print("\n" + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in info.items()))
    # Aggregates, not events: a thousand times the events costs no memory.
    assert info["peak_ratio_events_x1000"] < 1.2
    assert 1.15 < info["peak_ratio_phases_x2"] < 2.6
