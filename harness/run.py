"""The orchestrator: a validated suite in, a result file out.

One loop, whatever the guests are. The suite is cut into rounds: a VM on its
own is a round of one; the VMs of a ``[[groups]]`` entry run their boots
side by side, one round per boot. Each round:

    boot every VM (in parallel, each in its own thread; platform: start,
        wait until the tracer may attach: paused, or SSH answering)
    ─► one tracer attached to all of them (one program, one target per VM)
    ─► drive every VM (in parallel; platform: run and mark its phases,
        write each finished phase into the result file), then tear it down
    ─► tracer stopped ─► per-VM trace summaries ─► self-driven phases collected

What differs between kinds of guest lives in ``harness.platform``. Everything
started is registered for teardown as it is started, so an exception,
SIGINT or SIGTERM undoes it in reverse, in every VM at once; the result file
already holds every finished phase and is marked incomplete. Signals reach
the main thread only, so the main thread is always the one waiting.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from itertools import zip_longest
from pathlib import Path
from types import FrameType

import libvirt

from harness import __version__, tracing
from harness.analysis.steady import steady_state_notes
from harness.host.facts import collect_host_facts
from harness.host.load import LoadSampler
from harness.host.mmuconfig import (
    HOST_RESTORE_DIR,
    HostConfigRecord,
    describe_left_changed,
    leftover_changes,
)
from harness.paths import RESULTS_DIR, cache_dir
from harness.platform import platform_for
from harness.platform.base import BootPlan, RunContext, Session
from harness.progress import QuietReporter, Reporter
from harness.results import (
    MetricInfo,
    RunResult,
    SuiteRef,
    VmRecord,
    WorkloadInfo,
    mark_killed,
)
from harness.runstate import Cancelled, RunState, Teardown
from harness.spec import Suite
from harness.trace.program import TraceTarget
from harness.trace.runner import Tracer, TracerError
from harness.vm import lifecycle

#: How long VM threads get to notice a teardown before the run ends without them.
THREAD_GRACE_S = 30.0


class RunInterrupted(BaseException):
    """SIGINT or SIGTERM arrived; the run stops after cleaning up.

    A BaseException, like KeyboardInterrupt, so that no library's
    ``except Exception`` on the way up can swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def new_run_id() -> str:
    """Sortable by time, unique across hosts that start in the same second."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(2)}"


def run_suite(
    suite: Suite,
    *,
    results_dir: Path = RESULTS_DIR,
    reporter: Reporter | None = None,
    trace: bool | None = None,
    command_line: Sequence[str] = (),
    stacks: Sequence[str] | None = None,
    host_config: HostConfigRecord | None = None,
    backend: str | None = None,
) -> RunState:
    """Run every workload of ``suite`` and write ``results_dir/<run-id>.json``.

    ``host_config`` is the host MMU configuration applied around this run
    (by the caller), recorded in the result. ``backend`` overrides the suite's
    ``[trace] backend`` (auto, bpftrace or libbpf). Returns the final state; raises
    RunInterrupted on SIGINT/SIGTERM after cleaning up and marking the result
    incomplete.
    """
    reporter = reporter or QuietReporter()
    run_id = new_run_id()
    facts = collect_host_facts()
    result = RunResult(
        run_id=run_id,
        status="running",
        started_at=datetime.now(UTC),
        harness_version=__version__,
        command_line=list(command_line),
        suite=SuiteRef(name=suite.spec.name, path=str(suite.path), sha256=suite.sha256),
        host=facts,
        host_config=host_config,
        workloads={
            name: WorkloadInfo(
                description=w.description,
                metrics={
                    m.name: MetricInfo(unit=m.unit, higher_is_better=m.higher_is_better)
                    for phase in w.phases
                    for m in phase.metrics
                },
            )
            for name, w in suite.workloads.items()
        },
    )
    runs_dir = cache_dir() / "runs"
    state = RunState(
        result,
        results_dir / f"{run_id}.json",
        runs_dir / run_id,
        reporter,
        suite.spec.trace.enabled if trace is None else trace,
        list(suite.spec.trace.probes),
        stack_probes=list(suite.spec.trace.stacks if stacks is None else stacks),
        stack_depth=suite.spec.trace.stack_depth,
        stack_offsets=suite.spec.trace.stack_offsets,
        trace_backend=suite.spec.trace.backend if backend is None else backend,
    )
    conn = lifecycle.connect()
    sampler = LoadSampler(
        lambda: {v.qemu_pid for v in list(result.vms) if v.qemu_pid is not None}
    ).start()
    try:
        def killed(run_dir: Path, result_file: Path, owner: str) -> bool:
            with contextlib.suppress(OSError):
                why = (run_dir / SAVE_ERROR_FILE).read_text().strip()
                return mark_killed(
                    result_file,
                    f"failed: its harness process (pid {owner}) could not write this file "
                    f"({why}) and stopped; run {run_id} found its leftovers at "
                    f"{datetime.now(UTC).isoformat(timespec='seconds')}; the phases recorded "
                    "before are kept as they were",
                    status="failed",
                )
            return mark_killed(
                result_file,
                f"killed: its harness process (pid {owner}) was gone when run {run_id} found "
                f"its leftovers at {datetime.now(UTC).isoformat(timespec='seconds')}; the "
                "phases recorded before are kept as they were",
            )

        for note in lifecycle.reap_leftovers(conn, runs_dir, reporter.step, killed):
            result.notes.append(f"reaped leftover of a killed run: {note}")
        note_host_left_changed(result, reporter)
        lifecycle.claim_run_dir(state.run_dir, state.path)
        state.save()
        reporter.step(f"run {run_id}: results in {state.path}")
        ctx = RunContext(state, conn, facts)
        with signals_raise(), contextlib.ExitStack() as stack:
            stack.callback(_remove_run_dir, state)
            for plans in plan_rounds(suite):
                _run_round(ctx, plans)
        with state.lock:
            # Complete means everything asked for was measured, traces included.
            ok = all(r.status == "ok" for r in result.runs) and not result.errors
            result.status = "complete" if ok else "failed"
    except RunInterrupted as exc:
        with state.lock:
            result.status = "incomplete"
            result.errors.append(f"interrupted by {exc} before the suite finished")
        raise
    except BaseException as exc:
        with state.lock:
            result.status = "incomplete" if isinstance(exc, KeyboardInterrupt) else "failed"
            result.errors.append(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        try:
            with state.lock:
                result.finished_at = datetime.now(UTC)
                # What the run measured must reach its file even if these summaries fail.
                try:
                    result.host_load = sampler.stop()
                    result.steady_state = steady_state_notes(result)
                except Exception as exc:
                    result.notes.append(f"host load / steady-state check failed: {exc!r}")
                state.close()  # raises on a full disk: the message names the file
        finally:
            with contextlib.suppress(libvirt.libvirtError):  # a lost libvirtd: nothing to close
                conn.close()
    return state


def note_host_left_changed(
    result: RunResult, reporter: Reporter, records: Path | None = None
) -> None:
    """Record (and report) host settings that other harness runs changed and left changed.

    Every run looks, not only host-changing ones: after a host-changing run was
    SIGKILLed, a plain run would otherwise measure a changed host and record
    ``host_config = None`` as if it were not. Only reads; restoring is for
    ``harness host restore`` or the next ``--allow-host-changes`` run.
    """
    left, problems = leftover_changes(records or cache_dir() / HOST_RESTORE_DIR)
    result.host_left_changed = left
    result.notes += [f"host restore record: {p}" for p in problems]
    for item in left:
        reporter.step(f"warning: {describe_left_changed(item)}")


def plan_rounds(suite: Suite) -> list[list[BootPlan]]:
    """The boots of the suite, as rounds of boots that run at the same time.

    A VM outside any group makes rounds of one. A group makes one round per
    boot index of its members (the micro guest boots once per repetition),
    placed where its first member appears among the suite's VMs.
    """
    group_of = {name: g for g in suite.spec.groups for name in g.vms}
    rounds: list[list[BootPlan]] = []
    done: set[str] = set()
    for vm in suite.spec.vms:
        if vm.name in done:
            continue
        group = group_of.get(vm.name)
        members = [suite.spec.vm(n) for n in group.vms] if group else [vm]
        done |= {m.name for m in members}
        boots = [
            platform_for(m.image).plan(
                suite,
                m,
                [r for r in suite.spec.runs if r.vm == m.name],
                group.name if group else None,
            )
            for m in members
        ]
        rounds += [[b for b in r if b is not None] for r in zip_longest(*boots)]
    return rounds


class _Unit:
    """A session in a round: its own teardown, its thread, what it raised."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.teardown = Teardown()
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        #: Set when the thread's work has ended. Waited on instead of Thread.join:
        #: a join that SIGINT interrupts makes Python 3.11 take the thread for
        #: stopped (its tstate lock is released), so later joins return at once
        #: and the run would exit while the thread still works (an image build).
        self.done = threading.Event()

    @property
    def name(self) -> str:
        return self.session.plan.name

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the thread's work has ended (True) or ``timeout`` passed."""
        return self.thread is None or self.done.wait(timeout)


