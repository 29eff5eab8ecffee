"""End to end through the real CLI: a TCG Linux guest via libvirtd, workloads over SSH,
the host tracer in its time-window fallback, a result that matches the schema."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from harness.image.linux import LinuxImage
from harness.paths import RESULTS_DIR, cache_dir
from tests.conftest import harness_domains, stray_tracers
from tests.integration.conftest import write_suite

pytestmark = pytest.mark.integration

SCHEMA = json.loads((RESULTS_DIR / "schema.json").read_text())

BOTH_WORKLOADS = """\
[[runs]]
workload = "stress-ng-vm"
vm = "linux"
params = { bytes = "64M", seconds = 2 }

[[runs]]
workload = "page-touch"
vm = "linux"
params = { mib = 64 }
"""


def harness(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", *args]


def run_harness(
    suite: Path, results: Path, *extra: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`harness run SUITE` to completion, through the real CLI."""
    return subprocess.run(
        harness("run", str(suite), "--results-dir", str(results), *extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_harness(suite: Path, results: Path) -> subprocess.Popen[str]:
    """`harness run SUITE --quiet` in the background, for tests that interrupt it."""
    return subprocess.Popen(
        harness("run", str(suite), "--results-dir", str(results), "--quiet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def only_result(results: Path) -> dict[str, Any]:
    files = sorted(results.glob("*.json"))
    assert len(files) == 1, files
    data: dict[str, Any] = json.loads(files[0].read_text())
    jsonschema.validate(data, SCHEMA)
    return data


def assert_cleaned_up(run_id: str) -> None:
    assert not [d for d in harness_domains() if run_id in d]
    assert not (cache_dir() / "runs" / run_id).exists(), "run directory (overlay) left behind"
    # bpftrace's program lives in the run directory, so its command line names the run.
    assert not [t for t in stray_tracers() if run_id in t], "bpftrace outlived the run"


def test_both_workloads_end_to_end(tmp_path: Path, linux_image: LinuxImage) -> None:
    suite = write_suite(tmp_path, BOTH_WORKLOADS)
    results = tmp_path / "results"
    proc = run_harness(suite, results, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "result: " in proc.stdout
    data = only_result(results)
    assert data["status"] == "complete"
    assert data["host"]["kernel_release"] == os.uname().release
    (vm,) = data["vms"]
    assert vm["image_digest"] == linux_image.digest
    assert vm["image_packages"]["kernel"] == linux_image.kernel_release
    assert vm["accelerator"] in ("tcg", "kvm") and vm["accelerator_reason"]
    assert 0 < vm["boot_to_ready_s"] < 90
    assert vm["trace"]["tracer_status"] == "ok", vm["trace"]
    runs = {r["workload"]: r for r in data["runs"]}
    assert set(runs) == {"stress-ng-vm", "page-touch"}

    stress = runs["stress-ng-vm"]["phases"][0]
    assert stress["status"] == "ok" and stress["exit_status"] == 0
    assert stress["metrics"]["bogo_ops"] > 0 and stress["metrics"]["bogo_ops_per_s"] > 0
    assert stress["duration_s"] >= 2.0  # stress-ng ran for its 2 s timeout
    touch = runs["page-touch"]["phases"][0]
    assert touch["metrics"]["first_touch_mib_per_s"] > 0
    assert touch["metrics"]["retouch_mib_per_s"] > 0

    # Phases are ordered in time and do not overlap.
    phases = [p for r in data["runs"] for p in r["phases"]]
    for earlier, later in itertools.pairwise(phases):
        assert earlier["end_ns"] <= later["start_ns"]
    for p in phases:
        assert p["start_ns"] < p["end_ns"]
        # Under TCG no cpuid reaches KVM: attribution falls back to host markers, and says so.
        if vm["accelerator"] == "tcg":
            assert p["trace"]["attribution"] == "host-window"
            assert p["trace"]["markers_seen"] == 0
    assert_cleaned_up(data["run_id"])
    console = Path(vm["console_log"])
    assert console.parent == results
    assert console.exists()


def test_failing_workload_is_recorded_not_retried(tmp_path: Path, linux_image: LinuxImage) -> None:
    # 64 GiB (the parameter's maximum) cannot be mapped in a 768 MiB guest: page-touch fails.
    suite = write_suite(
        tmp_path,
        """\
[[runs]]
workload = "page-touch"
vm = "linux"
params = { mib = 65536 }
""",
        trace=False,
    )
    results = tmp_path / "results"
    proc = run_harness(suite, results, "--quiet", timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    data = only_result(results)
    assert data["status"] == "failed"
    (phase,) = data["runs"][0]["phases"]
    assert phase["status"] == "failed" and phase["exit_status"] != 0
    assert phase["stderr_tail"] or phase["stdout_tail"]
    assert data["vms"][0]["trace"]["tracer_status"] == "disabled"
    assert_cleaned_up(data["run_id"])


#: No warm-up runs: the tests below find "the second workload" as the second run.
PAGE_TOUCH_THEN_LONG_STRESS = """\
[[runs]]
workload = "page-touch"
vm = "linux"
params = { mib = 32 }
warmup = 0

[[runs]]
workload = "stress-ng-vm"
vm = "linux"
params = { bytes = "64M", seconds = 120 }
warmup = 0
"""


def start_until_second_workload(
    tmp_path: Path,
) -> tuple[subprocess.Popen[str], Path, str]:
    """Start `harness run`, return once page-touch is done and the 120 s stress-ng runs."""
    suite = write_suite(tmp_path, PAGE_TOUCH_THEN_LONG_STRESS)
    results = tmp_path / "results"
    proc = start_harness(suite, results)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            files = list(results.glob("*.json"))
            if files:
                data = json.loads(files[0].read_text())
                if len(data["runs"]) == 2:  # page-touch done, stress-ng started
                    time.sleep(2)  # well inside the 120 s stress-ng phase
                    run_id: str = data["run_id"]
                    assert [d for d in harness_domains() if run_id in d], "VM should run now"
                    return proc, results, run_id
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        pytest.fail("the run never reached its second workload")
    except BaseException:
        proc.kill()
        proc.communicate()
        raise


def assert_first_workload_kept(data: dict[str, Any]) -> None:
    first = data["runs"][0]
    assert first["workload"] == "page-touch" and first["status"] == "ok"
    assert first["phases"][0]["metrics"]["first_touch_mib_per_s"] > 0
    assert data["runs"][1]["status"] == "incomplete"


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_workload_leaves_nothing_and_keeps_finished_phases(
    tmp_path: Path, linux_image: LinuxImage, sig: signal.Signals, code: int
) -> None:
    proc, results, run_id = start_until_second_workload(tmp_path)
    try:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    data = only_result(results)
    assert data["status"] == "incomplete"
    assert any(f"interrupted by {sig.name}" in e for e in data["errors"])
    assert_first_workload_kept(data)
    assert_cleaned_up(run_id)


def wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_sigkilled_run_is_cleaned_by_libvirt_and_reaped_by_the_next(
    tmp_path: Path, linux_image: LinuxImage
) -> None:
    proc, results, run_id = start_until_second_workload(tmp_path)
    proc.kill()  # no handler runs: only what the design guarantees without one is left
    proc.communicate(timeout=30)
    # libvirtd destroys AUTODESTROY domains when the connection drops; bpftrace
    # dies with its parent (PR_SET_PDEATHSIG).
    assert wait_for(lambda: not [d for d in harness_domains() if run_id in d], 30)
    assert wait_for(lambda: not [t for t in stray_tracers() if run_id in t], 10)
    run_dir = cache_dir() / "runs" / run_id
    assert run_dir.exists(), "the killed run's overlay is the leftover to reap"
    data = only_result(results)
    assert data["status"] == "running"  # it never got to say otherwise
    assert_first_workload_kept(data)

    suite = write_suite(
        tmp_path,
        """\
[[runs]]
workload = "page-touch"
vm = "linux"
params = { mib = 8 }
""",
        name="after",
        trace=False,
    )
    after = tmp_path / "after"
    done = run_harness(suite, after, "--quiet", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    notes = only_result(after)["notes"]
    assert f"reaped leftover of a killed run: run directory {run_dir}" in notes
    assert not run_dir.exists()
    # The killed run's own file now says what happened to it, and keeps what it measured.
    killed = json.loads((results / f"{run_id}.json").read_text())
    assert killed["status"] == "killed"
    assert killed["errors"][-1].startswith("killed: its harness process")
    assert killed["runs"] == data["runs"]


def test_boot_timeout_quotes_the_console_and_cleans_up(
    tmp_path: Path, linux_image: LinuxImage
) -> None:
    # The guest needs about 5 s to answer SSH under TCG; give it 1.
    suite = write_suite(tmp_path, '[[runs]]\nworkload = "page-touch"\nvm = "linux"\n', trace=False)
    suite.write_text(suite.read_text().replace("boot_timeout_s = 90", "boot_timeout_s = 1"))
    results = tmp_path / "results"
    proc = run_harness(suite, results, "--quiet", timeout=120)
    assert proc.returncode == 1
    assert "did not answer SSH within 1 s" in proc.stderr
    assert "last console lines" in proc.stderr
    data = only_result(results)
    assert data["status"] == "failed" and "did not answer SSH" in data["errors"][0]
    assert_cleaned_up(data["run_id"])


def test_tracer_death_is_reported_and_the_workload_goes_on(
    tmp_path: Path, linux_image: LinuxImage
) -> None:
    suite = write_suite(
        tmp_path,
        """\
[[runs]]
workload = "page-touch"
vm = "linux"
params = { mib = 16 }
warmup = 0

[[runs]]
workload = "stress-ng-vm"
vm = "linux"
params = { bytes = "32M", seconds = 6 }
warmup = 0
""",
    )
    results = tmp_path / "results"
    proc = start_harness(suite, results)
    try:

        def stress_running() -> bool:
            files = list(results.glob("*.json"))
            return bool(files) and len(json.loads(files[0].read_text())["runs"]) == 2

        assert wait_for(stress_running, 240), "never reached the second workload"
        run_id = only_result(results)["run_id"]
        tracers = [t.split()[0] for t in stray_tracers() if run_id in t]
        assert len(tracers) == 1
        subprocess.run(["kill", "-9", tracers[0]], check=True)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err  # measured, but not everything asked for
    data = only_result(results)
    assert data["status"] == "failed"
    trace = data["vms"][0]["trace"]
    assert trace["tracer_status"] == "died" and trace["tracer_error"]
    assert any("tracer of VM linux died during phase 2" in e for e in data["errors"])
    touch, stress = (r["phases"][0] for r in data["runs"])
    assert touch["trace"] is not None  # traced before the tracer died
    assert stress["status"] == "ok" and stress["metrics"]["bogo_ops"] > 0
    assert stress["trace"] is None
    assert_cleaned_up(run_id)
