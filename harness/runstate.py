"""The run being recorded, shared by the orchestrator and every platform.

Below the platforms on purpose: platforms record into the run through this
module, never through ``harness.run`` (which imports them). Several VMs may
run at once, each driven from its own thread, so every change to the result
and every write of the result file happens under :attr:`RunState.lock`.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from harness.progress import Reporter
from harness.results import RunResult, write_atomic
from harness.trace.program import DEFAULT_STACK_DEPTH

T = TypeVar("T")


class Cancelled(Exception):
    """The run is being torn down (SIGINT/SIGTERM or a failed neighbour); stop quietly."""


@dataclass
class RunState:
    """The run being recorded: where it lives, how to persist it, and whether to stop."""

    result: RunResult
    path: Path
    run_dir: Path
    reporter: Reporter
    trace_enabled: bool
    probe_names: list[str]
    #: Probes (or the "stacks" group) whose kernel stacks are counted, their depth,
    #: and whether frames keep their offsets (TraceSpec).
    stack_probes: list[str] = field(default_factory=list)
    stack_depth: int = DEFAULT_STACK_DEPTH
    stack_offsets: bool = False
    #: The tracer backend asked for: auto, bpftrace or libbpf (harness.trace.backend).
    trace_backend: str = "auto"
    #: Held while the result is changed or written; re-entrant so save() nests.
    lock: threading.RLock = field(default_factory=threading.RLock)
    #: Set when the run is torn down (a signal, or a round that cannot go on):
    #: VM threads stop at their next step, SSH waits end early.
    cancel: threading.Event = field(default_factory=threading.Event)
    #: Why the last write of the result file failed (a full disk); None once one succeeds.
    save_error: str | None = None
    _phase_no: dict[str, int] = field(default_factory=dict)
    _tokens: set[int] = field(default_factory=set)
    _closed: bool = False

    def save(self) -> None:
        """Rewrite the result file atomically (a no-op once the run is closed)."""
        with self.lock:
            if not self._closed:
                self._write()

    def close(self) -> None:
        """Write the file a last time; later saves from straggling VM threads are ignored."""
        with self.lock:
            try:
                self._write()
            finally:
                self._closed = True

    def _write(self) -> None:
        try:
            write_atomic(self.result, self.path)
        except OSError as exc:
            self.save_error = str(exc)
            raise
        self.save_error = None

    def next_phase(self, vm_boot: str) -> int:
        """Phase numbers are unique per boot: they key the tracer's maps."""
        with self.lock:
            self._phase_no[vm_boot] = self._phase_no.get(vm_boot, 0) + 1
            return self._phase_no[vm_boot]

    def new_token(self) -> int:
        """A marker token (1..65535) no other VM of this run has: markers name their VM."""
        with self.lock:
            while (token := secrets.randbelow(0xFFFF) + 1) in self._tokens:
                pass
            self._tokens.add(token)
            return token

    def error(self, text: str) -> None:
        """Record a run-level error and save."""
        with self.lock:
            self.result.errors.append(text)
            self.save()

    def check_cancel(self) -> None:
        """Raise :class:`Cancelled` once the run is being torn down."""
        if self.cancel.is_set():
            raise Cancelled("the run is being torn down")


class Teardown:
    """A thread-safe stack of clean-up callbacks, run last-in first-out.

    A VM thread registers what it starts while the main thread may already be
    tearing down (SIGINT): anything registered after :meth:`close` is undone
    at once, so nothing started late outlives the run.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], object]] = []
        self._closed = False

    def callback(self, fn: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """Call ``fn(*args, **kwargs)`` at close (now, if already closed)."""
        with self._lock:
            if not self._closed:
                self._callbacks.append(lambda: fn(*args, **kwargs))
                return
        fn(*args, **kwargs)

    def enter(self, cm: AbstractContextManager[T]) -> T:
        """Enter ``cm`` and exit it at close."""
        value = cm.__enter__()
        self.callback(cm.__exit__, None, None, None)
        return value

    def close(self) -> list[BaseException]:
        """Run every callback once, newest first; returns what they raised (all are run)."""
        with self._lock:
            self._closed = True
            callbacks, self._callbacks = self._callbacks[::-1], []
        errors: list[BaseException] = []
        interrupt: BaseException | None = None
        for fn in callbacks:
            try:
                fn()
            except Exception as exc:  # one failed clean-up must not skip the others
                errors.append(exc)
            except BaseException as exc:  # SIGINT mid-teardown: finish tearing down first
                interrupt = interrupt or exc
        if interrupt is not None:
            raise interrupt
        return errors
