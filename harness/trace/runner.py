"""Run the tracer process (bpftrace, or the libbpf loader) beside the VMs under test.

The :class:`Tracer` starts the backend's process in its own process group,
returns from :meth:`Tracer.start` only after it reported its probes attached,
places host markers, fetches cumulative maps on demand (:meth:`Tracer.snapshot`)
and always ends the process: on :meth:`Tracer.stop`, on ``__exit__``, at
interpreter exit, and (when started from the main thread) when the harness
itself dies. Both backends print bpftrace's JSON lines (harness.trace.backend).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import os
import re
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Final

from harness.host.process import die_with_parent
from harness.trace.backend import Backend, BpftraceBackend, Choice, choose
from harness.trace.libbpf import LibbpfUnavailable
from harness.trace.model import ProbeNotAttached, TracerStatus, TraceSummary
from harness.trace.parse import (
    Attached,
    HistOutput,
    LostEvents,
    MapOutput,
    OtherOutput,
    Output,
    StackMapOutput,
    TraceParseError,
    TraceSnapshot,
    parse_line,
)
from harness.trace.probes import HostView, Probe, ProbeStatus
from harness.trace.program import (
    DEFAULT_STACK_DEPTH,
    HOST_DUMP_WHICH,
    HOST_MARKER_WHICH,
    READY_MESSAGE,
    ProgramError,
    TraceProgram,
    TraceTarget,
    stderr_filter,
)

#: Maps hold at most this many keys (bpftrace's default is 4096; per-vCPU and
#: per-error-code maps of long runs can pass that, and a full map drops updates).
MAP_KEYS_MAX: Final = 65536
STDERR_TAIL_LINES: Final = 40
STOP_GRACE_S: Final = 20.0
STOP_NUDGE_S: Final = 0.5

_LOST_RE = re.compile(r"Lost (\d+) events")
_live: weakref.WeakSet[Tracer] = weakref.WeakSet()


class TracerError(RuntimeError):
    """The tracer failed to start, died, or did not answer in time (message has its stderr)."""


def _s32(v: int) -> int:
    """getpriority()'s ``who`` is a C int: pass values >= 2**31 as their negative alias."""
    return v - (1 << 32) if v >= (1 << 31) else v


def host_marker(which: int, who: int) -> None:
    """Make the marker syscall; EINVAL is the expected result (no such ``which``)."""
    try:
        os.getpriority(which, _s32(who))
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    else:  # pragma: no cover - would mean the kernel accepts this `which`
        raise TracerError(f"getpriority({which:#x}, ...) succeeded; host markers would be lost")


