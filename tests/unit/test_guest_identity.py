"""The guest's identity: read through the Guest protocol, every value bounded and checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.guest.base import CommandResult, GuestError
from harness.guest.identity import (
    COMMAND,
    GuestIdentity,
    parse_identity,
    parse_os_release,
    read_identity,
    try_read_identity,
)
from harness.results import VmRecord

DEBIAN = (
    'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
    'VERSION_ID="12"\nVERSION="12 (bookworm)"\nID=debian\n'
)


def answer(os_release: str = DEBIAN, release: str = "6.1.0-27-cloud-amd64",
           version: str = "#1 SMP PREEMPT_DYNAMIC Debian 6.1.115-1 (2024-11-01)",
           cmdline: str = "root=/dev/vda rw console=ttyS0 quiet") -> str:
    return (f"--kvm-harness-identity-os--\n{os_release}\n--kvm-harness-identity-release--\n"
            f"{release}\n\n--kvm-harness-identity-version--\n{version}\n\n"
            f"--kvm-harness-identity-cmdline--\n{cmdline}\n\n")


class FakeGuest:
    def __init__(self, stdout: str, status: int = 0, fail: bool = False) -> None:
        self.stdout, self.status, self.fail = stdout, status, fail
        self.commands: list[str] = []

    def run(self, command: str, *, timeout_s: float, abort_if: object = None) -> CommandResult:
        self.commands.append(command)
        if self.fail:
            raise GuestError("SSH connection closed")
        return CommandResult(self.status, self.stdout, "", 0, 1)

    def reconnect(self, deadline_s: float) -> None: ...
    def kill_phase(self, token: int, phase: int) -> int: return 0
    def put(self, local: Path, remote: str) -> None: ...
    def get(self, remote: str, local: Path) -> None: ...
    def phase_command(self, command: str, token: int, phase: int) -> str: return command
    def close(self) -> None: ...


def test_a_debian_guest_reads_as_it_is() -> None:
    guest = FakeGuest(answer())
    got = read_identity(guest)
    assert guest.commands == [COMMAND]
    assert (got.os_id, got.os_version_id, got.os_pretty_name) == (
        "debian", "12", "Debian GNU/Linux 12 (bookworm)")
    assert got.kernel_release == "6.1.0-27-cloud-amd64"
    assert got.kernel_version == "#1 SMP PREEMPT_DYNAMIC Debian 6.1.115-1 (2024-11-01)"
    assert got.kernel_cmdline == "root=/dev/vda rw console=ttyS0 quiet"
    assert got.problems == []
    assert got.kernel_label() == "6.1.0-27-cloud-amd64"
    assert got.os_label() == "Debian GNU/Linux 12 (bookworm)"


def test_escape_sequences_and_bad_tokens_are_refused_or_escaped() -> None:
    hostile = "ID=\"deb\x1b[2Jian\"\nVERSION_ID='12 ; rm'\nPRETTY_NAME=\"Evil\x1b]0;title\x07\"\n"
    got = parse_identity(answer(os_release=hostile, release="6.1 0\x1b[H",
                                version="#1 \x9b31m", cmdline="a\u202eb"))
    assert got.os_id is None and got.os_version_id is None and got.kernel_release is None
    assert got.os_pretty_name == "Evil\\x1b]0;title\\x07"
    assert got.kernel_version == "#1 \\x9b31m"
    assert got.kernel_cmdline == "a\\u202eb"
    assert len(got.problems) == 3
    assert all("\x1b" not in p for p in got.problems)


def test_oversized_values_are_dropped_with_the_reason() -> None:
    got = parse_identity(answer(release="6" * 65, cmdline="x" * 5000))
    assert got.kernel_release is None and got.kernel_cmdline is None
    assert any("kernel_release: 65 characters" in p for p in got.problems)
    assert any("kernel_cmdline: 5000 characters" in p for p in got.problems)


def test_a_guest_that_prints_nothing_or_garbage_is_recorded_as_unknown() -> None:
    for stdout in ("", "hello\n" * 100, "\x00\xff" * 10):
        got = parse_identity(stdout)
        assert got.kernel_release is None and got.os_id is None
        assert "kernel_release: the guest gave none" in got.problems


def test_a_forged_second_separator_does_not_override_the_first() -> None:
    text = answer() + "--kvm-harness-identity-release--\n9.9.9-forged\n"
    assert parse_identity(text).kernel_release == "6.1.0-27-cloud-amd64"


def test_several_lines_where_one_is_expected_show_as_escaped_newlines() -> None:
    got = parse_identity(answer(version="#1 SMP\nsecond line"))
    assert got.kernel_version == "#1 SMP\\x0asecond line"


def test_os_release_quoting_is_undone_and_broken_lines_skipped() -> None:
    got = parse_os_release("ID='ubuntu'\nNAME=\"Ubuntu \\\"x\\\"\"\nBROKEN=\"open\n# c\nlower=x\n")
    assert got == {"ID": "ubuntu", "NAME": 'Ubuntu "x"'}


def test_a_transport_failure_is_a_problem_not_a_crash() -> None:
    with pytest.raises(GuestError):
        read_identity(FakeGuest("", fail=True))
    got = try_read_identity(FakeGuest("", fail=True))
    assert got.kernel_release is None
    assert got.problems == ["could not ask the guest: SSH connection closed"]
    assert "exited 1" in read_identity(FakeGuest(answer(), status=1)).problems[-1]


def test_labels_name_package_version_or_file_digest() -> None:
    ident = GuestIdentity(kernel_release="6.1.0-27-amd64", kernel_package="linux-image-amd64",
                          kernel_package_version="6.1.115-1", kernel_sha256="ab" * 32)
    assert ident.kernel_label() == "6.1.0-27-amd64 (linux-image-amd64 6.1.115-1)"
    ident = GuestIdentity(kernel_release="6.12.0-mine", kernel_sha256="cd" * 32)
    assert ident.kernel_label() == "6.12.0-mine (sha256 cdcdcdcdcdcd)"
    assert GuestIdentity(os_id="fedora", os_version_id="41").os_label() == "fedora 41"


def test_vm_records_without_identity_still_load() -> None:
    old = {"name": "vm", "domain": "d", "image": "linux", "image_digest": "a" * 64,
           "accelerator": "tcg", "accelerator_reason": "r", "vcpus": 1, "memory_mib": 512,
           "marker_token": 1}
    assert VmRecord.model_validate(old).guest_identity is None
    rec = VmRecord.model_validate({**old, "guest_identity": {"kernel_release": "6.1"}})
    assert rec.guest_identity is not None and rec.guest_identity.kernel_release == "6.1"
