"""After a phase timeout: kill what is left of the command in the guest, then go on.

The guest here is a double (``KillGuestDouble``) that records what the
platform asks of it; the same path with a real guest is in
tests/integration/test_hostile_guest.py (a flood, a process ignoring SIGTERM,
``pgrep`` in the next phase) and tests/faults/test_guest_faults.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from harness.guest.base import GuestError
from harness.platform import linux
from harness.results import PhaseResult
from harness.trace.program import TraceTarget


class KillGuestDouble:
    """Only ``kill_phase``: kills ``groups`` groups, or fails as a wedged guest would."""

    def __init__(self, groups: int | None) -> None:
        self.groups = groups
        self.asked: list[tuple[int, int]] = []

    def kill_phase(self, token: int, phase: int) -> int:
        self.asked.append((token, phase))
        if self.groups is None:
            raise GuestError("guest command timed out after 30 s: pgrep ...")
        return self.groups


def timed_out(name: str = "flood") -> PhaseResult:
    return PhaseResult(
        index=3, name=name, status="timeout", started_at=datetime.now(UTC),
        error="guest command timed out after 5 s: yes",
    )  # fmt: skip


def after(guest: KillGuestDouble, phase: PhaseResult) -> str | None:
    state: Any = SimpleNamespace(check_cancel=lambda: None)
    record: Any = SimpleNamespace(console_log="/x/console.log")
    target = TraceTarget(vm="h", pid=1, token=4242)
    return linux._after_failed_phase(state, guest, phase, target, 3, record, health=None)  # type: ignore[arg-type]


def test_timed_out_command_is_killed_in_the_guest_and_the_boot_goes_on() -> None:
    guest, phase = KillGuestDouble(groups=1), timed_out()
    assert after(guest, phase) is None  # None: this boot goes on
    assert guest.asked == [(4242, 3)]  # the phase's own token and number
    assert phase.status == "timeout"
    assert phase.error == (
        "guest command timed out after 5 s: yes; killed 1 process group(s) left of the "
        "phase's command; the boot goes on"
    )


def test_a_guest_that_cannot_kill_it_ends_the_boot_with_the_reason() -> None:
    guest, phase = KillGuestDouble(groups=None), timed_out()
    why = after(guest, phase)
    assert why is not None
    assert why.startswith("phase flood timed out: the guest's state is unknown")
    assert "guest command timed out after 30 s: pgrep" in why
    assert "remaining work is skipped and the VM destroyed" in why


def test_the_reconnect_wait_is_20_s_unless_harness_reconnect_s_says_otherwise(
    monkeypatch: Any,
) -> None:
    monkeypatch.delenv(linux.RECONNECT_ENV, raising=False)
    assert linux.reconnect_s() == linux.RECONNECT_S == 20.0
    monkeypatch.setenv(linux.RECONNECT_ENV, "3")
    assert linux.reconnect_s() == 3.0
    for bad in ("", "soon", "0", "-5"):
        monkeypatch.setenv(linux.RECONNECT_ENV, bad)
        assert linux.reconnect_s() == 20.0, bad
