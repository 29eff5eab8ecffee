"""The one interface every guest transport implements (SSH now, WinRM next)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

#: Polled while a command runs: None while the guest is fine, else what happened to it.
AbortCheck = Callable[[], str | None]


@dataclass(frozen=True)
class CommandResult:
    """What a guest command did. A non-zero exit is data, not an exception."""

    exit_status: int
    stdout: str
    stderr: str
    start_ns: int  # time.monotonic_ns() on the host when the command was sent
    end_ns: int  # ... and when its exit status arrived
    #: What was dropped from the middle of an output too large to keep (None: nothing).
    dropped: str | None = None

    @property
    def duration_s(self) -> float:
        """Wall time seen from the host, including transport latency."""
        return (self.end_ns - self.start_ns) / 1e9


class GuestError(Exception):
    """The transport failed (not the command): connection lost, file copy failed."""


class GuestLost(GuestError):
    """The connection dropped while a command ran: the command's outcome is unknown."""


class GuestGone(GuestError):
    """The guest went away while a command ran (its domain is gone, its kernel panicked,
    libvirtd lost): the ``abort_if`` check of :meth:`Guest.run` said so."""


class GuestTimeout(GuestError):
    """A command ran past its timeout; carries what it printed so far."""

    def __init__(
        self, command: str, timeout_s: float, stdout: str, stderr: str, note: str | None = None
    ) -> None:
        extra = f" ({note})" if note else ""
        super().__init__(f"guest command timed out after {timeout_s:.0f} s: {command}{extra}")
        self.stdout, self.stderr = stdout, stderr


class Guest(Protocol):
    """A booted guest the harness can drive."""

    def run(
        self, command: str, *, timeout_s: float, abort_if: AbortCheck | None = None
    ) -> CommandResult:
        """Run ``command`` in the guest's shell; raise GuestTimeout past ``timeout_s``.

        Raises GuestLost if the connection drops mid-command, and GuestGone as
        soon as ``abort_if()`` (polled about once a second) returns a reason.
        """
        ...

    def reconnect(self, deadline_s: float) -> None:
        """Connect again (after GuestLost), retrying until ``deadline_s``; GuestError if not."""
        ...

    def kill_phase(self, token: int, phase: int) -> int:
        """Kill what is left of ``phase_command(..., token, phase)`` (its whole process
        group); returns how many processes were signalled."""
        ...

    def put(self, local: Path, remote: str) -> None:
        """Copy a host file into the guest."""
        ...

    def get(self, remote: str, local: Path) -> None:
        """Copy a guest file to the host."""
        ...

    def phase_command(self, command: str, token: int, phase: int) -> str:
        """``command`` bracketed by guest phase markers, in this guest's shell language.

        The wrapped command marks ``phase`` before it starts and phase 0 after
        it ends, and exits with the workload's own status.
        """
        ...

    def close(self) -> None:
        """Drop the connection."""
        ...
