"""The seam between the orchestrator and the kinds of guest it drives.

A :class:`Platform` is the only place that knows what kind of guest it
drives: its image, its domain config, how readiness is detected, its
transport (SSH, self-driven) and how a phase is executed and marked. The
orchestrator plans boots through it and drives each boot through a
:class:`Session`, in the same steps for every kind:

    boot (start, wait until the tracer may attach)  -- in the VM's own thread
    tracer attached to every VM of the round         -- in the main thread
    drive (run and mark every phase)                 -- in the VM's own thread
    tracer stopped, summaries recorded               -- in the main thread
    collect (phases read back from the final maps)   -- in the main thread
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import libvirt

from harness.host.facts import HostFacts
from harness.results import VmRecord
from harness.runstate import RunState, Teardown
from harness.spec import RunSpec, Suite, VmSpec, WorkloadSpec
from harness.trace.parse import TraceSnapshot
from harness.trace.program import TraceTarget
from harness.trace.runner import Tracer
from harness.vm.domain import DomainConfig

#: This host's answer to a VM's ``accelerator`` setting (auto, kvm, tcg).
ChooseAccelerator = Callable[[Literal["auto", "kvm", "tcg"]], Literal["kvm", "tcg"]]


@dataclass(frozen=True)
class WorkItem:
    """One repetition of one suite run, on one boot (a warm-up one: recorded, not compared)."""

    run: RunSpec
    workload: WorkloadSpec
    repetition: int
    warmup: bool = False


def boot_items(suite: Suite, runs: list[RunSpec]) -> list[WorkItem]:
    """The work of one boot: each run's warm-ups, then its measured repetitions, in order."""
    items: list[WorkItem] = []
    for run in runs:
        warm = suite.warmup(run)
        total = warm + suite.repetitions(run)
        items += [
            WorkItem(run, suite.workloads[run.workload], n, warmup=n <= warm)
            for n in range(1, total + 1)
        ]
    return items


def boot_name(vm: VmSpec, index: int, boots: int) -> str:
    """The name of boot ``index`` (1-based) of ``vm``: the VM's name when it boots once."""
    return vm.name if boots == 1 else f"{vm.name}-b{index}"


@dataclass(frozen=True)
class BootPlan:
    """One boot of one VM and the work it does.

    ``name`` tells boots of the same VM apart (it is part of the domain name
    and keys phase numbers); ``group`` is the concurrent group, if any.
    """

    vm: VmSpec
    items: tuple[WorkItem, ...]
    name: str
    group: str | None = None


@dataclass(frozen=True)
class RunContext:
    """What every session of a run shares."""

    state: RunState
    conn: libvirt.virConnect
    facts: HostFacts


def with_host_memory(cfg: DomainConfig, ctx: RunContext) -> DomainConfig:
    """``cfg`` with guest memory on hugetlbfs pages when the applied host configuration
    asks for it (``guest_hugepages``): part of the host MMU setup, the same for every VM."""
    applied = ctx.state.result.host_config
    kib = applied.guest_hugepages_kib if applied is not None else None
    return cfg if kib is None else dataclasses.replace(cfg, hugepages_kib=kib)


def with_pinning(cfg: DomainConfig, vm: VmSpec) -> DomainConfig:
    """``cfg`` with the VM's vCPU and emulator-thread pinning (``pin_vcpus``, ``pin_emulator``).

    Raises ValueError naming the VM when it names a CPU this host does not have.
    """
    cpus = os.cpu_count() or 1
    bad = sorted({c for c in [*(vm.pin_vcpus or []), *(vm.pin_emulator or [])] if c >= cpus})
    if bad:
        raise ValueError(
            f"VM {vm.name!r}: pin_vcpus/pin_emulator name CPU(s) {bad}, but this host has "
            f"CPUs 0-{cpus - 1} (fix: pin to CPUs that exist here, or drop the pinning)"
        )
    return dataclasses.replace(
        cfg,
        vcpu_pins=tuple(vm.pin_vcpus) if vm.pin_vcpus else None,
        emulator_pins=tuple(vm.pin_emulator) if vm.pin_emulator else None,
    )


class Session(Protocol):
    """One boot of one VM, driven through the same steps whatever its kind."""

    plan: BootPlan
    #: Set by boot(): the record in the result and what the tracer filters on.
    record: VmRecord | None
    target: TraceTarget | None

    @property
    def needs_tracer(self) -> bool:
        """Whether its phases can only be measured through the tracer (self-driven guests)."""
        ...

    def boot(self, teardown: Teardown) -> None:
        """Start the VM and return once the tracer may attach; register clean-up on ``teardown``."""
        ...

    def drive(self, tracer: Tracer | None) -> None:
        """Run every phase of every work item, marking each for the tracer."""
        ...

    def collect(self, snapshot: TraceSnapshot | None) -> None:
        """After the tracer stopped: record what only its final maps tell (self-driven phases)."""
        ...


class Platform(Protocol):
    """A kind of guest: plans its boots, makes sessions, previews its domain XML."""

    #: The ``image`` value of a suite's VM that selects this platform.
    kind: str

    def plan(
        self, suite: Suite, vm: VmSpec, runs: list[RunSpec], group: str | None
    ) -> list[BootPlan]:
        """The boots ``vm`` needs for ``runs``, in order."""
        ...

    def session(self, ctx: RunContext, plan: BootPlan) -> Session:
        """A not yet booted session for ``plan``."""
        ...

    def preview_config(
        self, vm: VmSpec, domain: str, run_dir: Path, accelerator: ChooseAccelerator
    ) -> tuple[DomainConfig, str]:
        """The domain config a run would start for ``vm``, and an XML comment (or "").

        ``accelerator`` is asked only by platforms that let the suite choose.
        """
        ...
