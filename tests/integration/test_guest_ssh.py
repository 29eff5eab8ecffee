"""The SSH Guest against a real booted guest: the contract a WinRM transport must match."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.guest.base import GuestError, GuestTimeout
from harness.guest.ssh import MARKER_TOOL, SshGuest
from harness.image.linux import LinuxImage
from tests.integration.conftest import Booted, booted_guest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def booted(linux_image: LinuxImage) -> Iterator[Booted]:
    with booted_guest(linux_image, "guest") as b:
        yield b


def test_exit_status_and_streams_are_returned_not_raised(booted: Booted) -> None:
    out = booted.guest.run("echo out; echo err >&2; exit 7", timeout_s=30)
    assert (out.exit_status, out.stdout, out.stderr) == (7, "out\n", "err\n")
    assert out.end_ns > out.start_ns


def test_timeout_raises_with_partial_output_and_connection_survives(booted: Booted) -> None:
    with pytest.raises(GuestTimeout) as err:
        booted.guest.run("echo started; sleep 30", timeout_s=1.5)
    assert err.value.stdout == "started\n"
    assert booted.guest.run("true", timeout_s=30).exit_status == 0


def test_put_and_get_round_trip(booted: Booted, tmp_path: Path) -> None:
    src = tmp_path / "blob"
    src.write_bytes(bytes(range(256)) * 1000)
    booted.guest.put(src, "/tmp/blob")
    assert booted.guest.run("sha256sum /tmp/blob", timeout_s=30).stdout.split()[0] == (
        hashlib.sha256(src.read_bytes()).hexdigest()
    )
    back = tmp_path / "back"
    booted.guest.get("/tmp/blob", back)
    assert back.read_bytes() == src.read_bytes()
    with pytest.raises(GuestError, match="cannot copy"):
        booted.guest.get("/no/such/file", tmp_path / "x")


#: Installed over the guest's kvm-marker (on this VM's throwaway overlay): runs the real
#: tool, then logs its arguments and exit status. Under TCG no kvm_cpuid reaches the
#: host, so this is where the markers around a phase can be seen.
MARKER_LOGGER = f"""#!/bin/sh
{MARKER_TOOL}.real "$@"
rc=$?
echo "marker $* rc=$rc" >> /tmp/markers.log
exit $rc
"""


@pytest.fixture
def logged_markers(booted: Booted) -> Iterator[Path]:
    """kvm-marker calls logged to the returned guest path; the real tool put back after."""
    setup = (
        f"rm -f /tmp/markers.log && mv {MARKER_TOOL} {MARKER_TOOL}.real && "
        f"cat > {MARKER_TOOL} <<'EOF'\n{MARKER_LOGGER}EOF\nchmod 755 {MARKER_TOOL}"
    )
    assert booted.guest.run(setup, timeout_s=30).exit_status == 0
    try:
        yield Path("/tmp/markers.log")
    finally:
        booted.guest.run(f"mv -f {MARKER_TOOL}.real {MARKER_TOOL}", timeout_s=30)


def test_phase_command_brackets_with_markers_and_keeps_status(
    booted: Booted, logged_markers: Path
) -> None:
    command = f"echo hi; echo command >> {logged_markers}; exit 3"
    wrapped = booted.guest.phase_command(command, token=0x1234, phase=5)
    out = booted.guest.run(wrapped, timeout_s=30)
    assert (out.exit_status, out.stdout) == (3, "hi\n")
    # The real kvm-marker ran for phase 5 before the command and for phase 0 after it,
    # each to a clean exit (its cpuid executed; a bad marker exits 2, as below).
    log = booted.guest.run(f"cat {logged_markers}", timeout_s=30).stdout.splitlines()
    assert log == ["marker 4660 5 rc=0", "command", "marker 4660 0 rc=0"]
    bad = booted.guest.run(f"{MARKER_TOOL} 0 1", timeout_s=30)
    assert bad.exit_status == 2 and "TOKEN must be an integer" in bad.stderr


def test_wrong_host_key_is_rejected_at_once(booted: Booted, linux_image: LinuxImage) -> None:
    # A valid ed25519 key that is not the guest's: the client's own public key.
    impostor = linux_image.ssh_private_key.with_suffix(".pub").read_text()
    assert booted.vm.ssh_port is not None
    with pytest.raises(GuestError, match="host key mismatch"):
        SshGuest.connect(
            "127.0.0.1",
            booted.vm.ssh_port,
            user=linux_image.ssh_user,
            key_file=linux_image.ssh_private_key,
            host_key=impostor,
            deadline_s=60,
        )
