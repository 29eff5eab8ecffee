"""`harness compare` end to end on two real runs of a short suite in the real TCG guest.

The runs are real (libvirtd, QEMU, SSH, bpftrace); the "regressed" and
"other image" candidates are copies made by this test from those runs, each
labelled synthetic in its notes, since this machine has only one kernel.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from harness.results import RunResult, load, write_atomic
from tests.integration.conftest import COMPARE_SHORT

pytestmark = pytest.mark.integration

SUITE = COMPARE_SHORT
# First-touch throughput (guest page faults): ~20% run-to-run noise (sd of logs) under TCG
# here; the retouch rate of 64 MiB, a few ms of work, ~30%.
SCALED_METRIC = "first_touch_mib_per_s"


@pytest.fixture
def two_runs(compare_short_runs: list[Path]) -> list[Path]:
    """Two real runs of SUITE (tests/integration/conftest.py: made once a session)."""
    return compare_short_runs


def harness_compare(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", "compare", *map(str, args)],
        capture_output=True, text=True, timeout=120, check=False,
    )


def synthetic_copy(src: Path, dest_dir: Path, note: str, change: object) -> Path:
    r: RunResult = load(src)
    r.run_id += "-synthetic"
    r.notes.append(f"synthetic, made by {Path(__file__).name}: {note}")
    change(r)  # type: ignore[operator]
    dest = dest_dir / f"{r.run_id}.json"
    write_atomic(r, dest)
    return dest


def side(paths: list[Path]) -> str:
    return ",".join(map(str, paths))


def test_a_run_set_against_itself_is_no_change(two_runs: list[Path]) -> None:
    proc = harness_compare(side(two_runs), side(two_runs), "--format", "md")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no regression; 0 improvements" in proc.stdout
    assert "nothing in the recorded provenance" in proc.stdout


def test_two_runs_on_one_host_have_nothing_changed(two_runs: list[Path]) -> None:
    """An A/A of two real runs (2 boots a side) exits 0. Its false-alarm chance is at most
    alpha by construction; alpha 0.01 keeps this test from failing 1 time in 20 by design."""
    proc = harness_compare(two_runs[0], two_runs[1], "--alpha", "0.01")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nothing in the recorded provenance" in proc.stdout
    assert "boots 2 vs 2" in proc.stdout


def boot_summaries(paths: list[Path], metric: str) -> list[float]:
    """Each boot's mean log value of ``metric`` (its measured repetitions), as compare uses."""
    by_boot: dict[str, list[float]] = {}
    for path in paths:
        r = load(path)
        for run in r.runs:
            for phase in run.phases:
                if metric in phase.metrics and not run.warmup:
                    by_boot.setdefault(f"{r.run_id}/{run.boot}", []).append(
                        math.log(phase.metrics[metric]))
    return [float(np.mean(v)) for v in by_boot.values()]


def detectable_scale(summaries: list[float], tested: int, alpha: float = 0.05) -> float:
    """A factor that compare's exit status must call a regression.

    The candidate is the base times ``c`` value by value, so both sides' boot
    summaries have the same spread ``s`` and n boots: t = |log c| / (s * sqrt(2/n))
    with df = 2(n - 1). The exit status uses Holm over ``tested`` figures, the
    others unchanged (p = 1), so this figure needs p < alpha / tested. The
    factor is 0.8 (-20%) where the noise allows it, else the one whose t is 1.5x
    the critical t, so the test's outcome is decided by the harness, never by
    this host's noise.
    """
    n = len(summaries)
    t_crit = float(sps.t.ppf(1 - alpha / tested / 2, df=2 * (n - 1)))
    needed = 1.5 * t_crit * float(np.std(summaries, ddof=1)) * math.sqrt(2 / n)
    return min(0.8, math.exp(-needed))


def test_throughput_down_is_a_named_regression(two_runs: list[Path], tmp_path: Path) -> None:
    summaries = boot_summaries(two_runs, SCALED_METRIC)
    assert len(summaries) == 4, summaries  # 2 boots x 2 runs, every one with its metric
    base_report = json.loads(
        harness_compare(side(two_runs), side(two_runs), "--format", "json").stdout)
    scale = detectable_scale(summaries, tested=base_report["tested"])

    def slower(r: RunResult) -> None:
        for run in r.runs:
            for phase in run.phases:
                if SCALED_METRIC in phase.metrics:
                    phase.metrics[SCALED_METRIC] *= scale

    cand = [synthetic_copy(p, tmp_path, f"metric {SCALED_METRIC} x {scale:.4f}", slower)
            for p in two_runs]
    proc = harness_compare(side(two_runs), side(cand), "--format", "md")
    assert proc.returncode == 1, f"scale {scale:.4f} of {summaries}\n" + proc.stdout + proc.stderr
    regressions = proc.stdout.split("#### Regressions")[1].split("####")[0]
    assert f"metric.{SCALED_METRIC}" in regressions
    assert f"{(scale - 1) * 100:+.1f}%" in regressions
    # Only that metric: the rest of the copy is identical.
    assert regressions.count("| page-touch") == 1


def test_another_guest_image_is_refused(two_runs: list[Path], tmp_path: Path) -> None:
    def other_image(r: RunResult) -> None:
        for vm in r.vms:
            vm.image_digest = "0" * 64
            vm.image_recipe = None

    cand = [synthetic_copy(two_runs[1], tmp_path, "guest image digest replaced", other_image)]
    proc = harness_compare(two_runs[0], cand[0])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "UNFAIR" in proc.stdout and "vm linux: image" in proc.stdout
    assert "guest image differs" in proc.stdout
    # Allowed, it is the A/A of two real runs above (only the digest differs): no change.
    allowed = harness_compare(two_runs[0], cand[0], "--allow-mismatch", "--alpha", "0.01")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
