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

pytestmark = pytest.mark.integration

SUITE = Path(__file__).parent / "suites" / "compare-short.toml"
# First-touch throughput (guest page faults): ~20% run-to-run noise (sd of logs) under TCG
# here; the retouch rate of 64 MiB, a few ms of work, ~30%.
SCALED_METRIC = "first_touch_mib_per_s"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("compare-runs")
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-m", "harness.cli", "run", str(SUITE), "--results-dir", str(out),
             "--quiet"],
            capture_output=True, text=True, timeout=600, check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    paths = sorted(out.glob("*.json"))
    assert len(paths) == 2
    return paths


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
    proc = harness_compare(two_runs[0], two_runs[1])
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # fair, whatever the noise
    assert "nothing in the recorded provenance" in proc.stdout


def metric_values(paths: list[Path], metric: str) -> list[float]:
    """Every repetition's value of ``metric`` in these result files."""
    return [phase.metrics[metric]
            for path in paths for run in load(path).runs for phase in run.phases
            if metric in phase.metrics]


def detectable_scale(values: list[float], tested: int, alpha: float = 0.05) -> float:
    """A factor that Welch's test on logs must call significant after BH over ``tested``.

    The candidate is the base times ``c`` value by value, so both sides' logs
    have the same spread ``s`` and n values: t = |log c| / (s * sqrt(2/n))
    with df = 2(n - 1). BH over ``tested`` figures, the others unchanged
    (p = 1), gives this figure q = tested * p. The factor is 0.8 (-20%)
    where the noise allows it, else the one whose t is 1.5x the critical t,
    so the test's outcome is decided by the harness, never by this host's noise.
    """
    logs = np.log(np.asarray(values))
    n = len(logs)
    t_crit = float(sps.t.ppf(1 - alpha / tested / 2, df=2 * (n - 1)))
    needed = 1.5 * t_crit * float(np.std(logs, ddof=1)) * math.sqrt(2 / n)
    return min(0.8, math.exp(-needed))


def test_throughput_down_is_a_named_regression(two_runs: list[Path], tmp_path: Path) -> None:
    values = metric_values(two_runs, SCALED_METRIC)
    assert len(values) == 16, values  # 8 repetitions x 2 runs, every one with its metric
    base_report = json.loads(
        harness_compare(side(two_runs), side(two_runs), "--format", "json").stdout)
    scale = detectable_scale(values, tested=base_report["tested"])

    def slower(r: RunResult) -> None:
        for run in r.runs:
            for phase in run.phases:
                if SCALED_METRIC in phase.metrics:
                    phase.metrics[SCALED_METRIC] *= scale

    cand = [synthetic_copy(p, tmp_path, f"metric {SCALED_METRIC} x {scale:.4f}", slower)
            for p in two_runs]
    proc = harness_compare(side(two_runs), side(cand), "--format", "md")
    assert proc.returncode == 1, f"scale {scale:.4f} of {values}\n" + proc.stdout + proc.stderr
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
    allowed = harness_compare(two_runs[0], cand[0], "--allow-mismatch")
    assert allowed.returncode in (0, 1)
