"""The SSH connection drops mid-command: once with the guest still answering (the
harness reconnects, kills what is left of the command, and the boot goes on), once
with the guest unreachable (the boot ends, the suite goes on). The drop is real: the
host kernel destroys the harness's TCP socket on the loopback forward (`ss -K`,
CONFIG_INET_DIAG_DESTROY), which sends a reset to QEMU's end. See docs/RELIABILITY.md."""

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
    ssh_port,
    start_run,
    wait_for_phase,
    write_fault_suite,
)

#: Runs after the dropped phase on the same boot: fails if the dropped command survived.
NOTHING_LEFT = fault_workload(
    "fault-later", "if pgrep -x sleep; then exit 9; fi; echo nothing left", 30, after=False
)


def drop_ssh(port: int) -> None:
    """Destroy the harness's TCP connection to the forwarded port (its side: dport)."""
    proc = subprocess.run(
        ["ss", "-K", "-t", "dst", "127.0.0.1", "dport", "=", f":{port}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f":{port}" in proc.stdout, f"no connection to :{port} was killed: {proc.stdout}"


def run_and_drop(
    tmp_path: Path, command: str, vms: tuple[str, ...], env: dict[str, str] | None = None
) -> tuple[int, str, Path]:
    runs = [("fault-ssh", "a"), ("fault-later", "a")] + [("fault-later", v) for v in vms[1:]]
    suite = write_fault_suite(
        tmp_path,
        {"fault-ssh": fault_workload("fault-ssh", command, 120), "fault-later": NOTHING_LEFT},
        runs,
        vms=vms,
    )
    results = tmp_path / "results"
    proc = start_run(suite, results, env)
    try:
        data = wait_for_phase(proc, results, "fault-ssh", "fault")
        drop_ssh(ssh_port(run_domain(data["run_id"], "a")))
        code, err = finish(proc, 150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return code, err, results


@pytest.mark.timeout(150)
def test_ssh_drop_with_guest_alive_fails_only_that_phase(
    tmp_path: Path, guest_image: LinuxImage
) -> None:
    code, err, results = run_and_drop(tmp_path, "sleep 600", vms=("a",))
    assert code == 1, err[-3000:]
    data = only_result(results)
    assert data["status"] == "failed"  # one phase's outcome is unknown
    runs = by_workload(data)
    dropped = runs[("fault-ssh", "a")]
    assert_before_kept(dropped)
    fault = dropped["phases"][1]
    assert fault["status"] == "error" and fault["exit_status"] is None, fault
    assert "dropped while" in fault["error"] and "its outcome is unknown" in fault["error"]
    assert "reconnected over SSH, killed 1 process group(s)" in fault["error"]
    assert dropped["not_run"] == ["after"]
    # The boot went on, on a new connection, with the dropped command gone.
    later = runs[("fault-later", "a")]
    assert later["status"] == "ok", later
    assert later["phases"][1]["stdout_tail"].strip() == "nothing left"
    assert data["vms"][0]["ended_early"] is None
    assert_nothing_left(data["run_id"])
    assert_next_run_succeeds(tmp_path)


@pytest.mark.timeout(180)
def test_ssh_drop_with_guest_unreachable_ends_the_boot(
    tmp_path: Path, guest_image: LinuxImage
) -> None:
    # The guest loses its network first: it lives on, but no SSH reaches it again. How long
    # the harness waits for it is not the point (20 s for users): 3 s here.
    code, err, results = run_and_drop(tmp_path, "ip link set eth0 down; sleep 600", ("a", "b"),
                                      env={"HARNESS_RECONNECT_S": "3"})
    assert code == 1, err[-3000:]
    data = only_result(results)
    assert data["status"] == "failed"
    runs = by_workload(data)
    dropped = runs[("fault-ssh", "a")]
    assert_before_kept(dropped)
    fault = dropped["phases"][1]
    assert fault["status"] == "error" and "its outcome is unknown" in fault["error"]
    why = "the SSH connection dropped and the guest did not answer SSH again within 3 s"
    assert why in data["vms"][0]["ended_early"]
    skipped = runs[("fault-later", "a")]
    assert skipped["status"] == "skipped" and why in skipped["reason"]
    assert runs[("fault-later", "b")]["status"] == "ok"  # the suite went on with its next boot
    assert data["vms"][1]["ended_early"] is None
    assert_nothing_left(data["run_id"])
    assert_next_run_succeeds(tmp_path)
