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
    proc = subprocess.run(
        harness("run", str(suite), "--results-dir", str(results)),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
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
    console = results / f"{data['run_id']}.linux.console.log"
    assert console.exists()


def test_failing_workload_is_recorded_not_retried(tmp_path: Path, linux_image: LinuxImage) -> None:
    # 100 GiB cannot be mapped in a 768 MiB guest: page-touch exits non-zero.
    suite = write_suite(
        tmp_path,
        """\
[[runs]]
workload = "page-touch"
vm = "linux"
params = { mib = 102400 }
""",
        trace=False,
    )
    results = tmp_path / "results"
    proc = subprocess.run(
        harness("run", str(suite), "--results-dir", str(results), "--quiet"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    data = only_result(results)
    assert data["status"] == "failed"
    (phase,) = data["runs"][0]["phases"]
    assert phase["status"] == "failed" and phase["exit_status"] != 0
    assert phase["stderr_tail"] or phase["stdout_tail"]
    assert data["vms"][0]["trace"]["tracer_status"] == "disabled"
    assert_cleaned_up(data["run_id"])


def test_sigint_mid_workload_leaves_nothing_and_keeps_finished_phases(
    tmp_path: Path, linux_image: LinuxImage
) -> None:
    suite = write_suite(
        tmp_path,
        """\
[[runs]]
workload = "page-touch"
vm = "linux"
params = { mib = 32 }

[[runs]]
workload = "stress-ng-vm"
vm = "linux"
params = { bytes = "64M", seconds = 120 }
""",
    )
    results = tmp_path / "results"
    proc = subprocess.Popen(
        harness("run", str(suite), "--results-dir", str(results), "--quiet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        data: dict[str, Any] = {}
        while time.monotonic() < deadline:
            files = list(results.glob("*.json"))
            if files:
                data = json.loads(files[0].read_text())
                if len(data["runs"]) == 2:  # page-touch done, stress-ng started
                    break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        else:
            pytest.fail("the run never reached its second workload")
        time.sleep(2)  # well inside the 120 s stress-ng phase
        run_id = data["run_id"]
        assert [d for d in harness_domains() if run_id in d], "VM should be running now"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    data = only_result(results)
    assert data["status"] == "incomplete"
    assert any("interrupted" in e for e in data["errors"])
    first = data["runs"][0]
    assert first["workload"] == "page-touch" and first["status"] == "ok"
    assert first["phases"][0]["metrics"]["first_touch_mib_per_s"] > 0
    assert data["runs"][1]["status"] == "incomplete"
    assert_cleaned_up(run_id)
