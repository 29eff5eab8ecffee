"""A per-event tracing peer for the tracer-overhead benchmark: raw tracefs recording.

``trace-cmd record -e kvm -e kvmmmu`` would be the natural peer, but it fails
on these hosts: it writes "1" to /proc/sys/kernel/ftrace_enabled, which gets
EPERM ("Can't enable ftrace: Operation not permitted"; seen with strace).
The tracefs files themselves work, so this module does what trace-cmd does
for events: enable whole event systems, read every CPU's ``trace_pipe_raw``
into a file with one reader thread per CPU, and report the bytes read and the
events the ring buffer lost.

It records in a private tracefs *instance* (``instances/<name>``) so it never
touches the global buffer, other instances or bpftrace; leaving restores
everything: tracing off, events disabled, pid filter cleared, instance removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

TRACEFS = Path("/sys/kernel/tracing")
INSTANCE_PREFIX = "kvmh-peer-"
_READ_SIZE = 1 << 16  # trace_pipe_raw returns at most one ring-buffer page per read


@dataclass(frozen=True)
class CpuStats:
    """One CPU's ring buffer as the kernel counts it, plus what the reader wrote."""

    cpu: int
    bytes_written: int  # bytes of raw pages this recorder wrote to its file
    entries: int  # events still in the buffer, not yet read
    overrun: int  # events overwritten before they were read (lost)
    commit_overrun: int  # events lost while the buffer wrapped during a write
    dropped_events: int  # events refused because the buffer was full (lost)
    read_events: int  # events consumed by the reader


@dataclass(frozen=True)
class RecorderStats:
    """A snapshot of a recording; ``lost`` counts every event the peer did not get."""

    instance: str
    systems: tuple[str, ...]
    pids: tuple[int, ...]  # threads of `pid` when recording began (empty: all tasks)
    per_cpu: tuple[CpuStats, ...]

    @property
    def bytes_written(self) -> int:
        return sum(c.bytes_written for c in self.per_cpu)

    @property
    def read_events(self) -> int:
        return sum(c.read_events for c in self.per_cpu)

    @property
    def lost(self) -> int:
        return sum(c.overrun + c.commit_overrun + c.dropped_events for c in self.per_cpu)


class TracefsError(RuntimeError):
    """tracefs is missing or refused a setting; the message names the file."""


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise TracefsError(f"{path}: cannot write {value!r}: {e}") from e


def _online_cpus(tracefs: Path) -> list[int]:
    return sorted(int(p.name[3:]) for p in (tracefs / "per_cpu").glob("cpu[0-9]*"))


def _parse_stats(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z ]+):\s+(\d+)$", line.strip())
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def _page_data_bytes(page: bytes) -> int:
    """Bytes of events in a raw ring-buffer page (header: u64 timestamp, u64 commit).

    The top bits of ``commit`` flag missed events; the low 20 bits are the size.
    """
    return int.from_bytes(page[8:16], "little") & 0xFFFFF if len(page) >= 16 else 0


