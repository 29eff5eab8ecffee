"""Generate the one bpftrace program that traces all VMs under test.

Everything is aggregated in the kernel (bpftrace maps), keyed by the QEMU pid,
the current guest-marker phase and the current host-window phase, so output
grows with phases x keys and never with the event count. Each event costs
two phase lookups and one counter update: per-probe, per-phase, per-vCPU and
unphased totals are all sums over ``@evt``, taken in Python (parse.py), not
three updates in the kernel (that tripled the cost of high-rate probes). The harness fetches
cumulative maps on demand (a "dump" host marker) and bpftrace prints them all
again when it exits.

Map layout (every key is an integer; probe ids are catalogue indices,
:func:`harness.trace.probes.probe_id`):

=====================================  ==========================================
``@gphase[pid]``                        current guest-marker phase of a VM
``@hphase[pid]``                        current host-window phase of a VM
``@markers[pid, phase]``                guest markers seen (count)
``@marker_ns[pid, phase]``              first guest marker, ``nsecs`` (CLOCK_MONOTONIC)
``@gdur[pid, phase]``                   ns spent in a guest phase (closed intervals)
``@hmarks[pid, phase]``                 host markers seen (count)
``@hmark_ns[pid, phase]``               first host marker, ``nsecs``
``@hdur[pid, phase]``                   ns spent in a host window (closed intervals)
``@evt[pid, tid, g, h, probe]``         events per vCPU thread, phase pair and probe
``@exits[pid, g, h, isa, reason]``      kvm_exit by ISA and exit reason
``@pf[pid, g, h, isa, reason, ec]``     kvm_page_fault by the preceding exit and error code
``@crw[pid, g, h, cr]``                 control-register writes by register
``@getpage[pid, g, h, created]``        kvm_mmu_get_page: new (1) vs existing (0) MMU pages
``@lat[pid, g, h, latency]``            log2 histograms of paired-probe latencies
``@stk[pid, g, h, probe, kstack]``     kernel stacks of the probes asked for (``stacks``)
``@scnt[pid, cpu, probe]``              events since the last stack of a sampled probe
``@scnt[pid, cpu, probe, g, h]``        rate target: (current period << 32) | events since
``@slast[pid, cpu, probe]``             rate target: ``nsecs`` of the last stack
``@stkw[pid, g, h, probe, kstack]``    rate target: sum of the stacks' weights (periods)
``@stkw2[pid, g, h, probe, kstack]``   rate target: sum of their squares
``@dump_done``                          sequence number of the last completed dump
=====================================  ==========================================
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from harness.trace.probes import (
    MARKER_PROBE,
    MAX_STACK_PERIOD,
    ProbeStatus,
    StackEntry,
    probe_id,
    split_stack_entry,
)

#: CPUID leaf of guest phase markers (ECX = (token << 16) | phase).
GUEST_MARKER_LEAF: Final = 0x4B564D00
#: getpriority(which, who) values of host markers: phase and dump requests.
HOST_MARKER_WHICH: Final = 0x4B564D00
HOST_DUMP_WHICH: Final = 0x4B564D01

# The filter below relies on the two values differing only in bit 0.
assert HOST_DUMP_WHICH == HOST_MARKER_WHICH | 1

#: Kernel frames kept per stack: deep enough for the whole KVM path from the ioctl
#: (seen here: 14 frames from __x64_sys_ioctl to __kvm_mmu_get_shadow_page).
DEFAULT_STACK_DEPTH: Final = 32
#: bpftrace's limit for kstack(N) (BPF's PERF_MAX_STACK_DEPTH).
MAX_STACK_DEPTH: Final = 127
#: Extra frames collected beyond ``stack_depth``: the tracer's own innermost frames
#: (``__traceiter_*``; the libbpf backend's ``bpf_prog_*``, ``bpf_trace_run*``) are
#: dropped when parsing and the rest cut to ``stack_depth`` (parse.strip_tracer_frames).
STACK_SLACK: Final = 4


def rate_interval_ns(rate_hz: int) -> int:
    """ns between stacks for a rate target of ``rate_hz`` (rounded as kvmtrace's loader does)."""
    return (1_000_000_000 + rate_hz // 2) // rate_hz


def collected_depth(stack_depth: int) -> int:
    """Frames a tracer collects for ``stack_depth`` kept frames."""
    return min(stack_depth + STACK_SLACK, MAX_STACK_DEPTH)

#: printf of the BEGIN block, followed by the session number.
READY_MESSAGE: Final = "harness-tracer-ready"

#: Latency histograms: id in ``@lat`` -> (name, start probe, end probe).
LATENCIES: Final[dict[int, tuple[str, str, str]]] = {
    0: ("exit_to_entry", "kvm_exit", "kvm_entry"),
    1: ("page_fault_to_entry", "kvm_page_fault", "kvm_entry"),
}

#: Maps printed by a dump, in order. ``@dump_done`` always comes last.
RESULT_MAPS: Final = (
    "gphase", "hphase", "markers", "marker_ns", "gdur", "hmarks", "hmark_ns", "hdur",
    "evt", "stk", "stkw", "stkw2", "exits", "pf", "crw", "getpage", "lat",
)


#: The tracepoint fields each probe block reads, in the order they are loaded.
#:
#: Every field is copied into a local at the top of the block,
#: before any branch. With two or more targets the marker test reads
#: ``args->index`` in several arms of a disjunction; LLVM then hoists one
#: ``ctx + offset`` pointer and loads through it in each arm, and the verifier
#: rejects that ("dereference of modified ctx ptr ... disallowed"). A single
#: load per field at a constant offset from the unmodified ctx is always accepted.
_ARGS: Final[dict[str, tuple[str, ...]]] = {
    MARKER_PROBE: ("function", "index"),
    "kvm_exit": ("isa", "exit_reason"),
    "kvm_page_fault": ("error_code",),
    "kvm_cr": ("rw", "cr"),
    "kvm_mmu_get_page": ("created",),
}


class ProgramError(ValueError):
    """Bad generator input, or bpftrace rejected a generated program."""


@dataclass(frozen=True)
class TraceTarget:
    """A VM under test: its QEMU process and the run token its guest markers carry."""

    vm: str
    pid: int
    token: int


@dataclass(frozen=True)
class TraceProgram:
    """A generated program and what it was generated from."""

    text: str
    targets: tuple[TraceTarget, ...]
    attached: tuple[ProbeStatus, ...]
    not_attached: tuple[ProbeStatus, ...]
    session: int
    latencies: tuple[int, ...]
    maps: tuple[str, ...]
    stacks: frozenset[str] = frozenset()
    stack_depth: int = DEFAULT_STACK_DEPTH
    #: Sampled stacks: (probe, period N > 1), a stack on every Nth event per CPU and VM.
    stack_periods: tuple[tuple[str, int], ...] = ()
    #: Rate targets: (probe, R stacks per second per CPU and VM), the period adapted in
    #: the kernel to the event rate; each stack is weighted by the period it stands for.
    stack_rates: tuple[tuple[str, int], ...] = ()
    #: Which tracer runs it: "bpftrace" (text is a bpftrace program) or "libbpf"
    #: (text is the kvmtrace loader's configuration, harness.trace.libbpf).
    backend: str = "bpftrace"
    #: The same program for the same probes and number of targets with canonical
    #: placeholders (VM ``vmN``, pid N, token N, session 1).
    template: str = ""

    @property
    def sha256(self) -> str:
        """Digest of the program text (recorded in results)."""
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def template_sha256(self) -> str:
        """Digest of the program for the same probes and number of targets, not their identity.

        Two runs with the same backend, probe set and number of targets get
        the same value even though their pids, tokens and sessions differ: it
        says whether two runs used the same tracer program.
        """
        return hashlib.sha256(self.template.encode()).hexdigest()

    @property
    def probe_names(self) -> dict[int, str]:
        """Probe id -> name for the probes in this program."""
        return {probe_id(s.probe.name): s.probe.name for s in self.attached}

    def target(self, pid: int) -> TraceTarget:
        """The target with QEMU pid ``pid``."""
        for t in self.targets:
            if t.pid == pid:
                return t
        raise KeyError(f"pid {pid} is not a target of this program")


def new_session() -> int:
    """A random dump session (1..65535): another harness on the host cannot trigger our dumps."""
    return secrets.randbelow(0xFFFF) + 1


def validate_targets(targets: Sequence[TraceTarget]) -> None:
    """ProgramError unless every target has a positive pid and a token in 1..65535, all distinct."""
    if not targets:
        raise ProgramError("targets: at least one TraceTarget (QEMU pid + token) is needed")
    pids: set[int] = set()
    tokens: set[int] = set()
    for i, t in enumerate(targets):
        where = f"targets[{i}] ({t.vm!r})"
        if not isinstance(t.pid, int) or isinstance(t.pid, bool) or t.pid <= 0:
            raise ProgramError(f"{where}.pid: {t.pid!r} is not a positive process id")
        if not isinstance(t.token, int) or isinstance(t.token, bool) or not 1 <= t.token <= 0xFFFF:
            raise ProgramError(f"{where}.token: {t.token!r} is not in 1..65535")
        if t.pid in pids:
            raise ProgramError(f"{where}.pid: {t.pid} is listed twice; one target per QEMU")
        if t.token in tokens:
            raise ProgramError(f"{where}.token: {t.token} is used twice; tokens must differ")
        pids.add(t.pid)
        tokens.add(t.token)


def generate(
    statuses: Sequence[ProbeStatus],
    targets: Sequence[TraceTarget],
    *,
    session: int | None = None,
    stacks: Sequence[str] = (),
    stack_depth: int = DEFAULT_STACK_DEPTH,
    owner: int | None = None,
) -> TraceProgram:
    """Generate one bpftrace program for the available probes in ``statuses``.

    Host markers count only from process ``owner`` (default: this one, the
    harness that places them), so two harness runs on one host cannot move
    each other's phases even if their random tokens or sessions collide.

    Unavailable probes are left out (and listed in ``not_attached``). The
    ``session`` (1..65535, random by default) is carried by dump requests so
    that another harness on the same host cannot trigger this program's dumps.
    ``stacks`` names probes whose kernel stacks (``stack_depth`` frames) are
    counted too, per VM, phase and probe: one more map update per such event.
    """
    validate_targets(targets)
    if session is None:
        session = new_session()
    if not 1 <= session <= 0xFFFF:
        raise ProgramError(f"session: {session} is not in 1..65535")
    attached = tuple(s for s in statuses if s.available and s.attach)
    not_attached = tuple(s for s in statuses if not (s.available and s.attach))
    names = {s.probe.name for s in attached}
    latencies = tuple(i for i, (_n, a, b) in LATENCIES.items() if a in names and b in names)
    if not 1 <= stack_depth <= MAX_STACK_DEPTH:
        raise ProgramError(f"stack_depth: {stack_depth} is not in 1..{MAX_STACK_DEPTH}")
    plan = stack_plan(stacks, statuses)
    # A stacked probe that did not attach has no events and so no stacks.
    stacked = frozenset(n for n in plan if n in names)
    sampled = tuple(sorted((n, e.period) for n, e in plan.items()
                           if n in stacked and e.period > 1))
    rates = tuple(sorted((n, e.rate_hz) for n, e in plan.items()
                         if n in stacked and e.rate_hz is not None))
    gen = _Gen(tuple(targets), attached, names, latencies, session, stacked, stack_depth,
               os.getpid() if owner is None else owner, dict(sampled), dict(rates))
    text = gen.render()
    canonical = tuple(TraceTarget(f"vm{i}", i, i) for i in range(1, len(targets) + 1))
    template = _Gen(canonical, attached, names, latencies, 1, stacked, stack_depth, 1,
                    dict(sampled), dict(rates)).render()
    return TraceProgram(
        text=text,
        targets=tuple(targets),
        attached=attached,
        not_attached=not_attached,
        session=session,
        latencies=latencies,
        maps=gen.maps_used(),
        stacks=stacked,
        stack_depth=stack_depth,
        stack_periods=sampled,
        stack_rates=rates,
        template=template,
    )


def stack_plan(stacks: Sequence[str], statuses: Sequence[ProbeStatus]) -> dict[str, StackEntry]:
    """Probe -> sampling of ``stacks`` entries (``name``, ``name/N`` or ``name@Rhz``), checked.

    Every named probe must be among ``statuses`` (the selected probes); a probe listed
    twice must have one period or one rate, not both. ProgramError says which entry and
    how to fix it.
    """
    selected = {s.probe.name for s in statuses}
    out: dict[str, StackEntry] = {}
    for text in stacks:
        try:
            entry = split_stack_entry(text)
        except ValueError as exc:
            raise ProgramError(str(exc)) from None
        name = entry.name
        if name not in selected:
            raise ProgramError(
                f"stacks: {name!r} is not one of the selected probes; stack only probes "
                "that are traced (add it to the probe selection)"
            )
        old = out.get(name, entry)
        if (old.rate_hz is None) != (entry.rate_hz is None):
            raise ProgramError(f"stacks: {name} is listed with a period and with a rate "
                               f"({old} and {entry}); list it once")
        if old.rate_hz != entry.rate_hz:
            raise ProgramError(f"stacks: {name} is listed with rates {old.rate_hz}hz and "
                               f"{entry.rate_hz}hz; list it once")
        if old.period != entry.period:
            raise ProgramError(f"stacks: {name} is listed with periods {old.period} and "
                               f"{entry.period}; list it once")
        out[name] = entry
    return out


class _Gen:
    """Renders the program text; one instance per :func:`generate` call."""

    def __init__(
        self,
        targets: tuple[TraceTarget, ...],
        attached: tuple[ProbeStatus, ...],
        names: set[str],
        latencies: tuple[int, ...],
        session: int,
        stacks: frozenset[str] = frozenset(),
        stack_depth: int = DEFAULT_STACK_DEPTH,
        owner: int = 1,
        periods: dict[str, int] | None = None,
        rates: dict[str, int] | None = None,
    ) -> None:
        self.owner = owner
        self.periods = periods or {}
        self.rates = rates or {}
        self.targets = targets
        self.attached = attached
        self.names = names
        self.latencies = latencies
        self.session = session
        self.stacks = stacks
        self.stack_depth = stack_depth
        self.guest_markers = MARKER_PROBE in names

    def maps_used(self) -> tuple[str, ...]:
        used = {"hphase", "hmarks", "hmark_ns", "hdur", "evt"}
        if self.guest_markers:
            used |= {"gphase", "markers", "marker_ns", "gdur"}
        if "kvm_exit" in self.names:
            used.add("exits")
        if "kvm_page_fault" in self.names:
            used.add("pf")
        if "kvm_cr" in self.names:
            used.add("crw")
        if "kvm_mmu_get_page" in self.names:
            used.add("getpage")
        if self.latencies:
            used.add("lat")
        if self.stacks:
            used.add("stk")
        if self.rates:
            used |= {"stkw", "stkw2"}
        return tuple(m for m in RESULT_MAPS if m in used)

    def pid_filter(self) -> str:
        return " || ".join(f"pid == {t.pid}" for t in self.targets)

    def render(self) -> str:
        parts = [self.header(), self.begin_block(), self.host_marker_block()]
        for s in self.attached:
            parts.append(self.probe_block(s))
        parts.append(self.end_block())
        return "\n".join(parts)

    def header(self) -> str:
        lines = [
            "// Generated by harness.trace.program: host KVM tracing per VM and workload phase.",
            "// Every aggregate is keyed by (pid, guest-marker phase g, host-window phase h, ...).",
            "// Targets (vm: QEMU pid, marker token):",
        ]
        lines += [f"//   {t.vm}: pid {t.pid}, token {t.token}" for t in self.targets]
        lines.append("// Probes (id name <- bpftrace probe):")
        lines += [f"//   {probe_id(s.probe.name):2d} {s.probe.name} <- {s.attach}"
                  for s in self.attached]
        for i in self.latencies:
            name, a, b = LATENCIES[i]
            lines.append(f"// Latency {i} {name}: {a} -> next {b} on the same thread")
        lines.append(f"// Dump session {self.session}")
        return "\n".join(lines) + "\n"

    def begin_block(self) -> str:
        return (
            "// bpftrace prints attached_probes *before* it attaches; BEGIN runs after every\n"
            "// probe is attached, so this line is the runner's proof that tracing is live.\n"
            f'BEGIN {{ printf("{READY_MESSAGE} %d\\n", {self.session}); }}\n'
        )

    @staticmethod
    def _phase_switch(kind: str, pid: str, phase: str) -> list[str]:
        """Statements that move VM ``pid`` to ``phase`` (kind "g" guest, "h" host)."""
        cur, start, dur = f"@{kind}phase", f"@{kind}start", f"@{kind}dur"
        marks, first = ("@markers", "@marker_ns") if kind == "g" else ("@hmarks", "@hmark_ns")
        return [
            f"$old = {cur}[{pid}];",
            "// Close the running interval so per-phase durations are exact.",
            f"if ({start}[{pid}] != 0) {{ {dur}[{pid}, $old] = sum(nsecs - {start}[{pid}]); }}",
            f"{start}[{pid}] = nsecs;",
            f"{cur}[{pid}] = {phase};",
            f"{marks}[{pid}, {phase}] = count();",
            f"if ({first}[{pid}, {phase}] == 0) {{ {first}[{pid}, {phase}] = nsecs; }}",
        ]

    def host_marker_block(self) -> str:
        """getpriority() from the harness: host phase windows and dump requests."""
        out = [
            "// Host markers: the harness calls getpriority(which, who), which fails with EINVAL.",
            f"//   which {HOST_MARKER_WHICH:#x}: who = (token << 16) | phase -> @hphase of that VM",
            f"//   which {HOST_DUMP_WHICH:#x}: who = (session << 16) | seq -> print all maps",
            "// The call comes from the harness, not QEMU, so the token selects the VM;",
            "// only this harness's calls count (another run may have drawn the same token).",
            "tracepoint:syscalls:sys_enter_getpriority",
            "// One read of args->which in the filter too: (which | 1) matches both values.",
            f"/pid == {self.owner} && (args->which | 1) == {HOST_MARKER_WHICH | 1:#x}/",
            "{",
            "  // Every args field is read once, before any branch (see _ARGS).",
            "  $which = args->which;",
            "  $who = (uint64)args->who & 0xffffffff;",
            f"  if ($which == {HOST_MARKER_WHICH:#x}) {{",
            "    $ph = $who & 0xffff;",
        ]
        for t in self.targets:
            out.append(f"    if (($who >> 16) == {t.token}) {{  // {t.vm}")
            out += [f"      {s}" for s in self._phase_switch("h", f"(uint64){t.pid}", "$ph")]
            out.append("    }")
        out.append(f"  }} else if (($who >> 16) == {self.session}) {{")
        out.append("    // Dump: all maps, then @dump_done so the reader knows it is complete.")
        out += [f"    print(@{m});" for m in self.maps_used()]
        out.append("    @dump_done = $who & 0xffff;")
        out.append("    print(@dump_done);")
        out.append("  }")
        out.append("}")
        return "\n".join(out) + "\n"

    def common(self, name: str) -> list[str]:
        """Per-event bookkeeping shared by every probe: phase lookup and counters."""
        ident = probe_id(name)
        out = [
            "$g = @gphase[pid];" if self.guest_markers else "$g = (uint64)0;",
            "$h = @hphase[pid];",
            f"@evt[pid, tid, $g, $h, {ident}] = count();",
        ]
        if name not in self.stacks:
            return out
        depth = collected_depth(self.stack_depth)
        stack = f"@stk[pid, $g, $h, {ident}, kstack({depth})] = count();"
        rate = self.rates.get(name)
        if rate is not None:
            return [*out, *self.rate_target(ident, depth, rate)]
        period = self.periods.get(name, 1)
        if period == 1:
            return [*out, stack]
        # Sampled: a stack on every Nth event of this probe per CPU and VM (one
        # counter per CPU, so no two events race on it); the counts above stay exact.
        return [
            *out,
            f"$n = @scnt[pid, cpu, {ident}] + 1;",
            f"if ($n >= {period}) {{",
            "  $n = 0;",
            f"  {stack}",
            "}",
            f"@scnt[pid, cpu, {ident}] = $n;",
        ]

    @staticmethod
    def rate_target(ident: int, depth: int, rate: int) -> list[str]:
        """A stack whenever this CPU's count reaches its period; the period follows the rate.

        Per CPU, VM, probe and phase pair one map value: (period << 32) | events since
        the last stack (a new phase starts at period 0, i.e. the next event). A stack
        weighs the period in force (the events it stands for); then dt = now - the
        last stack's time (@slast, read only here), and the period becomes the mean of
        the old one and old x interval / dt, in 1..MAX_STACK_PERIOD.
        """
        key = f"pid, cpu, {ident}, $g, $h"
        interval = rate_interval_ns(rate)
        return [
            f"$sv = @scnt[{key}];",
            "$n = ($sv & 0xffffffff) + 1;",
            "$p = $sv >> 32;",
            "if ($n >= $p) {",
            "  $w = $p > 0 ? $p : 1;",
            f"  $k = kstack({depth});",
            f"  @stk[pid, $g, $h, {ident}, $k] = count();",
            f"  @stkw[pid, $g, $h, {ident}, $k] = sum($w);",
            f"  @stkw2[pid, $g, $h, {ident}, $k] = sum($w * $w);",
            f"  $dt = nsecs - @slast[pid, cpu, {ident}];",
            f"  @slast[pid, cpu, {ident}] = nsecs;",
            f"  $q = ($w + $w * {interval} / ($dt > 0 ? $dt : 1)) / 2;",
            f"  $p = $q < 1 ? 1 : ($q > {MAX_STACK_PERIOD} ? {MAX_STACK_PERIOD} : $q);",
            "  $n = 0;",
            "}",
            f"@scnt[{key}] = ($p << 32) | $n;",
        ]

    def probe_block(self, s: ProbeStatus) -> str:
        name = s.probe.name
        body: list[str] = []
        fields = _ARGS.get(name, ())
        if fields:
            body.append("// Each args field read once, before any branch (see _ARGS).")
            body += [f"${f} = args->{f};" for f in fields]
        if name == MARKER_PROBE:
            conds = " || ".join(
                f"(pid == {t.pid} && ($index >> 16) == {t.token})" for t in self.targets
            )
            body += [
                "// Guest phase marker: cpuid leaf 0x4B564D00, ECX = (token << 16) | phase.",
                f"if ($function == {GUEST_MARKER_LEAF:#x} && ({conds})) {{",
                "  $ph = (uint64)($index & 0xffff);",
            ]
            body += [f"  {x}" for x in self._phase_switch("g", "pid", "$ph")]
            body.append("}")
        body += self.common(name)
        if name == "kvm_exit":
            body.append("@exits[pid, $g, $h, $isa, $exit_reason] = count();")
            if "kvm_page_fault" in self.names:
                body.append("// Remember the exit so the page fault it causes can name it.")
                body.append("@lx[tid] = ((uint64)$isa << 32) | $exit_reason;")
            if 0 in self.latencies:
                body.append("@t_exit[tid] = nsecs;")
        elif name == "kvm_page_fault":
            if "kvm_exit" in self.names:
                body.append("$lx = @lx[tid];")
                body.append(
                    "@pf[pid, $g, $h, $lx >> 32, $lx & 0xffffffff, $error_code] = count();"
                )
            else:
                body.append("// kvm_exit is not traced: the causing exit is unknown (0, 0).")
                body.append("@pf[pid, $g, $h, 0, 0, $error_code] = count();")
            if 1 in self.latencies:
                body.append("@t_pf[tid] = nsecs;")
        elif name == "kvm_cr":
            body.append("if ($rw == 1) { @crw[pid, $g, $h, $cr] = count(); }")
        elif name == "kvm_mmu_get_page":
            body.append("// Root reuse: a new page (created) or one found by (gfn, role).")
            body.append("@getpage[pid, $g, $h, (uint64)$created] = count();")
        elif name == "kvm_entry":
            for i, tmp in ((0, "@t_exit"), (1, "@t_pf")):
                if i in self.latencies:
                    body.append(f"if ({tmp}[tid] != 0) {{")
                    body.append(f"  @lat[pid, $g, $h, {i}] = hist(nsecs - {tmp}[tid]);")
                    body.append(f"  delete({tmp}[tid]);")
                    body.append("}")
        head = [f"// {name}: {s.probe.question}", s.attach or "", f"/{self.pid_filter()}/", "{"]
        return "\n".join(head + [f"  {b}" for b in body] + ["}"]) + "\n"

    def end_block(self) -> str:
        temps = ["@gstart", "@hstart"] if self.guest_markers else ["@hstart"]
        if "kvm_exit" in self.names and "kvm_page_fault" in self.names:
            temps.append("@lx")
        if 0 in self.latencies:
            temps.append("@t_exit")
        if 1 in self.latencies:
            temps.append("@t_pf")
        if self.periods or self.rates:
            temps.append("@scnt")
        if self.rates:
            temps.append("@slast")
        clears = " ".join(f"clear({m});" for m in temps)
        return f"// Per-thread scratch maps are not results.\nEND {{ {clears} }}\n"


_NOISE = re.compile(r"RLIMIT_MEMLOCK|available_filter_functions")


def stderr_filter(text: str) -> str:
    """bpftrace stderr without the harmless RLIMIT_MEMLOCK / filter-function warnings."""
    kept: list[str] = []
    for line in text.splitlines():
        # bpftrace 0.17 glues the two warnings onto one line without a newline.
        for piece in re.split(r"(?<=Operation not permitted)(?=ERROR)", line):
            if piece.strip() and not _NOISE.search(piece):
                kept.append(piece)
    return "\n".join(kept)


def check_program(text: str, bpftrace: str = "bpftrace", timeout_s: float = 60) -> None:
    """Let bpftrace parse, type-check and compile ``text`` without attaching (``-d``).

    bpftrace 0.17 has no ``--dry-run``; ``-d`` runs the whole front end and
    code generation and exits. Raises :class:`ProgramError` with bpftrace's
    messages when the program is rejected.
    """
    with tempfile.TemporaryDirectory(prefix="bt-check-") as tmp:
        path = Path(tmp) / "program.bt"
        path.write_text(text)
        proc = subprocess.run(
            [bpftrace, "-d", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    if proc.returncode != 0:
        raise ProgramError(
            f"bpftrace rejected the generated program (exit {proc.returncode}):\n"
            f"{stderr_filter(proc.stderr)}"
        )
