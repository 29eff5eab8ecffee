"""The micro KVM guest: self-driven phases baked into its ROM, one boot per repetition.

Its domain starts paused, so the QEMU pid exists for the tracer's filter; it
counts as ready then. Once the tracer is attached the vCPU runs every phase
from its first instruction, marking each with cpuid; the guest ends itself
through isa-debug-exit. Phases and their timing are read back from the
tracer's final maps (the marker events' own timestamps).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.image.micro import MicroPhase, build_micro_image, recipe_digest
from harness.platform.base import (
    BootPlan,
    ChooseAccelerator,
    RunContext,
    boot_items,
    with_host_memory,
    with_pinning,
)
from harness.results import PhaseResult, VmRecord, WorkloadRun
from harness.runstate import Teardown
from harness.spec import PhaseSpec, RunSpec, Suite, VmSpec
from harness.trace import correlate, probes
from harness.trace.model import PhaseTrace
from harness.trace.parse import TraceSnapshot
from harness.trace.program import TraceTarget
from harness.trace.runner import Tracer, TracerError
from harness.vm import configs, lifecycle
from harness.vm.domain import DomainConfig


class MicroPlatform:
    """Self-driven micro guests under KVM."""

    kind = "micro"

    def plan(
        self, suite: Suite, vm: VmSpec, runs: list[RunSpec], group: str | None
    ) -> list[BootPlan]:
        """One boot per repetition: the phases are the ROM, built for one workload.

        Every boot is fresh, so ``boots`` multiplies the repetitions.
        """
        items = boot_items(suite, runs) * suite.boots(vm)
        return [
            BootPlan(vm=vm, items=(item,), name=f"{vm.name}-{i}", group=group)
            for i, item in enumerate(items, start=1)
        ]

    def session(self, ctx: RunContext, plan: BootPlan) -> MicroSession:
        """A session that builds the ROM for ``plan``'s one work item and boots it paused."""
        return MicroSession(ctx, plan)

    def preview_config(
        self, vm: VmSpec, domain: str, run_dir: Path, accelerator: ChooseAccelerator
    ) -> tuple[DomainConfig, str]:
        """The micro domain of the first boot (its ROM is built per run)."""
        first = run_dir / f"{vm.name}-1"
        cfg = configs.micro_config(
            name=domain,
            memory_mib=vm.memory_mib,
            rom=first / "micro.rom",
            console_log=first / "console.log",
        )
        return with_pinning(cfg, vm), ""


@dataclass(frozen=True)
class BuiltRom:
    """A guest ROM built for one boot: its file, its digest, and its recipe without the token."""

    path: Path
    digest: str
    recipe: str


