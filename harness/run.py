"""The orchestrator: a validated suite in, a result file out.

For each VM of the suite, one boot at a time:

    image ─► overlay + domain ─► guest ready ─► tracer attached
          ─► for each workload, repetition and phase:
                 host marker + guest marker ─► command ─► markers ─► tracer dump
                 ─► phase record appended, result file rewritten
          ─► tracer stopped ─► domain destroyed, overlay deleted

Self-driven guests (the micro KVM guest) run their phases from boot: the
domain starts paused, the tracer attaches to its QEMU, then the vCPUs run
and the phases are read back from the markers.

Everything started is registered on an ExitStack as it is started, so an
exception, SIGINT or SIGTERM unwinds it in reverse; the result file already
holds every finished phase and is marked incomplete.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import libvirt

from harness import __version__, metrics
from harness.guest.base import Guest, GuestError, GuestTimeout
from harness.guest.ssh import SshGuest
from harness.host.facts import HostFacts, choose_accelerator, collect_host_facts
from harness.image.linux import LinuxImage, build_linux_image
from harness.image.micro import MicroPhase, build_micro_image
from harness.paths import RESULTS_DIR, cache_dir
from harness.progress import QuietReporter, Reporter
from harness.results import (
    CrossCheck,
    PhaseResult,
    RunResult,
    SuiteRef,
    VmRecord,
    WorkloadRun,
    write_atomic,
)
from harness.spec import PhaseSpec, RunSpec, Suite, VmSpec, WorkloadSpec
from harness.trace import correlate, crosscheck, kvmstats, probes
from harness.trace.model import PhaseTrace, TraceSummary
from harness.trace.program import TraceTarget
from harness.trace.runner import Tracer, TracerError
from harness.vm import configs, lifecycle

TAIL_CHARS = 2000


class RunInterrupted(BaseException):
    """SIGINT or SIGTERM arrived; the run stops after cleaning up.

    A BaseException, like KeyboardInterrupt, so that no library's
    ``except Exception`` on the way up can swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class RunState:
    """The run being recorded: where it lives and how to persist it."""

    result: RunResult
    path: Path
    run_dir: Path
    reporter: Reporter
    trace_enabled: bool
    probe_names: list[str]
    _phase_no: dict[str, int] = field(default_factory=dict)

    def save(self) -> None:
        """Rewrite the result file atomically."""
        write_atomic(self.result, self.path)

    def next_phase(self, vm_boot: str) -> int:
        """Phase numbers are unique per boot: they key the tracer's maps."""
        self._phase_no[vm_boot] = self._phase_no.get(vm_boot, 0) + 1
        return self._phase_no[vm_boot]


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
) -> RunState:
    """Run every workload of ``suite`` and write ``results_dir/<run-id>.json``.

    Returns the final state; raises RunInterrupted on SIGINT/SIGTERM after
    cleaning up and marking the result incomplete.
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
    )
    runs_dir = cache_dir() / "runs"
    state = RunState(
        result,
        results_dir / f"{run_id}.json",
        runs_dir / run_id,
        reporter,
        suite.spec.trace.enabled if trace is None else trace,
        list(suite.spec.trace.probes),
    )
    conn = lifecycle.connect()
    try:
        for note in lifecycle.reap_leftovers(conn, runs_dir, reporter.step):
            result.notes.append(f"reaped leftover of a killed run: {note}")
        lifecycle.claim_run_dir(state.run_dir)
        state.save()
        reporter.step(f"run {run_id}: results in {state.path}")
        with _signals_raise(), contextlib.ExitStack() as stack:
            stack.callback(_remove_run_dir, state.run_dir)
            for vm in suite.spec.vms:
                runs = [r for r in suite.spec.runs if r.vm == vm.name]
                if runs:
                    _run_vm(state, suite, vm, runs, facts, conn)
        # Complete means everything asked for was measured, traces included.
        ok = all(r.status == "ok" for r in result.runs) and not result.errors
        result.status = "complete" if ok else "failed"
    except RunInterrupted as exc:
        result.status = "incomplete"
        result.errors.append(f"interrupted by {exc} before the suite finished")
        raise
    except BaseException as exc:
        result.status = "incomplete" if isinstance(exc, KeyboardInterrupt) else "failed"
        result.errors.append(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        result.finished_at = datetime.now(UTC)
        state.save()
        conn.close()
    return state


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
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


def _remove_run_dir(run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)


def _run_vm(
    state: RunState,
    suite: Suite,
    vm: VmSpec,
    runs: list[RunSpec],
    facts: HostFacts,
    conn: libvirt.virConnect,
) -> None:
    if vm.image == "micro":
        for run in runs:
            for rep in range(1, suite.repetitions(run) + 1):
                _run_micro_boot(state, suite.workloads[run.workload], run, rep, vm, facts, conn)
    else:
        _run_linux_boot(state, suite, vm, runs, facts, conn)


# --- Linux guests over SSH --------------------------------------------------------------


def _run_linux_boot(
    state: RunState,
    suite: Suite,
    vm: VmSpec,
    runs: list[RunSpec],
    facts: HostFacts,
    conn: libvirt.virConnect,
) -> None:
    rep = state.reporter
    accel, reason = choose_accelerator(vm.accelerator, facts)
    rep.step("image linux: checking cache (builds from Debian packages on first use)")
    image = build_linux_image(progress=rep.step)
    token = _token()
    boot_id = f"{vm.name}@{len(state.result.vms)}"
    record = VmRecord(
        name=vm.name,
        domain=lifecycle.domain_name(state.result.run_id, vm.name),
        image="linux",
        image_digest=image.digest,
        image_packages={"kernel": image.kernel_release, **image.packages},
        accelerator=accel,
        accelerator_reason=reason,
        vcpus=vm.vcpus,
        memory_mib=vm.memory_mib,
        marker_token=token,
    )
    state.result.vms.append(record)
    with contextlib.ExitStack() as stack:
        running = _boot_linux(state, conn, vm, image, record, stack)
        guest = _wait_for_ssh(running, image, vm)
        stack.callback(guest.close)
        record.boot_to_ready_s = round((time.monotonic_ns() - running.started_ns) / 1e9, 3)
        rep.step(
            f"vm {vm.name}: SSH ready after {record.boot_to_ready_s:.1f} s ({accel}: {reason})"
        )
        state.save()
        target = TraceTarget(vm=vm.name, pid=running.pid, token=token)
        tracer = _start_tracer(state, [target], record, stack)
        for run in runs:
            workload = suite.workloads[run.workload]
            for n in range(1, suite.repetitions(run) + 1):
                _run_linux_workload(
                    state,
                    guest,
                    workload,
                    run,
                    n,
                    target,
                    tracer,
                    boot_id,
                    record,
                    lambda: kvm_stats(running.domain),
                )
        if tracer is not None:
            _finish_tracer(tracer, record)


def _boot_linux(
    state: RunState,
    conn: libvirt.virConnect,
    vm: VmSpec,
    image: LinuxImage,
    record: VmRecord,
    stack: contextlib.ExitStack,
) -> lifecycle.RunningVm:
    overlay = state.run_dir / f"{vm.name}.qcow2"
    lifecycle.create_overlay(image.disk, overlay)
    stack.callback(overlay.unlink, missing_ok=True)
    console = state.run_dir / f"{vm.name}.console.log"
    kept = state.path.with_name(f"{state.path.stem}.{console.name}")
    record.console_log = str(kept)
    cfg = configs.linux_config(
        name=record.domain,
        accelerator=record.accelerator,
        memory_mib=vm.memory_mib,
        vcpus=vm.vcpus,
        kernel=image.kernel,
        initrd=image.initrd,
        cmdline=image.cmdline,
        overlay=overlay,
        console_log=console,
        ssh_port=lifecycle.free_port(),
    )
    state.reporter.step(f"vm {vm.name}: starting {record.domain}")
    running = lifecycle.start(conn, cfg)
    # The run directory is deleted at the end; the console log is evidence.
    stack.callback(_copy_if_exists, console, kept)
    stack.callback(lifecycle.destroy, running)
    record.qemu_pid = running.pid
    return running


def _copy_if_exists(src: Path, dest: Path) -> None:
    if src.exists():
        shutil.copyfile(src, dest)


def _wait_for_ssh(running: lifecycle.RunningVm, image: LinuxImage, vm: VmSpec) -> SshGuest:
    assert running.ssh_port is not None
    try:
        return SshGuest.connect(
            "127.0.0.1",
            running.ssh_port,
            user=image.ssh_user,
            key_file=image.ssh_private_key,
            host_key=image.host_key,
            deadline_s=vm.boot_timeout_s,
        )
    except GuestError as exc:
        raise GuestError(
            f"{vm.name} did not answer SSH within {vm.boot_timeout_s:.0f} s: {exc}\n"
            f"last console lines ({running.console_log}):\n"
            f"{lifecycle.console_tail(running.console_log)}"
        ) from exc


def _run_linux_workload(
    state: RunState,
    guest: Guest,
    workload: WorkloadSpec,
    run: RunSpec,
    repetition: int,
    target: TraceTarget,
    tracer: Tracer | None,
    boot_id: str,
    record: VmRecord,
    stats: Callable[[], dict[str, int] | None],
) -> None:
    params = {**workload.params, **run.params}
    wrun = WorkloadRun(
        workload=workload.name, vm=run.vm, repetition=repetition, params=params, status="incomplete"
    )
    state.result.runs.append(wrun)
    state.save()  # the file shows what is running, not only what finished
    for spec in workload.phases:
        number = state.next_phase(boot_id)
        phase = run_linux_phase(guest, workload, spec, params, number, target, tracer, stats)
        if tracer is not None:
            _trace_phase(tracer, target, phase, record, state.result.errors)
        wrun.phases.append(phase)
        state.save()
        state.reporter.phase(wrun, phase)
        if phase.status != "ok":
            wrun.status = "failed"
            state.save()
            return  # later phases of this repetition depend on this one
    wrun.status = "ok"
    state.save()


def run_linux_phase(
    guest: Guest,
    workload: WorkloadSpec,
    spec: PhaseSpec,
    params: dict[str, str | int | float],
    number: int,
    target: TraceTarget,
    tracer: Tracer | None,
    stats: Callable[[], dict[str, int] | None],
) -> PhaseResult:
    """Run one phase: host marker, guest command between guest markers, host marker.

    Returns the phase record without its trace (fetched by the caller) so the
    benchmark can time exactly this path.
    """
    command = workload.render(spec, params)
    phase = PhaseResult(
        index=number, name=spec.name, command=command, started_at=datetime.now(UTC), status="error"
    )
    stats_before = stats()
    start_ns = tracer.mark_phase(target, number) if tracer else time.monotonic_ns()
    try:
        out = guest.run(
            guest.phase_command(command, target.token, number), timeout_s=spec.timeout_s
        )
    except GuestTimeout as exc:
        phase.status, phase.error = "timeout", str(exc)
        phase.stdout_tail, phase.stderr_tail = exc.stdout[-TAIL_CHARS:], exc.stderr[-TAIL_CHARS:]
    except GuestError as exc:
        phase.status, phase.error = "error", str(exc)
    else:
        phase.exit_status = out.exit_status
        phase.status = "ok" if out.exit_status == 0 else "failed"
        phase.stdout_tail, phase.stderr_tail = out.stdout[-TAIL_CHARS:], out.stderr[-TAIL_CHARS:]
        phase.metrics, phase.metrics_missing = metrics.extract(spec, out.stdout + "\n" + out.stderr)
        if out.exit_status != 0:
            phase.error = f"exit status {out.exit_status}"
    end_ns = tracer.mark_phase(target, 0) if tracer else time.monotonic_ns()
    phase.start_ns, phase.end_ns = start_ns, end_ns
    phase.duration_s = round((end_ns - start_ns) / 1e9, 6)
    stats_after = stats()
    if stats_before is not None and stats_after is not None:
        phase.kvm_stats = kvmstats.diff(stats_before, stats_after)
    return phase


# --- self-driven guests (micro) ---------------------------------------------------------


def _run_micro_boot(
    state: RunState,
    workload: WorkloadSpec,
    run: RunSpec,
    repetition: int,
    vm: VmSpec,
    facts: HostFacts,
    conn: libvirt.virConnect,
) -> None:
    rep = state.reporter
    if not facts.kvm_device:
        raise lifecycle.VmError(
            f"VM {vm.name!r}: the micro guest needs /dev/kvm "
            "(fix: load kvm, or run `harness doctor`)"
        )
    token = _token()
    out_dir = state.run_dir / f"{vm.name}-{repetition}"
    out_dir.mkdir(mode=0o755)
    micro = build_micro_image(
        out_dir, [MicroPhase(p.name, p.pages or 1, p.repeat) for p in workload.phases], token
    )
    if micro.rom_path is None or micro.rom_digest is None:
        raise lifecycle.VmError(f"{out_dir}: the micro image build produced no ROM")
    record = VmRecord(
        name=vm.name,
        domain=lifecycle.domain_name(state.result.run_id, f"{vm.name}-{repetition}"),
        image="micro",
        image_digest=micro.rom_digest,
        accelerator="kvm",
        accelerator_reason="the micro guest runs under KVM even where stock guests cannot",
        vcpus=1,
        memory_mib=vm.memory_mib,
        marker_token=token,
    )
    state.result.vms.append(record)
    wrun = WorkloadRun(
        workload=workload.name,
        vm=vm.name,
        repetition=repetition,
        params=run.params,
        status="incomplete",
    )
    state.result.runs.append(wrun)
    cfg = configs.micro_config(
        name=record.domain,
        memory_mib=vm.memory_mib,
        rom=micro.rom_path,
        console_log=out_dir / "console.log",
    )
    with contextlib.ExitStack() as stack:
        running = lifecycle.start(conn, cfg, paused=True)
        stack.callback(lifecycle.destroy, running)
        record.qemu_pid = running.pid
        target = TraceTarget(vm=vm.name, pid=running.pid, token=token)
        tracer = _start_tracer(state, [target], record, stack, required=True)
        assert tracer is not None
        rep.step(f"vm {vm.name}: micro guest #{repetition} running (token {token:#06x})")
        lifecycle.resume(running)
        finished = lifecycle.wait_stopped(running, vm.boot_timeout_s)
        snapshot = tracer.stop()
        record.trace = tracer.summary(snapshot)
        numbers = list(range(1, len(workload.phases) + 1))
        traces = correlate.phase_traces(
            snapshot, target, numbers, attached=record.trace.probes_attached
        )
    for number, spec in zip(numbers, workload.phases, strict=True):
        wrun.phases.append(_micro_phase(spec, number, traces, finished))
    wrun.status = "ok" if all(p.status == "ok" for p in wrun.phases) else "failed"
    state.save()
    for phase in wrun.phases:
        rep.phase(wrun, phase)


def _micro_phase(
    spec: PhaseSpec, number: int, traces: dict[int, PhaseTrace], finished: bool
) -> PhaseResult:
    trace = traces.get(number)
    phase = PhaseResult(
        index=number, name=spec.name, status="ok", timing="guest-marker", trace=trace
    )
    # A phase runs from its own marker to the next one (phase k+1, or 0 after the last).
    start = trace.marker_ns if trace else None
    # Phase 0 is the marker after the last phase; numbers are consecutive from 1.
    after = traces.get(number + 1) or traces.get(0)
    end = after.marker_ns if after is not None else None
    if trace is None or start is None or trace.markers_seen != 1:
        phase.status = "error"
        phase.error = (
            f"phase marker seen {trace.markers_seen if trace else 0} times, expected 1"
            + ("" if finished else "; the guest did not finish in time")
        )
    elif end is None:
        phase.status = "error"
        phase.error = "no marker after this phase: the guest stopped inside it"
    else:
        phase.start_ns, phase.end_ns = start, end
        phase.duration_s = round((end - start) / 1e9, 6)
        phase.metrics = {
            "pages": float(spec.pages or 0),
            "pages_per_s": (spec.pages or 0) * spec.repeat / max(phase.duration_s, 1e-9),
        }
    return phase


# --- tracing ----------------------------------------------------------------------------


def kvm_stats(domain: libvirt.virDomain) -> dict[str, int] | None:
    """KVM's own counters for a domain (QEMU query-stats); None where KVM keeps none (TCG).

    debugfs would not need QEMU's help, but kernel lockdown makes its stat
    files unreadable on some hosts, and QEMU's answer is the same counters.
    """
    try:
        values = kvmstats.read_libvirt_stats(domain)
    except Exception:  # a monitor hiccup must not fail the phase; None says "unknown"
        return None
    return values or None


def _token() -> int:
    return secrets.randbelow(0xFFFF) + 1


def _start_tracer(
    state: RunState,
    targets: list[TraceTarget],
    record: VmRecord,
    stack: contextlib.ExitStack,
    *,
    required: bool = False,
) -> Tracer | None:
    """Attach the tracer; without it a Linux run still measures, a micro run cannot."""
    if not state.trace_enabled:
        record.trace = TraceSummary(tracer_status="disabled")
        return None
    selected = probes.select(state.probe_names)
    # The tracer checks availability itself and records what it could not attach.
    # The MMU mode lets availability note probes that attach but never fire (kvm_exit on PVM).
    view = probes.HostView.probe(mmu_mode=state.result.host.mmu_mode)
    tracer = Tracer(selected, targets, workdir=state.run_dir / f"trace-{record.domain}", view=view)
    stack.enter_context(tracer)
    try:
        tracer.start()
    except TracerError as exc:
        record.trace = TraceSummary(tracer_status="not-started", tracer_error=str(exc))
        state.result.errors.append(f"tracer did not start for {record.name}: {exc}")
        if required:
            raise
        return None
    record.trace = tracer.summary()
    state.reporter.step(
        f"tracer attached: {len(record.trace.probes_attached)} probes, "
        f"{len(record.trace.probes_not_attached)} unavailable"
    )
    return tracer


def _trace_phase(
    tracer: Tracer, target: TraceTarget, phase: PhaseResult, record: VmRecord, errors: list[str]
) -> None:
    """Attach the aggregates of a finished phase; a dead tracer is recorded, not hidden.

    The workload goes on without it: its own numbers are still worth having,
    and the result says from which phase on the trace is missing.
    """
    was_ok = record.trace is not None and record.trace.tracer_status == "ok"
    try:
        snapshot = tracer.snapshot()
    except TracerError as exc:
        record.trace = tracer.summary()
        record.trace.tracer_status = "died"
        if record.trace.tracer_error is None:
            record.trace.tracer_error = str(exc)
        if was_ok:
            errors.append(
                f"tracer of VM {record.name} died during phase {phase.index} "
                f"({phase.name}); later phases are untraced: {record.trace.tracer_error}"
            )
        return
    attached = record.trace.probes_attached if record.trace else []
    phase.trace = correlate.phase_traces(snapshot, target, [phase.index], attached=attached).get(
        phase.index
    )
    if phase.kvm_stats is not None:
        traced = crosscheck.host_window_counts(snapshot, target.pid, phase.index)
        phase.cross_checks = [
            CrossCheck(
                kvm_stat=c.kvm_stat,
                traced=c.probe,
                kvm_value=c.kvm_value,
                traced_value=c.traced_value,
                difference=c.difference,
                exact=c.exact,
            )
            for c in crosscheck.compare(phase.kvm_stats, traced, attached)
        ]


def _finish_tracer(tracer: Tracer, record: VmRecord) -> None:
    snapshot = None
    with contextlib.suppress(TracerError):
        snapshot = tracer.stop()
    record.trace = tracer.summary(snapshot)
