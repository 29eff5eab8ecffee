"""libvirtd is killed and started again mid-phase (as `harness doctor --fix` starts it).

What libvirt 9.0 does here (seen on this host): after SIGKILL, QEMU survives;
the restarted libvirtd re-adopts the running transient domain, and its
AUTODESTROY is gone with the connection it was tied to, so nothing would ever
destroy it. The harness notices the lost connection within a second (its
watch of the VM), fails the phase and the run with a clear error, and destroys
the domain through a new connection (or kills its QEMU if no libvirtd
answers). SIGTERM instead makes libvirtd close its clients and so destroy the
AUTODESTROY domain itself, but without systemd its shutdown then hangs (the
daemon-shutdown thread waits forever), so SIGKILL is what a restart here is.

Other sessions on a development host share this libvirtd: the test first waits
(up to 5 minutes) until no domain but its own exists, and restarts it once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.host.doctor import wait_for_libvirtd
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
    qemu_of_run,
    run_domain,
    start_run,
    wait_for_phase,
    write_fault_suite,
)


def all_domains() -> list[str]:
    out = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [n for n in out.split() if n]


def wait_until_alone(mine: str | None, timeout_s: float = 300, poll_s: float = 5) -> None:
    """Wait until libvirtd runs no domain but ``mine`` (other sessions share it).

    Killing libvirtd would cut every other session's connection, so the test
    never does it beside another domain; a host that stays busy fails the test
    (it did not run, which must not look like a pass or a quiet skip).
    """
    deadline = time.monotonic() + timeout_s
    while (others := [d for d in all_domains() if d != mine]) and time.monotonic() < deadline:
        time.sleep(poll_s)
    if others:
        pytest.fail(
            f"libvirtd still runs other domains after {timeout_s:.0f} s: {others}. Restarting "
            "it would cut their sessions' connections, so this test did not run; run it "
            "when no other libvirt domain exists (on CI, none does)",
            pytrace=False,
        )


def test_a_busy_libvirtd_fails_the_test_instead_of_skipping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``all_domains`` is replaced by a double that reports another session's domain."""

    def other_sessions_domain() -> list[str]:
        return ["kvmh-someone-else-a"]

    monkeypatch.setattr(sys.modules[__name__], "all_domains", other_sessions_domain)
    with pytest.raises(pytest.fail.Exception, match=r"kvmh-someone-else-a.*did not run"):
        wait_until_alone(None, timeout_s=0, poll_s=0)
    wait_until_alone("kvmh-someone-else-a", timeout_s=0, poll_s=0)  # its own domain: no wait


def restart_libvirtd() -> None:
    """SIGKILL libvirtd, then start it again the way `harness doctor --fix` does."""
    pids = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True).stdout
    for pid in map(int, pids.split()):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "libvirtd did not die"
        time.sleep(0.1)
    for _ in range(20):  # its pidfile lock goes with the process, a moment later
        if subprocess.run(["libvirtd", "-d"], capture_output=True).returncode == 0:
            break
        time.sleep(0.25)
    wait_for_libvirtd()


@pytest.mark.timeout(600)  # up to 300 + 120 s of waiting for other sessions' domains
def test_libvirtd_restart_fails_the_run_cleanly(tmp_path: Path, guest_image: LinuxImage) -> None:
    suite = write_fault_suite(
        tmp_path,
        {
            "fault-libvirtd": fault_workload("fault-libvirtd", "sleep 600", 300),
            "fault-later": fault_workload("fault-later", "true", 30, after=False),
        },
        [("fault-libvirtd", "a"), ("fault-later", "a"), ("fault-later", "b")],
        vms=("a", "b"),
    )
    results = tmp_path / "results"
    wait_until_alone(None)  # on CI: at once
    proc = start_run(suite, results)
    try:
        data = wait_for_phase(proc, results, "fault-libvirtd", "fault")
        wait_until_alone(run_domain(data["run_id"], "a"), timeout_s=120)  # inside the phase
        assert proc.poll() is None
        qemu = qemu_of_run(data["run_id"])
        assert len(qemu) == 1, qemu
        restart_libvirtd()
        code, err = finish(proc, 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code == 1, err[-3000:]
    assert "lost the connection to libvirtd" in err  # the CLI says why it stopped
    data = only_result(results)
    assert data["status"] == "failed"
    (error,) = data["errors"]
    assert error.startswith("VmError: VM a: phase fault: the VM is gone: lost the connection")
    assert "the run stops" in error
    runs = by_workload(data)
    run = runs[("fault-libvirtd", "a")]
    assert_before_kept(run)
    fault = run["phases"][1]
    assert fault["status"] == "error" and "lost the connection to libvirtd" in fault["error"]
    assert runs[("fault-later", "a")]["status"] == "skipped"
    assert ("fault-later", "b") not in runs  # the run stopped: no boot on a lost connection
    assert len(data["vms"]) == 1
    # The re-adopted domain and its QEMU are gone: nothing is left to outlive the run.
    assert_nothing_left(data["run_id"])
    assert_next_run_succeeds(tmp_path)
