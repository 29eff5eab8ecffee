"""Faults of the guest itself: it hangs mid-phase, its kernel panics, its VM is destroyed
from outside. Each through the real CLI on a real TCG guest; see docs/RELIABILITY.md."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness.image.linux import LinuxImage
from tests.faults.helpers_b import (  # noqa: F401 (an autouse fixture)
    assert_before_kept,
    assert_next_run_succeeds,
    assert_nothing_left,
    by_workload,
    fault_workload,
    finish,
    nothing_left_behind_by_fault,
    only_result,
    run_domain,
    start_run,
    wait_for_phase,
    write_fault_suite,
)

#: A second workload on the faulted boot (skipped), and a second boot that must run.
NEXT_ON_BOOT = fault_workload("fault-later", "echo later value=42", 30, after=False)


def assert_boot_ended_and_suite_went_on(data: dict[str, object], why: str) -> None:
    """The faulted boot's later work is skipped with the reason; the next boot ran."""
    runs = by_workload(data)  # type: ignore[arg-type]
    later = runs[("fault-later", "a")]
    assert later["status"] == "skipped" and later["phases"] == []
    assert why in later["reason"], later["reason"]
    vm_a, vm_b = data["vms"]  # type: ignore[misc]
    assert why in vm_a["ended_early"], vm_a
    assert vm_b["ended_early"] is None
    other = runs[("fault-later", "b")]
    assert other["status"] == "ok", other
    assert [p["status"] for p in other["phases"]] == ["ok", "ok"]
    assert other["phases"][0]["metrics"] == {"value": 42.0}


def run_with_fault(tmp_path: Path, command: str, timeout_s: float) -> subprocess.Popen[str]:
    suite = write_fault_suite(
        tmp_path,
        {
            "fault-guest": fault_workload("fault-guest", command, timeout_s),
            "fault-later": NEXT_ON_BOOT,
        },
        [("fault-guest", "a"), ("fault-later", "a"), ("fault-later", "b")],
        vms=("a", "b"),
    )
    return start_run(suite, tmp_path / "results")


@pytest.mark.timeout(180)
def test_hung_guest_phase_times_out_and_the_suite_goes_on(
    tmp_path: Path, guest_image: LinuxImage
) -> None:
    proc = run_with_fault(tmp_path, "sleep 600", timeout_s=4)
    code, err = finish(proc, 150)
    assert code == 1, err[-3000:]
    data = only_result(tmp_path / "results")
    assert data["status"] == "failed"
    run = by_workload(data)[("fault-guest", "a")]
    assert run["status"] == "failed"
    assert_before_kept(run)
    fault = run["phases"][1]
    assert fault["status"] == "timeout"
    assert "timed out after 4 s" in fault["error"]
    assert 4.0 <= fault["duration_s"] < 15
    assert run["not_run"] == ["after"]
    assert "timed out" in run["reason"]
    # The command was killed in the guest (its process group), so that boot went on too.
    assert "killed 1 process group(s) left of the phase's command" in fault["error"]
    runs = by_workload(data)
    assert data["vms"][0]["ended_early"] is None and data["vms"][1]["ended_early"] is None
    for vm in ("a", "b"):
        later = runs[("fault-later", vm)]
        assert later["status"] == "ok", later
        assert later["phases"][0]["metrics"] == {"value": 42.0}
    assert_nothing_left(data["run_id"])
    assert_next_run_succeeds(tmp_path)


@pytest.mark.timeout(180)
def test_guest_kernel_panic_fails_the_phase_and_keeps_the_console(
    tmp_path: Path, guest_image: LinuxImage
) -> None:
    # sysrq-trigger works for root whatever kernel.sysrq says: a real panic.
    proc = run_with_fault(tmp_path, "echo c > /proc/sysrq-trigger; sleep 600", timeout_s=120)
    code, err = finish(proc, 150)
    assert code == 1, err[-3000:]
    data = only_result(tmp_path / "results")
    assert data["status"] == "failed"
    run = by_workload(data)[("fault-guest", "a")]
    assert_before_kept(run)
    fault = run["phases"][1]
    assert fault["status"] == "error", fault
    assert "the guest kernel panicked" in fault["error"]
    assert "sysrq triggered crash" in fault["error"]
    assert fault["duration_s"] < 60, "noticed from the console, not by the phase timeout"
    console = Path(data["vms"][0]["console_log"])
    assert f"console log: {console}" in fault["error"]
    assert console.parent == tmp_path / "results" and "Kernel panic" in console.read_text()
    assert run["not_run"] == ["after"]
    assert_boot_ended_and_suite_went_on(data, "the guest kernel panicked")
    assert_nothing_left(data["run_id"])
    assert_next_run_succeeds(tmp_path)


@pytest.mark.timeout(180)
def test_domain_destroyed_from_outside_says_so(tmp_path: Path, guest_image: LinuxImage) -> None:
    results = tmp_path / "results"
    proc = run_with_fault(tmp_path, "sleep 600", timeout_s=120)
    try:
        data = wait_for_phase(proc, results, "fault-guest", "fault")
        subprocess.run(
            ["virsh", "-c", "qemu:///system", "destroy", run_domain(data["run_id"], "a")],
            check=True,
            capture_output=True,
        )
        code, err = finish(proc, 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code == 1, err[-3000:]
    data = only_result(results)
    assert data["status"] == "failed"
    run = by_workload(data)[("fault-guest", "a")]
    assert_before_kept(run)
    fault = run["phases"][1]
    assert fault["status"] == "error", fault
    assert "is gone: destroyed from outside the harness, or QEMU" in fault["error"]
    assert "reason=destroyed" in fault["error"]  # libvirt's own log of how it ended
    console = Path(data["vms"][0]["console_log"])
    assert f"console log: {console}" in fault["error"] and console.exists()
    assert_boot_ended_and_suite_went_on(data, "is gone: destroyed from outside")
    assert_nothing_left(data["run_id"])
    assert_next_run_succeeds(tmp_path)
