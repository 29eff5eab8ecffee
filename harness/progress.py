"""What a person sees while a run goes: steps, phases, and the closing table."""

from __future__ import annotations

import time
from typing import Protocol

from rich.console import Console
from rich.table import Table

from harness.results import PhaseResult, RunResult, WorkloadRun


class Reporter(Protocol):
    """Where the orchestrator reports progress; the CLI picks rich or quiet."""

    def step(self, text: str) -> None:
        """A step started or finished (image build, boot, tracer attach)."""
        ...

    def phase(self, run: WorkloadRun, phase: PhaseResult) -> None:
        """A phase finished and was written to the result file."""
        ...


class QuietReporter:
    """Reports nothing: for --quiet and --json, where stdout belongs to the result."""

    def step(self, text: str) -> None:
        """Ignore a step."""

    def phase(self, run: WorkloadRun, phase: PhaseResult) -> None:
        """Ignore a phase."""


class RichReporter:
    """Timestamped progress lines on stderr, so stdout stays clean for pipes."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, highlight=False)
        self._t0 = time.monotonic()

    def step(self, text: str) -> None:
        """Print a step with the time since the run began."""
        self.console.print(f"[dim]{time.monotonic() - self._t0:7.1f}s[/] {text}")

    def phase(self, run: WorkloadRun, phase: PhaseResult) -> None:
        """Print one finished phase with its headline numbers."""
        colour = "green" if phase.status == "ok" else "red"
        dur = f"{phase.duration_s:.2f}s" if phase.duration_s is not None else "-"
        metrics = " ".join(f"{k}={v:g}" for k, v in phase.metrics.items())
        self.step(
            f"[{colour}]{phase.status}[/] {run.workload}#{run.repetition}/{phase.name} "
            f"{dur} {metrics}"
        )


def summary_table(result: RunResult) -> Table:
    """One row per phase: timing, the workload's numbers and the host's KVM events."""
    table = Table(title=f"run {result.run_id} ({result.status})")
    right = {"rep", "seconds", "exits", "mmu faults", "mmu events", "emulated"}
    for col in (
        "workload",
        "vm",
        "rep",
        "phase",
        "status",
        "seconds",
        "metrics",
        "exits",
        "mmu faults",
        "mmu events",
        "emulated",
        "attribution",
    ):
        table.add_column(col, justify="right" if col in right else "left")
    tcg_boots = _tcg_boots(result)
    for run in result.runs:
        for ph in run.phases:
            tr = ph.trace
            counts = (
                [
                    str(sum(tr.exits.values())),
                    str(sum(tr.mmu_faults.values())),
                    str(sum(tr.mmu_events.values())),
                    str(tr.emulated_insns),
                ]
                if tr
                else ["-"] * 4
            )
            attribution: str = tr.attribution if tr else "untraced"
            if tr and (run.boot or run.vm) in tcg_boots and not _any_event(ph):
                # KVM never ran this guest: its zeros are not a measurement of no exits.
                counts = ["n/a"] * 4
                attribution = TCG_NOTE
            table.add_row(
                run.workload,
                # A VM booted several times: which boot (repetitions restart at 1 in each).
                run.boot if run.boot and run.boot != run.vm else run.vm,
                f"{run.repetition} (warm-up)" if run.warmup else str(run.repetition),
                ph.name,
                ph.status,
                f"{ph.duration_s:.3f}" if ph.duration_s is not None else "-",
                " ".join(f"{k}={v:g}" for k, v in ph.metrics.items()) or "-",
                *counts,
                attribution,
            )
    if any((run.boot or run.vm) in tcg_boots for run in result.runs):
        table.caption = (
            f"n/a: {TCG_NOTE}; QEMU emulated the CPU and MMU itself, so the host's KVM "
            "tracepoints have nothing to count"
        )
    return table


#: What the table says instead of 0 exits / 0 faults for a guest that KVM did not run.
TCG_NOTE = "no KVM events: this guest ran under TCG"


def _tcg_boots(result: RunResult) -> set[str]:
    """Boots (and, for results without boot names, VM names) that ran under TCG."""
    return {
        name for vm in result.vms if vm.accelerator == "tcg"
        for name in (vm.boot or vm.name, vm.name)
    }


def _any_event(ph: PhaseResult) -> bool:
    tr = ph.trace
    return tr is not None and bool(
        sum(tr.exits.values()) or sum(tr.mmu_faults.values()) or sum(tr.mmu_events.values())
        or tr.emulated_insns
    )