def _run_round(ctx: RunContext, plans: list[BootPlan]) -> None:
    """Boot, trace, drive and collect the VMs of one round; see the module docstring."""
    state = ctx.state
    units = [_Unit(platform_for(p.vm.image).session(ctx, p)) for p in plans]
    shared = Teardown()  # the tracer: outlives every VM of the round
    try:
        _in_threads(units, lambda u: _boot(u, state))
        if failed := [u for u in units if u.error is not None]:
            # Neighbours measured without the neighbour they were meant to have
            # would be mislabelled: a failed boot ends the round for all.
            raise _first_error(state, failed)
        traced = [_booted(u.session) for u in units]
        label = units[0].name if len(units) == 1 else f"{plans[0].group}-{units[0].name}"
        tracer = tracing.start_tracer(state, traced, shared, label)
        _in_threads(units, lambda u: _drive(u, tracer))
        snapshot = None if tracer is None else tracing.finish_tracer(state, tracer, traced)
        for u in units:
            try:
                u.session.collect(snapshot)
            except Exception as exc:  # one VM's records must not cost the others theirs
                u.error = u.error or exc
        if failed := [u for u in units if u.error is not None]:
            raise _first_error(state, failed)
    except BaseException:
        state.cancel.set()
        raise
    finally:
        # Everything of the round is undone, also for VMs whose threads are stuck,
        # and also when SIGINT arrives in the middle of undoing it.
        pending: BaseException | None = None
        for teardown in [*(u.teardown for u in units), shared]:
            try:
                teardown.close()
            except BaseException as exc:
                pending = pending or exc
        for u in units:
            u.wait(THREAD_GRACE_S if state.cancel.is_set() else None)
        if pending is not None:
            raise pending


