"""Tracer backends: who turns a probe selection into a running tracer process.

Both backends produce a :class:`~harness.trace.program.TraceProgram` whose
process speaks bpftrace's JSON lines and answers the same host markers, so the
runner, parser and correlator are shared. ``bpftrace`` generates a bpftrace
script; ``libbpf`` configures the kvmtrace loader (harness.trace.libbpf), which
costs less per event. ``auto`` picks libbpf where it builds, bpftrace otherwise,
and says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Protocol

from harness.trace import libbpf, program
from harness.trace.probes import HostView, Probe, ProbeStatus, availability
from harness.trace.program import DEFAULT_STACK_DEPTH, TraceProgram, TraceTarget

BackendName = Literal["auto", "bpftrace", "libbpf"]
BACKEND_NAMES: Final = ("auto", "bpftrace", "libbpf")


class Backend(Protocol):
    """Availability, program generation and the command line of one tracer kind."""

    name: str
    #: File name the runner writes the program text to (in its work directory).
    program_file: str

    def availability(
        self, probes: Sequence[Probe], view: HostView | None = None
    ) -> list[ProbeStatus]:
        """Which of ``probes`` this backend can attach on the host ``view`` describes."""
        ...

    def generate(
        self,
        statuses: Sequence[ProbeStatus],
        targets: Sequence[TraceTarget],
        *,
        session: int | None = None,
        stacks: Sequence[str] = (),
        stack_depth: int = DEFAULT_STACK_DEPTH,
    ) -> TraceProgram:
        """The program for the available probes of ``statuses`` and ``targets``."""
        ...

    def command(self, program_path: Path) -> list[str]:
        """The tracer process's command line."""
        ...


class BpftraceBackend:
    """bpftrace 0.17+: tracepoint:, kfunc: or kprobe: probes, maps printed as JSON."""

    name = "bpftrace"
    program_file = "trace.bt"

    def __init__(self, bpftrace: str = "bpftrace") -> None:
        self.bpftrace = bpftrace

    def availability(
        self, probes: Sequence[Probe], view: HostView | None = None
    ) -> list[ProbeStatus]:
        """See :func:`harness.trace.probes.availability`."""
        return availability(probes, view)

    def generate(
        self,
        statuses: Sequence[ProbeStatus],
        targets: Sequence[TraceTarget],
        *,
        session: int | None = None,
        stacks: Sequence[str] = (),
        stack_depth: int = DEFAULT_STACK_DEPTH,
    ) -> TraceProgram:
        """See :func:`harness.trace.program.generate`."""
        return program.generate(statuses, targets, session=session, stacks=stacks,
                                stack_depth=stack_depth)

    def command(self, program_path: Path) -> list[str]:
        """``bpftrace -f json -B none PROGRAM``."""
        return [self.bpftrace, "-f", "json", "-B", "none", str(program_path)]


class LibbpfBackend:
    """The kvmtrace loader: tp_btf/ raw tracepoints and fentry/ through libbpf."""

    name = "libbpf"
    program_file = "trace.cfg"

    def __init__(self, built: libbpf.LibbpfBuild) -> None:
        self.built = built

    def availability(
        self, probes: Sequence[Probe], view: HostView | None = None
    ) -> list[ProbeStatus]:
        """See :func:`harness.trace.libbpf.availability`; fentry is tried for real, once."""
        v = view if view is not None else HostView.probe()
        functions = [p for p in probes if p.kind != "tracepoint"
                     and v.btf_functions is not None and p.target in v.btf_functions]
        refused = libbpf.fentry_check(self.built.loader, functions[0].name) if functions else None
        return libbpf.availability(probes, v, libbpf.read_btf_trace_types(), refused)

    def generate(
        self,
        statuses: Sequence[ProbeStatus],
        targets: Sequence[TraceTarget],
        *,
        session: int | None = None,
        stacks: Sequence[str] = (),
        stack_depth: int = DEFAULT_STACK_DEPTH,
    ) -> TraceProgram:
        """See :func:`harness.trace.libbpf.generate`."""
        return libbpf.generate(statuses, targets, self.built, session=session, stacks=stacks,
                               stack_depth=stack_depth)

    def command(self, program_path: Path) -> list[str]:
        """``kvmtrace CONFIG``."""
        return [str(self.built.loader), str(program_path)]


@dataclass(frozen=True)
class Choice:
    """The backend a run uses, and why (recorded in the result)."""

    backend: Backend
    reason: str


def choose(name: str, bpftrace: str = "bpftrace") -> Choice:
    """Resolve ``auto``/``bpftrace``/``libbpf``; ``libbpf`` raises LibbpfUnavailable if it can't."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"tracer backend {name!r}: choose one of {', '.join(BACKEND_NAMES)}")
    if name == "bpftrace":
        return Choice(BpftraceBackend(bpftrace), "bpftrace was asked for")
    try:
        built = libbpf.build()
    except libbpf.LibbpfUnavailable as exc:
        if name == "libbpf":
            raise
        return Choice(BpftraceBackend(bpftrace), f"auto: libbpf unavailable ({exc}); bpftrace")
    if name == "libbpf":
        return Choice(LibbpfBackend(built), "libbpf was asked for")
    return Choice(LibbpfBackend(built), "auto: the libbpf backend builds on this host")
