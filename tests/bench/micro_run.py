"""One traced run of the micro KVM guest, as the tracer benchmarks time it.

The figure is the guest's own work time, from its first phase marker to its
last, taken from the marker events' timestamps: whole-run time is not a fixed
amount of work on this host. "Untraced" still needs the markers, so it runs a
tracer that attaches only kvm_cpuid (a handful of events per run).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from harness.image.micro import QEMU_EXIT_STATUS, MicroPhase, build_micro_image
from harness.spec import load_workload
from harness.trace import correlate, libbpf, probes
from harness.trace.backend import Backend, LibbpfBackend
from harness.trace.model import PhaseTrace
from harness.trace.probes import ProbeStatus
from harness.trace.program import DEFAULT_STACK_DEPTH, TraceProgram, TraceTarget
from harness.trace.runner import Tracer
from tests.bench.peer_tracefs import TracefsRecorder
from tests.integration.conftest import make_backend
from tests.integration.micro_qemu import micro_vm

PHASES = [
    MicroPhase(p.name, p.pages or 1, p.repeat)
    for p in load_workload(Path(__file__).parents[2] / "workloads" / "micro-touch.toml").phases
]


class StagedLibbpf(LibbpfBackend):
    """The libbpf backend with ``bench_stage`` added to the loader's configuration.

    The loader's ``bench_stage N`` (kvmtrace.bpf.c) stops every event after part N
    of the per-event work: 1 the tp_btf attach alone (the floor), 2 + the pid
    filter, 3 + the VM's phase lookup, 4 + the per-CPU counter; 0 is the whole
    program. For benchmarks only.
    """

    def __init__(self, built: libbpf.LibbpfBuild, stage: int) -> None:
        super().__init__(built)
        self.stage = stage

    def generate(
        self,
        statuses: Sequence[ProbeStatus],
        targets: Sequence[TraceTarget],
        *,
        session: int | None = None,
        stacks: Sequence[str] = (),
        stack_depth: int = DEFAULT_STACK_DEPTH,
    ) -> TraceProgram:
        """The configuration of the libbpf backend, plus ``bench_stage``."""
        prog = super().generate(statuses, targets, session=session, stacks=stacks,
                                stack_depth=stack_depth)
        return dataclasses.replace(prog, text=prog.text + f"bench_stage {self.stage}\n")


@dataclass(frozen=True)
class Mode:
    """How a run is traced: backend, probe groups, stacked probes, tracefs peer, and
    for libbpf the ``bench_stage`` (0: the whole program; see StagedLibbpf)."""

    backend: str
    wanted: tuple[str, ...]
    stacked: tuple[str, ...] = ()
    peer: bool = False
    stage: int = 0

    def make_backend(self) -> Backend:
        """This mode's tracer backend (libbpf built for this kernel, cached)."""
        if self.stage:
            return StagedLibbpf(libbpf.build(), self.stage)
        return make_backend(self.backend)


@dataclass(frozen=True)
class MicroRun:
    """What one run measured."""

    work_ns: int
    #: QEMU's CPU time (user + system, all threads): the same fixed guest work plus
    #: what tracing adds, whatever else runs on the host.
    cpu_ns: int
    #: Events traced (the peer's own count where a peer recorded).
    events: int
    #: kvm_emulate_insn events where that probe is attached: known exactly.
    emulated: int | None
    traces: dict[int, PhaseTrace]


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of process ``pid`` (QEMU, paused) to ``cpu``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {cpu})


def run_micro_once(
    workdir: Path, name: str, mode: Mode, token: int, cpu: int | None = None
) -> MicroRun:
    """Boot the micro guest once under ``mode`` (QEMU pinned to ``cpu``) and time it."""
    image = build_micro_image(workdir / name, PHASES, token)
    assert image.rom_path is not None
    with ExitStack() as stack:
        # Plain QEMU, the bench's own child: wait4() gives its CPU time, which the
        # tracer's per-event work adds to (BPF runs on the vCPU thread).
        vm = stack.enter_context(micro_vm(image, workdir))
        target = TraceTarget(vm="micro", pid=vm.pid, token=token)
        if cpu is not None:
            pin(vm.pid, cpu)
        tracer = stack.enter_context(
            Tracer(probes.select(list(mode.wanted)), [target], workdir=workdir / f"trace-{name}",
                   stacks=list(mode.stacked), backend=mode.make_backend())
        )
        tracer.start()
        peer = None
        if mode.peer:
            peer = stack.enter_context(TracefsRecorder(workdir / f"peer-{name}", pid=vm.pid))
        vm.cont()
        _, status, usage = os.wait4(vm.pid, 0)
        vm.proc.returncode = os.waitstatus_to_exitcode(status)
        assert vm.proc.returncode == QEMU_EXIT_STATUS, "micro guest did not finish"
        snapshot = tracer.stop()
        traces = correlate.phase_traces(snapshot, target, list(range(1, len(PHASES) + 1)))
        events = peer.stats().read_events if peer else sum(t.events_total for t in traces.values())
        emulated = None
        if "kvm_emulate_insn" in {s.probe.name for s in tracer.program.attached}:
            emulated = sum(t.emulated_insns for t in traces.values())
    first, last = traces[1].marker_ns, traces[0].marker_ns
    assert first is not None and last is not None, "markers missing"
    return MicroRun(last - first, int((usage.ru_utime + usage.ru_stime) * 1e9), events,
                    emulated, traces)