class MicroSession:
    """One boot of the micro guest running one repetition of one workload.

    A variant guest (harness/platform/paging.py) overrides :meth:`_build`,
    :meth:`_phase_metrics` and ``image_kind``; boot, drive and collect are shared.
    """

    needs_tracer = True
    image_kind = "micro"

    def __init__(self, ctx: RunContext, plan: BootPlan) -> None:
        (self.item,) = plan.items
        self.ctx, self.plan = ctx, plan
        self.record: VmRecord | None = None
        self.target: TraceTarget | None = None
        self._wrun: WorkloadRun | None = None
        self._running: lifecycle.RunningVm | None = None
        self._finished = False

    def boot(self, teardown: Teardown) -> None:
        """Build the ROM with this boot's token and phases; start the domain paused."""
        state, vm, item = self.ctx.state, self.plan.vm, self.item
        if not self.ctx.facts.kvm_device:
            raise lifecycle.VmError(
                f"VM {vm.name!r}: the micro guest needs /dev/kvm "
                "(fix: load kvm, or run `harness doctor`)"
            )
        token = state.new_token()
        out_dir = state.run_dir / self.plan.name
        out_dir.mkdir(mode=0o755)
        rom = self._build(out_dir, token)
        record = VmRecord(
            name=vm.name,
            boot=self.plan.name,
            domain=lifecycle.domain_name(state.result.run_id, self.plan.name),
            image=self.image_kind,
            image_digest=rom.digest,
            image_recipe=rom.recipe,  # the ROM's digest changes with the token
            accelerator="kvm",
            accelerator_reason="the micro guest runs under KVM even where stock guests cannot",
            vcpus=1,
            memory_mib=vm.memory_mib,
            marker_token=token,
            group=self.plan.group,
        )
        wrun = WorkloadRun(
            workload=item.workload.name,
            vm=vm.name,
            repetition=item.repetition,
            params={**item.workload.defaults(), **item.run.params},
            boot=self.plan.name,
            warmup=item.warmup,
            status="incomplete",
        )
        with state.lock:
            state.result.vms.append(record)
            state.result.runs.append(wrun)
        self.record, self._wrun = record, wrun
        state.check_cancel()
        cfg = configs.micro_config(
            name=record.domain,
            memory_mib=vm.memory_mib,
            rom=rom.path,
            console_log=out_dir / "console.log",
        )
        cfg = with_pinning(with_host_memory(cfg, self.ctx), self.plan.vm)
        running = lifecycle.start(self.ctx.conn, cfg, paused=True)
        teardown.callback(lifecycle.destroy, running)
        record.qemu_pid = running.pid
        self._running = running
        self.target = TraceTarget(vm=vm.name, pid=running.pid, token=token)

    def _build(self, out_dir: Path, token: int) -> BuiltRom:
        """Build this boot's ROM with its token and phases."""
        phases = [MicroPhase(p.name, p.pages or 1, p.repeat) for p in self.item.workload.phases]
        micro = build_micro_image(out_dir, phases, token)
        if micro.rom_path is None or micro.rom_digest is None:
            raise lifecycle.VmError(f"{out_dir}: the micro image build produced no ROM")
        return BuiltRom(micro.rom_path, micro.rom_digest, recipe_digest(phases))

    def _phase_metrics(self, spec: PhaseSpec, duration_s: float) -> dict[str, float]:
        """The guest's own numbers for a finished phase."""
        return {
            "pages": float(spec.pages or 0),
            "pages_per_s": (spec.pages or 0) * spec.repeat / max(duration_s, 1e-9),
        }

    def drive(self, tracer: Tracer | None) -> None:
        """Resume the vCPU and wait for the guest to end itself."""
        assert self._running is not None and self.record is not None
        if tracer is None:
            raise TracerError(
                f"VM {self.record.name!r}: the micro guest's phases are measured only by the "
                "tracer, and it is not running (see the tracer error above)"
            )
        state = self.ctx.state
        state.reporter.step(
            f"vm {self.plan.vm.name}: micro guest #{self.item.repetition} running "
            f"(token {self.record.marker_token:#06x})"
        )
        lifecycle.resume(self._running)
        self._finished = lifecycle.wait_stopped(
            self._running, self.plan.vm.boot_timeout_s, stop=state.cancel
        )
        state.check_cancel()

    def collect(self, snapshot: TraceSnapshot | None) -> None:
        """Phases, timing and traces from the marker events in the final maps."""
        assert self.record is not None and self._wrun is not None and self.target is not None
        state, wrun, phases = self.ctx.state, self._wrun, self.item.workload.phases
        numbers = list(range(1, len(phases) + 1))
        traces: dict[int, PhaseTrace] = {}
        if snapshot is not None:
            attached = self.record.trace.probes_attached if self.record.trace else []
            traces = correlate.phase_traces(
                snapshot,
                self.target,
                numbers,
                attached=attached,
                stack_depth=state.stack_depth,
                stack_offsets=state.stack_offsets,
                stack_periods=probes.stack_periods(state.stack_probes),
                stack_rates=probes.stack_rates(state.stack_probes),
                mmu_mode=self.ctx.facts.mmu_mode,
            )
        with state.lock:
            for number, spec in zip(numbers, phases, strict=True):
                phase = _micro_phase(spec, number, traces, self._finished)
                if phase.status == "ok" and phase.duration_s is not None:
                    phase.metrics = self._phase_metrics(spec, phase.duration_s)
                wrun.phases.append(phase)
            wrun.status = "ok" if all(p.status == "ok" for p in wrun.phases) else "failed"
            state.save()
        for phase in wrun.phases:
            state.reporter.phase(wrun, phase)


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
    return phase
