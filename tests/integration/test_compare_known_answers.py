"""`harness compare` on real runs whose counts are known answers (issue 16).

The paging guest's traced counts are fixed by its code and KVM's source
(harness/image/paging.py), so between two runs of it on one host only time
can move. Three real runs of tests/integration/suites/paging-ab.toml under
real KVM: two on the quiet host, one with a CPU hog pinned to the guest's
vCPU's CPU. The quiet pair must compare clean (exit 0); the hogged run must
be flagged on time figures only, with a warning that it ran on a busy host,
and none of the traced counts may move.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.results import load
from tests.conftest import host_difference_skip

pytestmark = pytest.mark.integration

SUITE = Path(__file__).parent / "suites" / "paging-ab.toml"
COUNT_PREFIXES = ("events.", "exits.", "mmu_faults.", "pf_error.", "cr_writes.", "path.",
                  "trace.")


def harness(*args: str | Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, check=False)


def run_once(out: Path) -> Path:
    before = set(out.glob("*.json"))
    proc = harness("run", SUITE, "--results-dir", out, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = set(out.glob("*.json")) - before
    return path


@pytest.fixture
def hog() -> Iterator[subprocess.Popen[bytes]]:
    """A busy loop pinned to CPU 1, where the suite pins the guest's vCPU."""
    if (os.cpu_count() or 1) < 2:
        host_difference_skip("needs two CPUs: the guest's and the hog's are pinned apart "
                             "from QEMU's")
    proc = subprocess.Popen(["taskset", "-c", "1", "sh", "-c", "while :; do :; done"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def quiet_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("quiet")
    return [run_once(out), run_once(out)]


def report(base: Path, cand: Path) -> tuple[int, dict[str, object]]:
    proc = harness("compare", base, cand, "--format", "json", timeout=120)
    assert proc.returncode in (0, 1, 2) and proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_the_same_suite_twice_on_a_quiet_host_exits_0(quiet_runs: list[Path]) -> None:
    status, rep = report(*quiet_runs)
    figures = rep["figures"]
    assert isinstance(figures, list)
    assert status == 0, [f"{f['figure']} {f['change']} q={f['q_fwer']}" for f in figures
                         if f["verdict"] != "no change"]
    assert rep["unfair"] == []
    counts = [f for f in figures if f["figure"].startswith(COUNT_PREFIXES)]
    assert counts and all(f["verdict"] == "no change" for f in counts)
    # The counts are the guest's known answers: identical on every boot, nothing to test.
    root = [f for f in counts if f["figure"] == "events.kvm_mmu_get_page"]
    assert root and all(f["change"] == 0.0 for f in root)


def test_a_cpu_hog_on_the_guests_cpu_moves_time_only_and_is_named(
    quiet_runs: list[Path], hog: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    hogged = run_once(tmp_path)
    hog.kill()
    load_seen = load(hogged).host_load
    assert load_seen is not None and load_seen.busy, load_seen
    status, rep = report(quiet_runs[0], hogged)
    assert status == 1, rep.get("counts")
    figures = rep["figures"]
    assert isinstance(figures, list)
    failing = [f for f in figures if f["gating"]]
    # Time figures: the phase's duration and the guest's rates derived from it.
    assert failing and all(f["figure"] == "duration_s" or f["figure"].endswith("_per_s")
                           for f in failing), failing
    assert any(f["figure"] == "duration_s" for f in failing)
    assert all(abs(f["change"]) > 0.2 for f in failing)  # half a CPU: much slower
    moved = [f["figure"] for f in figures
             if f["figure"].startswith(COUNT_PREFIXES) and f["verdict"] != "no change"]
    assert moved == [], moved
    warnings = rep["warnings"]
    assert isinstance(warnings, list)
    assert any(w.startswith("candidate:") and "busy host" in w for w in warnings), warnings
