"""Reading a guest command's output without trusting the guest: bounded and deadline-driven.

A guest may print without end (``yes``, ``cat /dev/zero``). Every transport
(SSH now, WinRM next) reads through the same two pieces:

* :class:`BoundedOutput` keeps the head of a stream (where most workloads print
  their figures), up to a cap, and a tail (where the rest print their summary);
  the bytes in between are counted and dropped, so memory stays bounded
  whatever the guest prints.
* :class:`CommandWatch` is asked on every read iteration, however much data is
  waiting: past the deadline it raises GuestTimeout, and it polls the
  transport's abort check (is the guest still there?) at a fixed interval.
"""

from __future__ import annotations

import time

from harness.guest.base import AbortCheck, GuestGone, GuestTimeout

#: Bytes kept from the start of each stream: the metric regexes search there first.
HEAD_CAP = 1 << 20
#: Bytes kept from the end of each stream (summaries, and the phase's stdout tail).
TAIL_CAP = 1 << 20
#: How often the abort check is asked while a command runs.
ABORT_POLL_S = 1.0


class BoundedOutput:
    """One output stream, kept as a head of ``head_cap`` bytes and a tail of ``tail_cap``.

    Memory use is at most ``head_cap + 2 * tail_cap`` bytes: the tail is
    trimmed back to ``tail_cap`` whenever it has grown to twice that.
    """

    def __init__(self, head_cap: int = HEAD_CAP, tail_cap: int = TAIL_CAP) -> None:
        if head_cap < 0 or tail_cap < 0:
            raise ValueError("head_cap and tail_cap must be >= 0")
        self.head_cap, self.tail_cap = head_cap, tail_cap
        self._head = bytearray()
        self._tail = bytearray()
        self._trimmed = 0  # bytes dropped from the front of the tail
        self.total = 0  # bytes the guest sent on this stream

    def feed(self, data: bytes) -> None:
        """Take ``data``, the next bytes of the stream."""
        self.total += len(data)
        room = self.head_cap - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if not data:
            return
        self._tail += data
        if len(self._tail) >= 2 * self.tail_cap:
            cut = len(self._tail) - self.tail_cap
            del self._tail[:cut]
            self._trimmed += cut

    @property
    def dropped(self) -> int:
        """How many bytes between the head and the tail were not kept."""
        if len(self._tail) > self.tail_cap:  # trim lazily, counted here
            return self._trimmed + len(self._tail) - self.tail_cap
        return self._trimmed

    @property
    def kept(self) -> int:
        """How many bytes are held (head and tail)."""
        return self.total - self.dropped

    def note(self, stream: str) -> str | None:
        """A sentence saying what was dropped from ``stream`` ("stdout"), or None."""
        if self.dropped == 0:
            return None
        return (
            f"{stream}: the guest printed {self.total} bytes; kept the first "
            f"{len(self._head)} and the last {self.total - len(self._head) - self.dropped}, "
            f"dropped {self.dropped} in between"
        )

    def text(self) -> str:
        """The kept output, decoded; a line in place of what was dropped says how much."""
        tail = bytes(self._tail[-self.tail_cap :]) if self.tail_cap else b""
        if self.dropped == 0:
            return (bytes(self._head) + tail).decode(errors="replace")
        gap = f"\n[harness: {self.dropped} bytes of output dropped here]\n"
        return bytes(self._head).decode(errors="replace") + gap + tail.decode(errors="replace")


class CommandWatch:
    """The deadline and the abort check of one running command, asked every read iteration."""

    def __init__(
        self,
        command: str,
        timeout_s: float,
        abort_if: AbortCheck | None = None,
        *,
        poll_s: float = ABORT_POLL_S,
    ) -> None:
        self.command, self.timeout_s, self.abort_if = command, timeout_s, abort_if
        self.poll_s = poll_s
        self.start_ns = time.monotonic_ns()
        self.deadline_ns = self.start_ns + int(timeout_s * 1e9)
        self._next_poll = time.monotonic() + poll_s

    def check(self, out: BoundedOutput, err: BoundedOutput) -> None:
        """Raise GuestTimeout past the deadline, GuestGone once the abort check says why."""
        if time.monotonic_ns() > self.deadline_ns:
            raise timeout_error(self.command, self.timeout_s, out, err)
        if self.abort_if is not None and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.poll_s
            if (why := self.abort_if()) is not None:
                raise GuestGone(why)

    def remaining_s(self) -> float:
        """Seconds until the deadline (0 when past it)."""
        return max(0.0, (self.deadline_ns - time.monotonic_ns()) / 1e9)


def dropped_note(out: BoundedOutput, err: BoundedOutput) -> str | None:
    """What was dropped from either stream, in one sentence; None when nothing was."""
    notes = [n for n in (out.note("stdout"), err.note("stderr")) if n is not None]
    return "; ".join(notes) or None


def timeout_error(
    command: str, timeout_s: float, out: BoundedOutput, err: BoundedOutput
) -> GuestTimeout:
    """The GuestTimeout of ``command``, with the output kept so far and what was dropped."""
    return GuestTimeout(command, timeout_s, out.text(), err.text(), dropped_note(out, err))