def _boot(u: _Unit, state: RunState) -> None:
    try:
        u.session.boot(u.teardown)
    except BaseException:
        # The round will not run: neighbours still booting stop waiting for SSH.
        state.cancel.set()
        raise


def _booted(session: Session) -> tuple[TraceTarget, VmRecord]:
    assert session.target is not None and session.record is not None, "boot() sets both"
    return session.target, session.record


def _drive(u: _Unit, tracer: Tracer | None) -> None:
    try:
        if tracer is None and u.session.needs_tracer:
            raise TracerError(
                f"VM {u.session.plan.vm.name!r}: its phases are measured only by the tracer, "
                "which is not running (see the tracer error above)"
            )
        u.session.drive(tracer)
    finally:
        u.teardown.close()  # per VM: a VM that is done does not wait for its neighbours


def _in_threads(units: list[_Unit], fn: Callable[[_Unit], None]) -> None:
    """Run ``fn(unit)`` for every unit at once, each in its own thread, and wait for all.

    The main thread only waits, in short joins, so SIGINT/SIGTERM raise
    RunInterrupted here promptly. What a thread raises is kept on its unit.
    """

    def body(u: _Unit) -> None:
        try:
            fn(u)
        except BaseException as exc:  # kept for the main thread; a thread cannot raise to it
            u.error = exc
        finally:
            u.done.set()

    for u in units:
        u.done.clear()
        u.thread = threading.Thread(target=body, args=(u,), name=f"vm-{u.name}", daemon=True)
        u.thread.start()
    for u in units:
        while not u.wait(0.2):
            pass


def _first_error(state: RunState, failed: list[_Unit]) -> BaseException:
    """Record every failure but the first, which the caller raises (and the run records)."""
    real = [u for u in failed if not isinstance(u.error, Cancelled)] or failed
    for u in real[1:]:
        state.error(f"VM {u.name}: {type(u.error).__name__}: {u.error}")
    error = real[0].error
    assert error is not None
    return error


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGINT/SIGTERM into RunInterrupted once; ignore repeats while cleaning up."""

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise RunInterrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


#: Left in a run directory whose result file could not be written (a full disk): the
#: file still says "running", so the next run reaps the directory and records why.
SAVE_ERROR_FILE = "save-error"


def _remove_run_dir(state: RunState) -> None:
    if state.save_error is not None:
        with contextlib.suppress(OSError):
            (state.run_dir / SAVE_ERROR_FILE).write_text(state.save_error + "\n")
            return
    shutil.rmtree(state.run_dir, ignore_errors=True)