def _threads_of(pid: int) -> list[int]:
    """All thread ids of process ``pid``: set_event_pid matches threads, not processes."""
    try:
        return sorted(int(t.name) for t in Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError as e:
        raise ValueError(f"pid {pid}: no such process (/proc/{pid} is missing)") from e


class _CpuReader(threading.Thread):
    """Copy one CPU's trace_pipe_raw into a file until stopped, then drain it."""

    def __init__(self, src: Path, dst: Path) -> None:
        super().__init__(name=f"tracefs-{src.parent.name}", daemon=True)
        self.src, self.dst = src, dst
        self.bytes = 0
        self.error: BaseException | None = None
        self._stop_evt = threading.Event()

    def stop(self) -> None:
        self._stop_evt.set()

    def run(self) -> None:
        try:
            fd = os.open(self.src, os.O_RDONLY | os.O_NONBLOCK)
            try:
                with self.dst.open("wb") as out:
                    poller = select.poll()
                    poller.register(fd, select.POLLIN)
                    while not self._stop_evt.is_set():
                        # Wakes when the buffer is `buffer_percent` (50) full, as
                        # trace-cmd's splice does; the timeout checks for stop.
                        poller.poll(100)
                        self._copy_available(fd, out, until_caught_up=True)
                    self._copy_available(fd, out, until_caught_up=False)  # the rest
            finally:
                os.close(fd)
        except BaseException as e:  # surfaced by TracefsRecorder.__exit__
            self.error = e

    def _copy_available(self, fd: int, out: BinaryIO, *, until_caught_up: bool) -> None:
        """Copy pages until none is left or, if ``until_caught_up``, one is under half full.

        A read takes the page the kernel is writing if no full one is ready, so
        draining "until empty" while events flow reads a stream of nearly empty
        pages (measured: 80 % of pages under 512 bytes). A half-empty page means
        the reader has caught up with the writer: wait again.
        """
        while True:
            try:
                chunk = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                return
            if not chunk:
                return
            out.write(chunk)
            self.bytes += len(chunk)
            if until_caught_up and _page_data_bytes(chunk) < len(chunk) // 2:
                return


class TracefsRecorder:
    """Record every event of ``systems`` (optionally only ``pid``'s threads) to ``out_dir``.

    ``out_dir/cpuN.raw`` holds CPU N's raw ring-buffer pages (the format of
    ``trace_pipe_raw``, as trace-cmd stores them). Use as a context manager;
    :meth:`stats` works while recording and returns the final numbers after.
    ``buffer_size_kb`` sets the per-CPU ring buffer (kernel default if None).
    """

    def __init__(
        self,
        out_dir: Path,
        systems: Sequence[str] = ("kvm", "kvmmmu"),
        pid: int | None = None,
        *,
        buffer_size_kb: int | None = None,
        tracefs: Path = TRACEFS,
    ) -> None:
        if not (tracefs / "instances").is_dir():
            raise TracefsError(
                f"{tracefs}/instances: tracefs is not mounted; mount -t tracefs nodev {tracefs}"
            )
        if not systems:
            raise ValueError("systems: give at least one event system, e.g. ('kvm',)")
        for system in systems:
            if not (tracefs / "events" / system / "enable").exists():
                raise ValueError(
                    f"systems: no event system {system!r} in {tracefs}/events "
                    "(is its module loaded? see available_events)"
                )
        self.out_dir = out_dir
        self.systems = tuple(systems)
        self.pid = pid
        self.buffer_size_kb = buffer_size_kb
        self.tracefs = tracefs
        self.name = f"{INSTANCE_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.inst = tracefs / "instances" / self.name
        self._pids: tuple[int, ...] = ()
        self._readers: dict[int, _CpuReader] = {}
        self._final: RecorderStats | None = None

    def __enter__(self) -> TracefsRecorder:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.pid is not None:
            _threads_of(self.pid)  # fail early, before creating anything
        try:
            self.inst.mkdir()
        except OSError as e:
            raise TracefsError(f"{self.inst}: cannot create a tracefs instance: {e}") from e
        try:
            _write(self.inst / "tracing_on", "0")
            if self.buffer_size_kb is not None:
                _write(self.inst / "buffer_size_kb", str(self.buffer_size_kb))
            if self.pid is not None:
                self._pids = self._filter_pid(self.pid)
            for system in self.systems:
                _write(self.inst / "events" / system / "enable", "1")
            for cpu in _online_cpus(self.inst):
                reader = _CpuReader(
                    self.inst / "per_cpu" / f"cpu{cpu}" / "trace_pipe_raw",
                    self.out_dir / f"cpu{cpu}.raw",
                )
                reader.start()
                self._readers[cpu] = reader
            _write(self.inst / "tracing_on", "1")
        except BaseException:
            self._teardown()
            raise
        return self

    def _filter_pid(self, pid: int) -> tuple[int, ...]:
        """Trace only ``pid``'s threads, including those it creates from now on.

        set_event_pid matches thread ids. event-fork adds threads created after
        the first write; the threads that existed before are read from /proc
        afterwards and appended, so none created in between is missed (a QEMU
        started just before makes its vCPU threads during that window).
        """
        _write(self.inst / "options" / "event-fork", "1")
        _write(self.inst / "set_event_pid", str(pid))
        threads = tuple(_threads_of(pid))
        try:
            # O_APPEND adds to the list instead of replacing it (os.open: Python's
            # "a" mode also seeks, which tracefs refuses).
            fd = os.open(self.inst / "set_event_pid", os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, " ".join(map(str, threads)).encode())
            finally:
                os.close(fd)
        except OSError as e:
            raise TracefsError(f"{self.inst}/set_event_pid: cannot add {threads}: {e}") from e
        return threads

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._teardown()
        errors = [r.error for r in self._readers.values() if r.error is not None]
        if errors and exc is None:
            raise TracefsError(f"{self.inst}: a trace_pipe_raw reader failed: {errors[0]}")

    def _teardown(self) -> None:
        """Stop tracing, drain the readers, snapshot stats, then undo every setting."""
        with contextlib.suppress(OSError):
            (self.inst / "tracing_on").write_text("0")
        for reader in self._readers.values():
            reader.stop()
        for reader in self._readers.values():
            reader.join(timeout=30)
        if self.inst.exists():
            with contextlib.suppress(OSError):
                self._final = self._snapshot()
        remove_instance(self.inst)

    def _snapshot(self) -> RecorderStats:
        per_cpu = []
        for cpu in _online_cpus(self.inst):
            s = _parse_stats((self.inst / "per_cpu" / f"cpu{cpu}" / "stats").read_text())
            reader = self._readers.get(cpu)
            per_cpu.append(
                CpuStats(
                    cpu=cpu,
                    bytes_written=reader.bytes if reader else 0,
                    entries=s.get("entries", 0),
                    overrun=s.get("overrun", 0),
                    commit_overrun=s.get("commit overrun", 0),
                    dropped_events=s.get("dropped events", 0),
                    read_events=s.get("read events", 0),
                )
            )
        return RecorderStats(self.name, self.systems, self._pids, tuple(per_cpu))

    def stats(self) -> RecorderStats:
        """Live numbers while recording; the final numbers after the ``with`` block."""
        if self._final is not None:
            return self._final
        if not self.inst.exists():
            raise TracefsError(f"{self.inst}: not recording (use TracefsRecorder as `with`)")
        return self._snapshot()


def remove_instance(inst: Path) -> None:
    """Disable everything in tracefs instance ``inst`` and remove it (no error if gone)."""
    if not inst.exists():
        return
    for setting, value in (("tracing_on", "0"), ("events/enable", "0"), ("set_event_pid", "")):
        with contextlib.suppress(OSError):
            (inst / setting).write_text(value)
    try:
        inst.rmdir()  # frees the instance's ring buffers
    except OSError as e:
        raise TracefsError(f"{inst}: cannot remove the instance: {e}; rmdir it by hand") from e


def remove_stale_instances(tracefs: Path = TRACEFS) -> list[str]:
    """Remove recorder instances whose creating process is gone; return their names."""
    removed = []
    for inst in (tracefs / "instances").glob(f"{INSTANCE_PREFIX}*"):
        m = re.match(rf"^{INSTANCE_PREFIX}(\d+)-", inst.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            remove_instance(inst)
            removed.append(inst.name)
    return removed
