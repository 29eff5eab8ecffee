"""The bounded, deadline-driven guest reader (harness/guest/output.py and SshGuest.run).

The channel here is a double of paramiko's Channel (``FakeChannelDouble``):
a real guest flooding its output is tested in
tests/integration/test_hostile_guest.py. Time is a fake clock that the
channel advances per chunk it hands out, so the tests are exact and do not
depend on this machine's speed.
"""

from __future__ import annotations

import itertools
import tracemalloc
from types import SimpleNamespace
from typing import Any

import pytest

from harness.guest import output
from harness.guest.base import GuestGone, GuestTimeout
from harness.guest.output import BoundedOutput
from harness.guest.ssh import CHUNK, SshGuest

MIB = 1 << 20


class ReaderRunaway(Exception):
    """The channel double handed out far more than the deadline allows: the reader ignored it."""


class FakeClock:
    """Stands in for the ``time`` module inside harness.guest.output."""

    def __init__(self) -> None:
        self.ns = 10**12

    def monotonic_ns(self) -> int:
        return self.ns

    def monotonic(self) -> float:
        return self.ns / 1e9

    def advance(self, seconds: float) -> None:
        self.ns += int(seconds * 1e9)


class FakeChannelDouble:
    """A paramiko Channel double: a command that prints ``script`` chunks, then exits.

    ``flood=True``: stdout never ends and no exit status ever comes. Each
    chunk handed out advances ``clock`` by ``s_per_chunk``.
    """

    def __init__(
        self,
        clock: FakeClock,
        *,
        flood: bool = False,
        stdout: bytes = b"",
        stderr: bytes = b"",
        status: int = 0,
        s_per_chunk: float = 0.001,
        max_chunks: int = 100_000,
        status_first: bool = False,
    ) -> None:
        self.clock, self.flood, self.status = clock, flood, status
        self.stdout, self.stderr = bytearray(stdout), bytearray(stderr)
        self.s_per_chunk, self.max_chunks = s_per_chunk, max_chunks
        # status_first: the exit status is there from the start and the output trickles in
        # after it, each chunk only after two polls found nothing ready (sshd sends the
        # status while the rest of the output still waits for window space).
        self.status_first = status_first
        self._gap = 0
        self.chunks = 0
        self.closed = False

    def exec_command(self, command: str) -> None:
        self.command = command

    def settimeout(self, timeout: float) -> None:
        pass

    def _hand_out(self, buf: bytearray, n: int) -> bytes:
        self._gap = 2 if self.status_first else 0
        if not buf and not self.flood:
            return b""  # EOF
        self.chunks += 1
        if self.chunks > self.max_chunks:
            raise ReaderRunaway(f"{self.chunks} chunks read, past any deadline")
        self.clock.advance(self.s_per_chunk)
        if self.flood and buf is self.stdout:
            return b"y\n" * (n // 2)
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def recv_ready(self) -> bool:
        if self._gap > 0:
            self._gap -= 1
            return False
        return self.flood or bool(self.stdout)

    def recv(self, n: int) -> bytes:
        return self._hand_out(self.stdout, n)

    def recv_stderr_ready(self) -> bool:
        return bool(self.stderr)

    def recv_stderr(self, n: int) -> bytes:
        return self._hand_out(self.stderr, n)

    def exit_status_ready(self) -> bool:
        return self.status_first or (not self.flood and not self.stdout and not self.stderr)

    @property
    def eof_received(self) -> bool:
        return not self.flood and not self.stdout and not self.stderr

    def recv_exit_status(self) -> int:
        return self.status

    def close(self) -> None:
        self.closed = True


def guest_on(chan: FakeChannelDouble) -> SshGuest:
    """An SshGuest whose paramiko client double opens ``chan``."""
    transport = SimpleNamespace(is_active=lambda: True, open_session=lambda timeout: chan)
    client: Any = SimpleNamespace(get_transport=lambda: transport, close=lambda: None)
    return SshGuest(client, "127.0.0.1", 2222)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(output, "time", fake)
    return fake


def test_flood_with_a_short_timeout_ends_at_the_deadline_with_bounded_memory(
    clock: FakeClock,
) -> None:
    # 1 ms of fake time per 64 KiB chunk: the 2 s deadline passes after ~2000 chunks
    # (125 MiB); the old reader never left its inner loop and buffered all of it.
    chan = FakeChannelDouble(clock, flood=True, max_chunks=20_000)
    guest = guest_on(chan)
    tracemalloc.start()
    try:
        with pytest.raises(GuestTimeout) as err:
            guest.run("yes", timeout_s=2.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert chan.chunks <= 2002, "the reader went on past its deadline"
    assert chan.closed
    sent = (chan.chunks - 1) * CHUNK
    assert sent > 100 * MIB
    assert peak < 16 * MIB, f"peak {peak / MIB:.1f} MiB while the guest sent {sent / MIB:.0f} MiB"
    kept = err.value.stdout
    assert len(kept) < output.HEAD_CAP + output.TAIL_CAP + 200
    assert kept.startswith("y\ny\n") and kept.endswith("y\n")
    assert "bytes of output dropped here" in kept
    assert "dropped" in str(err.value) and "stdout: the guest printed" in str(err.value)


def test_abort_check_is_polled_while_the_guest_floods(clock: FakeClock) -> None:
    calls: list[float] = []

    def abort_if() -> str | None:
        calls.append(clock.monotonic())
        return "domain kvmh-x is gone" if len(calls) >= 3 else None

    chan = FakeChannelDouble(clock, flood=True, max_chunks=20_000)
    with pytest.raises(GuestGone, match="domain kvmh-x is gone"):
        guest_on(chan).run("yes", timeout_s=600, abort_if=abort_if)
    assert len(calls) == 3
    # Asked once per ABORT_POLL_S of (fake) time, not once per chunk and not never.
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert all(output.ABORT_POLL_S <= g < output.ABORT_POLL_S + 0.01 for g in gaps), gaps
    assert chan.chunks < 3500


def test_large_output_that_ends_keeps_head_and_tail_and_says_what_was_dropped(
    clock: FakeClock,
) -> None:
    body = b"first_figure=7\n" + b"x" * (5 * MIB) + b"\nlast_figure=9\n"
    chan = FakeChannelDouble(clock, stdout=body, stderr=b"warning\n", status=0)
    got = guest_on(chan).run("big", timeout_s=600)
    assert got.exit_status == 0 and got.stderr == "warning\n"
    assert got.stdout.startswith("first_figure=7\n")
    assert got.stdout.endswith("\nlast_figure=9\n")
    dropped = len(body) - output.HEAD_CAP - output.TAIL_CAP
    assert f"[harness: {dropped} bytes of output dropped here]" in got.stdout
    assert got.dropped is not None and f"dropped {dropped} in between" in got.dropped
    assert "stderr" not in got.dropped


def test_output_that_arrives_after_the_exit_status_is_all_read(clock: FakeClock) -> None:
    # Seen with a real guest: the last 8 KiB of 64 MiB (with the figure printed last)
    # arrived after the exit status, and the reader stopped at the status.
    body = b"y" * (5 * CHUNK) + b"\nlast=9\n"
    chan = FakeChannelDouble(clock, stdout=body, status_first=True)
    got = guest_on(chan).run("flood", timeout_s=600)
    assert got.stdout == body.decode() and got.exit_status == 0


def test_small_output_is_returned_whole_and_nothing_is_reported_dropped(
    clock: FakeClock,
) -> None:
    chan = FakeChannelDouble(clock, stdout=b"out\n", stderr=b"err\n", status=7)
    got = guest_on(chan).run("echo", timeout_s=30)
    assert (got.exit_status, got.stdout, got.stderr, got.dropped) == (7, "out\n", "err\n", None)


@pytest.mark.parametrize("sizes", [[1] * 50, [7, 3, 100, 1, 64], [300], [0, 5, 0, 90, 2]])
def test_bounded_output_keeps_exactly_head_and_tail(sizes: list[int]) -> None:
    data = bytes(i % 251 for i in range(sum(sizes)))
    buf = BoundedOutput(head_cap=10, tail_cap=16)
    pos = 0
    for n in sizes:
        buf.feed(data[pos : pos + n])
        pos += n
        assert len(buf._head) + len(buf._tail) <= 10 + 2 * 16  # the memory bound
    assert buf.total == len(data)
    dropped = max(0, len(data) - 26)
    assert buf.dropped == dropped and buf.kept == len(data) - dropped
    text = buf.text()
    if dropped:
        head, tail = data[:10].decode(errors="replace"), data[-16:].decode(errors="replace")
        assert text == f"{head}\n[harness: {dropped} bytes of output dropped here]\n{tail}"
        assert buf.note("stdout") == (
            f"stdout: the guest printed {len(data)} bytes; kept the first 10 and the last 16, "
            f"dropped {dropped} in between"
        )
    else:
        assert text == data.decode(errors="replace") and buf.note("stdout") is None


def test_bounded_output_refuses_negative_caps() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        BoundedOutput(head_cap=-1)
