"""The host tracer's life in a run: attach once for all VMs that run together,
attribute each finished phase, stop, and record a summary per VM.

One tracer traces every VM of a round (one program, many targets); each VM's
thread fetches its own phases from it. Below the platforms, above
``harness.trace``: it knows result records, not guest kinds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import libvirt

from harness.results import CrossCheck, PhaseResult, VmRecord
from harness.runstate import RunState, Teardown
from harness.trace import correlate, crosscheck, kvmstats, probes
from harness.trace.backend import Choice
from harness.trace.model import TraceSummary
from harness.trace.parse import TraceSnapshot
from harness.trace.program import TraceTarget
from harness.trace.runner import BackendStartError, Tracer, TracerError, start_backend


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


def start_tracer(
    state: RunState,
    traced: Sequence[tuple[TraceTarget, VmRecord]],
    teardown: Teardown,
    label: str,
) -> Tracer | None:
    """Attach one tracer to every VM in ``traced``; None when disabled or it did not start.

    Call from the main thread: bpftrace is bound to die with the thread that
    started it. Each record gets the tracer's summary; a start failure is
    recorded on every record and in the run's errors, and the caller decides
    whether its VMs can go on without it.
    """
    records = [r for _, r in traced]
    if not state.trace_enabled:
        with state.lock:
            for r in records:
                r.trace = TraceSummary(tracer_status="disabled")
        return None
    selected = probes.select(state.probe_names)
    # The tracer checks availability itself and records what it could not attach.
    # The MMU mode lets availability note probes that attach but never fire (kvm_exit on PVM).
    view = probes.HostView.probe(mmu_mode=state.result.host.mmu_mode)

    def make(choice: Choice) -> Tracer:
        return Tracer(
            selected,
            [t for t, _ in traced],
            workdir=state.run_dir / f"trace-{label}",
            view=view,
            stacks=probes.stack_entries(state.stack_probes, selected),
            stack_depth=state.stack_depth,
            backend=choice.backend,
            backend_reason=choice.reason,
        )

    try:
        tracer = start_backend(state.trace_backend, make, teardown.enter)
    except BackendStartError as exc:
        with state.lock:
            for r in records:
                r.trace = TraceSummary(tracer_status="not-started", tracer_error=str(exc),
                                       backend=exc.backend)
            names = ", ".join(r.name for r in records)
            state.result.errors.append(
                f"tracer ({exc.backend}) did not start for {names}: {exc}"
            )
            state.save()
        return None
    with state.lock:
        for t, r in traced:
            r.trace = tracer.summary(pid=t.pid)
        state.save()
    summary = records[0].trace
    assert summary is not None
    state.reporter.step(
        f"tracer ({tracer.backend.name}) attached to {len(records)} VM(s): "
        f"{len(summary.probes_attached)} probes, "
        f"{len(summary.probes_not_attached)} unavailable"
    )
    return tracer


def trace_phase(
    state: RunState, tracer: Tracer, target: TraceTarget, phase: PhaseResult, record: VmRecord
) -> None:
    """Attach the aggregates of a finished phase; a dead tracer is recorded, not hidden.

    The workload goes on without it: its own numbers are still worth having,
    and the result says from which phase on the trace is missing.
    """
    try:
        snapshot = tracer.snapshot()
    except TracerError as exc:
        with state.lock:
            was_ok = record.trace is not None and record.trace.tracer_status == "ok"
            record.trace = tracer.summary(pid=target.pid)
            record.trace.tracer_status = "died"
            if record.trace.tracer_error is None:
                record.trace.tracer_error = str(exc)
            if was_ok:
                state.result.errors.append(
                    f"tracer of VM {record.name} died during phase {phase.index} "
                    f"({phase.name}); later phases are untraced: {record.trace.tracer_error}"
                )
        return
    attached = record.trace.probes_attached if record.trace else []
    phase.trace = correlate.phase_traces(
        snapshot,
        target,
        [phase.index],
        attached=attached,
        stack_depth=tracer.program.stack_depth,
        stack_offsets=state.stack_offsets,
        stack_periods=dict(tracer.program.stack_periods),
        stack_rates=dict(tracer.program.stack_rates),
    ).get(phase.index)
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


def finish_tracer(
    state: RunState, tracer: Tracer, traced: Sequence[tuple[TraceTarget, VmRecord]]
) -> TraceSnapshot | None:
    """Stop the tracer, record each VM's summary and return the final maps (None if lost)."""
    snapshot = None
    with contextlib.suppress(TracerError):
        snapshot = tracer.stop()
    with state.lock:
        for t, r in traced:
            r.trace = tracer.summary(snapshot, pid=t.pid)
        state.save()
    return snapshot