class Tracer:
    """A tracer process tracing ``targets`` with ``probes``; use as a context manager.

    ``probes`` are catalogue entries (availability is checked on this host for
    the backend) or ready :class:`ProbeStatus` values (e.g. from a doctor run).
    ``backend`` defaults to bpftrace (``bpftrace`` is its executable).
    """

    def __init__(
        self,
        probes: Sequence[Probe] | Sequence[ProbeStatus],
        targets: Sequence[TraceTarget],
        *,
        workdir: Path,
        bpftrace: str = "bpftrace",
        view: HostView | None = None,
        session: int | None = None,
        stacks: Sequence[str] = (),
        stack_depth: int = DEFAULT_STACK_DEPTH,
        backend: Backend | None = None,
        backend_reason: str | None = None,
    ) -> None:
        self.backend: Backend = backend if backend is not None else BpftraceBackend(bpftrace)
        #: Why this backend runs (auto's choice, a fallback), recorded in summaries.
        self.backend_reason = backend_reason
        statuses = [p for p in probes if isinstance(p, ProbeStatus)]
        plain = [p for p in probes if isinstance(p, Probe)]
        if plain:
            statuses += self.backend.availability(plain, view)
        self.program: TraceProgram = self.backend.generate(
            statuses, targets, session=session, stacks=stacks, stack_depth=stack_depth
        )
        self.workdir = workdir
        self.status: TracerStatus = "not-started"
        self.error: str | None = None
        self.attached_probes: int | None = None
        #: time.monotonic_ns() when bpftrace's BEGIN ran (all probes attached).
        self.attached_ns: int | None = None
        self.lost_events = 0
        self._proc: subprocess.Popen[str] | None = None
        self._cond = threading.Condition()
        self._dump_lock = threading.Lock()
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._batch = TraceSnapshot()
        self._dumps: dict[int, TraceSnapshot] = {}
        self._final: TraceSnapshot | None = None
        self._eof = False
        self._seq = 0
        self._last_done = 0
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self.program_path = workdir / self.backend.program_file
        self.output_path = workdir / "trace.jsonl"

    # --- lifecycle ---------------------------------------------------------------

    def start(self, timeout_s: float = 30) -> None:
        """Write the program, start the tracer, and wait until its probes are attached.

        "Attached" means the ready line was printed (bpftrace's BEGIN probe runs
        after all other probes are attached; the loader prints it after its
        last attach) and a dump request came back through the marker probe;
        bpftrace's ``attached_probes`` line alone is printed before attaching.
        """
        if self._proc is not None:
            raise TracerError("tracer already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.program_path.write_text(self.program.text)
        env = dict(os.environ, BPFTRACE_MAP_KEYS_MAX=str(MAP_KEYS_MAX))
        main = threading.current_thread() is threading.main_thread()
        self._proc = subprocess.Popen(
            self.backend.command(self.program_path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # Ctrl-C of the harness must not hit bpftrace directly
            # PDEATHSIG follows the *thread* that forked: only safe from the main thread.
            preexec_fn=die_with_parent if main else None,
        )
        _live.add(self)
        assert self._proc.stdout is not None and self._proc.stderr is not None
        for target, stream in ((self._read_stdout, self._proc.stdout),
                               (self._read_stderr, self._proc.stderr)):
            t = threading.Thread(target=target, args=(stream,), daemon=True,
                                 name=f"bpftrace-{target.__name__}")
            t.start()
            self._threads.append(t)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.attached_ns is None and not self._eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            attached = self.attached_ns is not None
        if not attached:
            why = "exited" if self._eof else f"did not attach within {timeout_s:.0f} s"
            self.kill()
            self.status = "died" if why == "exited" else "not-started"
            self.error = (
                f"{self.backend.name} {why} ({self._rc_text()}); stderr:\n{self.stderr_tail()}"
            )
            raise TracerError(self.error)
        self.status = "ok"
        # Round trip through the marker probe: proves maps and dumps work end to end.
        try:
            self.snapshot(timeout_s=max(1.0, deadline - time.monotonic()))
        except TracerError:
            self.kill()
            self.status = "not-started"
            raise

    def alive(self) -> bool:
        """True while the tracer process runs."""
        return self._proc is not None and self._proc.poll() is None

    def mark_phase(self, target: TraceTarget, phase: int) -> int:
        """Host marker: VM ``target`` enters host-window ``phase``; returns time.monotonic_ns().

        The tracepoint fires inside the syscall, so the phase is switched in
        the kernel before this returns.
        """
        if not 0 <= phase <= 0xFFFF:
            raise ValueError(f"phase: {phase} is not in 0..65535")
        if target not in self.program.targets:
            raise ValueError(f"target {target} is not traced by this tracer")
        host_marker(HOST_MARKER_WHICH, (target.token << 16) | phase)
        return time.monotonic_ns()

    def snapshot(self, timeout_s: float = 10) -> TraceSnapshot:
        """Cumulative maps now, without stopping bpftrace (a dump request).

        Safe from several threads (one per VM): dumps are taken one at a time,
        because two in flight would interleave their maps on bpftrace's output.
        """
        with self._dump_lock:
            return self._snapshot(timeout_s)

    def _snapshot(self, timeout_s: float) -> TraceSnapshot:
        self._check_alive()
        self._seq = self._seq % 0xFFFF + 1
        seq = self._seq
        with self._cond:
            self._dumps.pop(seq, None)
        host_marker(HOST_DUMP_WHICH, (self.program.session << 16) | seq)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while seq not in self._dumps and not self._eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            snap = self._dumps.pop(seq, None)
        if snap is None:
            self._note_death()
            raise TracerError(
                f"dump {seq} not answered within {timeout_s:.0f} s ({self._rc_text()}); "
                f"stderr:\n{self.stderr_tail()}"
            )
        snap.stderr_tail = self.stderr_tail()
        return snap

    def stop(self, timeout_s: float = STOP_GRACE_S) -> TraceSnapshot:
        """SIGINT bpftrace, collect the maps it prints at exit, and wait for it.

        Escalates to SIGKILL after ``timeout_s``. A tracer that had already
        died returns what it printed (possibly nothing) and keeps status "died".
        """
        if self._proc is None:
            raise TracerError("tracer was never started")
        died_before = self._proc.poll() is not None and not self._stopping
        self._stopping = True
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    self._proc.wait(STOP_NUDGE_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    self.error = f"bpftrace ignored SIGINT for {timeout_s:.0f} s and was killed"
                    break
                # bpftrace 0.17 sometimes takes SIGINT on a thread other than its
                # output loop, which then sleeps until the next perf event (counting
                # makes none): about one stop in three hung here for the full grace
                # time. A dump request with the last, already answered, sequence
                # number is such an event; the reader folds it into the final maps.
                host_marker(HOST_DUMP_WHICH, (self.program.session << 16) | self._seq)
        for t in self._threads:
            t.join(timeout=5)
        if died_before:
            self._note_death()
        with self._cond:
            final = self._final or self._batch
        final.final = True
        final.stderr_tail = self.stderr_tail()
        final.lost_events = self.lost_events
        final.taken_ns = time.monotonic_ns()
        _live.discard(self)
        return final

    def kill(self) -> None:
        """SIGKILL bpftrace's process group (idempotent)."""
        p = self._proc
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(10)
        _live.discard(self)

    def __enter__(self) -> Tracer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
        for t in self._threads:
            t.join(timeout=5)

    # --- reporting ---------------------------------------------------------------

    def stderr_tail(self) -> str:
        """The last lines bpftrace wrote to stderr, minus its harmless warnings."""
        with self._cond:
            return stderr_filter("\n".join(self._stderr))

    def summary(
        self, snapshot: TraceSnapshot | None = None, pid: int | None = None
    ) -> TraceSummary:
        """What to record in the result: probes, status, lost events, program digests.

        ``events_total`` counts the events of the target with QEMU pid ``pid``
        (all targets when None): with several VMs each record counts its own.
        """
        if self._proc is not None and self.status == "ok" and not self.alive() \
                and not self._stopping:
            self._note_death()
        events = 0
        if snapshot is not None:
            totals = snapshot.counter("total")
            events = sum(n for k, n in totals.items() if pid is None or k[0] == pid)
        return TraceSummary(
            probes_attached=[s.probe.name for s in self.program.attached],
            probes_not_attached=[ProbeNotAttached(probe=s.probe.name, reason=s.reason)
                                 for s in self.program.not_attached],
            events_total=events,
            lost_events=self.lost_events,
            tracer_status=self.status,
            tracer_error=self.error,
            program_sha256=self.program.sha256,
            program_template_sha256=self.program.template_sha256,
            backend=self.program.backend,
            backend_reason=self.backend_reason,
        )

    # --- internals ---------------------------------------------------------------

    def _rc_text(self) -> str:
        rc = None if self._proc is None else self._proc.poll()
        if rc is None:
            return "still running"
        return f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"

    def _note_death(self) -> None:
        if self._proc is not None and self._proc.poll() is not None and not self._stopping:
            self.status = "died"
            self.error = (
                f"{self.backend.name} died during the run ({self._rc_text()}); stderr:\n"
                f"{self.stderr_tail() or '(empty)'}"
            )

    def _check_alive(self) -> None:
        if self._proc is None:
            raise TracerError("tracer was never started")
        if self._proc.poll() is not None:
            self._note_death()
            raise TracerError(
                self.error or f"{self.backend.name} is not running ({self._rc_text()})"
            )

    def _read_stdout(self, stream: IO[str]) -> None:
        # Raw output is kept beside the program: small (maps, not events) and it
        # lets a crashed run be re-parsed with parse.snapshot_from_lines().
        with open(self.output_path, "w", encoding="utf-8") as raw:
            for line in stream:
                raw.write(line)
                raw.flush()
                self._on_line(line)
        with self._cond:
            self._final = self._batch
            self._eof = True
            self._cond.notify_all()

    def _on_line(self, line: str) -> None:
        try:
            out = parse_line(line)
        except TraceParseError as e:
            with self._cond:
                self._stderr.append(f"[unparsed stdout] {e}")
            return
        if out is not None:
            self._on_output(out)

    def _on_output(self, out: Output) -> None:
        with self._cond:
            if isinstance(out, Attached):
                self.attached_probes = out.probes
            elif isinstance(out, OtherOutput) and out.type == "printf" \
                    and out.data == f"{READY_MESSAGE} {self.program.session}\n":
                self.attached_ns = time.monotonic_ns()
            elif isinstance(out, LostEvents):
                self.lost_events += out.count
            elif isinstance(out, MapOutput | HistOutput | StackMapOutput):
                self._batch.add(out)
                if isinstance(out, MapOutput) and out.name == "dump_done":
                    seq = out.values.get(())
                    # bpftrace reprints a stale @dump_done at exit: only a new seq ends a dump.
                    if seq is not None and seq == self._seq and seq != self._last_done:
                        self._last_done = seq
                        self._batch.seq = seq
                        self._batch.taken_ns = time.monotonic_ns()
                        self._batch.lost_events = self.lost_events
                        self._dumps[seq] = self._batch
                        self._batch = TraceSnapshot()
            self._cond.notify_all()

    def _read_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            m = _LOST_RE.search(line)
            with self._cond:
                if m:
                    self.lost_events += int(m.group(1))
                self._stderr.append(line.rstrip("\n"))


class BackendStartError(TracerError):
    """No tracer of the backend asked for could be started (``backend`` names the last tried)."""

    def __init__(self, message: str, backend: str) -> None:
        super().__init__(message)
        self.backend = backend


def start_backend(
    asked: str,
    make: Callable[[Choice], Tracer],
    enter: Callable[[Tracer], object],
) -> Tracer:
    """Make and start a tracer of backend ``asked`` (auto, bpftrace, libbpf).

    ``make`` builds the tracer for a choice and ``enter`` registers it for
    teardown before it starts. With ``auto``, a libbpf backend that cannot be
    built, configured (more VMs than it traces) or started is replaced by
    bpftrace, and the tracer's ``backend_reason`` says why. Raises
    BackendStartError when no tracer starts.
    """
    try:
        choice = choose(asked)
    except LibbpfUnavailable as exc:
        raise BackendStartError(str(exc), "libbpf") from exc
    try:
        tracer = make(choice)
        enter(tracer)
        tracer.start()
        return tracer
    except (TracerError, ProgramError) as exc:
        if not (asked == "auto" and choice.backend.name == "libbpf"):
            raise BackendStartError(str(exc), choice.backend.name) from exc
        lines = str(exc).strip().splitlines()
        why = lines[-1] if lines else type(exc).__name__
    fallback = make(Choice(BpftraceBackend(), f"auto: the libbpf backend did not start ({why}); "
                                              "bpftrace"))
    enter(fallback)
    try:
        fallback.start()
    except TracerError as exc:
        raise BackendStartError(str(exc), "bpftrace") from exc
    return fallback


@atexit.register
def _kill_live_tracers() -> None:
    """Last line of defence: no bpftrace outlives the interpreter."""
    for t in list(_live):
        t.kill()
