"""Real result files for the report and history tests, made once per session.

Each fixture runs a real suite through `harness run` (real libvirtd, QEMU,
tracer): the micro KVM guest (seconds), the paging guest with stacks, a
short TCG suite, and a paging run SIGKILLed mid-way and then marked
killed by harness.results.mark_killed, as the next run would.
Import the fixtures into a test module to use them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.paths import SUITES_DIR
from harness.results import load, mark_killed

#: Where tests keep what a person may want to look at after a run (screenshots, reports).
ARTIFACTS = Path(os.environ.get("HARNESS_TEST_ARTIFACTS", "/tmp/harness-test-artifacts"))


def run_suite(suite: Path, results: Path, *extra: str) -> Path:
    """Run ``suite`` into ``results``; the path of its one result file."""
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(suite), "--results-dir", str(results),
         "--quiet", *extra],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = results.glob("*.json")
    return path


@pytest.fixture(scope="session")
def micro_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two runs of the micro KVM suite (a comparison's base and candidate)."""
    a = run_suite(SUITES_DIR / "micro-kvm.toml", tmp_path_factory.mktemp("micro-a"))
    b = run_suite(SUITES_DIR / "micro-kvm.toml", tmp_path_factory.mktemp("micro-b"))
    return a, b


@pytest.fixture(scope="session")
def paging_result(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The paging guest suite, with kernel stacks of its root lookups."""
    return run_suite(SUITES_DIR / "paging-kvm.toml", tmp_path_factory.mktemp("paging"))


@pytest.fixture(scope="session")
def tcg_result(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short TCG suite (the default suite's guest and page-touch, one boot, a warm-up)."""
    suite = Path(__file__).parent / "report-tcg.toml"
    return run_suite(suite, tmp_path_factory.mktemp("tcg"))


@pytest.fixture(scope="session")
def killed_result(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A paging run SIGKILLed after its first phases were saved, then marked killed."""
    results = tmp_path_factory.mktemp("killed")
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "run", str(SUITES_DIR / "paging-kvm.toml"),
         "--results-dir", str(results), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            files = list(results.glob("*.json"))
            if files and '"name": "touch-first"' in files[0].read_text():
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.1)
        else:
            pytest.fail("no phase was saved within 300 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (path,) = results.glob("*.json")
    assert load(path).status == "running"
    assert mark_killed(path, "the harness process was SIGKILLed (by the test)")
    return path
