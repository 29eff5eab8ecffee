"""The probe catalogue: which host probe answers which question, and whether this host offers it.

Tracepoints (``kvm:*``, ``kvmmmu:*``) are the base layer; function probes
(kfunc preferred, kprobe as fallback) are added where the running kernel and
bpftrace support them. Availability is decided by pure functions over a
:class:`HostView` so that the rules can be unit-tested with any host shape;
:meth:`HostView.probe` reads the live machine.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import struct
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, NamedTuple

ProbeKind = Literal["tracepoint", "kfunc", "kprobe"]
Category = Literal[
    "exit", "fault", "mmu", "cr", "marker", "emulation", "io", "entry", "root", "function"
]

#: MMU modes as decided by harness.host.facts (HostFacts.mmu_mode).
MMU_MODES: Final = frozenset({"ept", "npt", "shadow", "pvm", "none"})
_HW: Final = frozenset({"ept", "npt", "shadow"})  # VMX/SVM hardware virtualization
_KVM: Final = frozenset({"ept", "npt", "shadow", "pvm"})  # any working KVM
_TDP: Final = frozenset({"ept", "npt"})
_SHADOW: Final = frozenset({"shadow", "pvm"})  # PVM uses shadow paging
_INTEL: Final = frozenset({"ept", "shadow"})
_AMD: Final = frozenset({"npt", "shadow"})

TRACEFS_CANDIDATES: Final = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))


@dataclass(frozen=True)
class Probe:
    """One catalogue entry.

    ``target`` is ``"system:event"`` for tracepoints and a kernel function name
    for function probes. Function probes have ``kind == "kfunc"``; when kfuncs
    are unavailable they fall back to a kprobe on the same function.
    """

    name: str
    kind: ProbeKind
    target: str
    question: str
    category: Category
    mmu_modes: frozenset[str]
    default: bool
    high_rate: bool = False


def _tp(
    name: str,
    system: str,
    question: str,
    category: Category,
    modes: frozenset[str],
    *,
    default: bool = True,
    high_rate: bool = False,
) -> Probe:
    return Probe(name, "tracepoint", f"{system}:{name}", question, category, modes, default,
                 high_rate)


def _fn(
    name: str, question: str, category: Category, modes: frozenset[str], *, default: bool
) -> Probe:
    return Probe(name, "kfunc", name, question, category, modes, default, high_rate=not default)


#: Every probe the tracer knows, in a stable order: a probe's index here is its
#: numeric id in generated programs and their output maps.
CATALOGUE: Final[tuple[Probe, ...]] = (
    _tp("kvm_exit", "kvm", "Why did the guest leave guest mode (exit reason per ISA)?",
        "exit", _HW),
    _tp("kvm_page_fault", "kvm",
        "Which guest accesses faulted into KVM's MMU (EPT violation, NPF or shadow #PF), "
        "by error code?", "fault", _HW),
    _tp("kvm_cr", "kvm", "How often did the guest write control registers (CR3 = address "
        "space switches)?", "cr", _KVM),
    _tp("kvm_cpuid", "kvm", "Which phase markers did the guest execute (and other CPUID "
        "exits)?", "marker", _KVM),
    _tp("kvm_pio", "kvm", "How many port I/O accesses were handled?", "io", _KVM),
    _tp("kvm_mmio", "kvm", "How many MMIO accesses went to KVM or userspace?", "io", _KVM),
    _tp("kvm_emulate_insn", "kvm", "How many guest instructions did KVM emulate?",
        "emulation", _KVM, default=False, high_rate=True),
    _tp("kvm_entry", "kvm", "How often was the guest (re)entered (pairs with kvm_exit for "
        "exit-handling latency)?", "entry", _HW, default=False, high_rate=True),
    _tp("kvm_mmu_get_page", "kvmmmu", "How many shadow/TDP page-table pages were looked up "
        "or created?", "mmu", _KVM),
    _tp("kvm_mmu_prepare_zap_page", "kvmmmu", "How many MMU pages were zapped?", "mmu", _KVM),
    _tp("kvm_mmu_sync_page", "kvmmmu", "How many unsync shadow pages had to be resynced?",
        "mmu", _SHADOW),
    _tp("kvm_mmu_unsync_page", "kvmmmu", "How many shadow pages were marked unsync?", "mmu",
        _SHADOW),
    _tp("fast_page_fault", "kvmmmu", "How many faults were fixed on the lockless fast path?",
        "mmu", _KVM),
    _tp("kvm_mmu_split_huge_page", "kvmmmu", "How many huge pages were split (dirty logging, "
        "NX huge pages)?", "mmu", _TDP),
    _tp("kvm_mmu_zap_all_fast", "kvmmmu", "How often was the whole MMU invalidated "
        "(memslot changes)?", "mmu", _KVM),
    _tp("kvm_mmu_set_spte", "kvmmmu", "How many SPTEs were installed by the shadow MMU?",
        "mmu", _KVM, default=False, high_rate=True),
    _tp("kvm_tdp_mmu_spte_changed", "kvmmmu", "How many TDP MMU SPTEs changed?", "mmu",
        _TDP, default=False, high_rate=True),
    _fn("kvm_mmu_load", "How often was an MMU root (re)loaded after it was invalidated?",
        "mmu", _KVM, default=True),
    _fn("kvm_mmu_reset_context", "How often was the vCPU's MMU context reset (CR0/CR4/EFER "
        "changes)?", "mmu", _KVM, default=True),
    _fn("kvm_set_cr3", "How many CR3 writes reached KVM's handler?", "cr", _KVM,
        default=True),
    _fn("kvm_mmu_create", "How many vCPU MMUs were created?", "mmu", _KVM, default=True),
    _fn("vmx_load_mmu_pgd", "How many page-table roots were loaded into the VMCS (Intel)?",
        "root", _INTEL, default=True),
    _fn("svm_load_mmu_pgd", "How many page-table roots were loaded into the VMCB (AMD)?",
        "root", _AMD, default=True),
    _fn("construct_eptp", "How many EPT pointers were built?", "function",
        frozenset({"ept"}), default=False),
    _fn("kvm_mmu_page_fault", "How many faults entered KVM's MMU fault handler?", "fault",
        _KVM, default=False),
    _fn("handle_ept_violation", "How many EPT violations were handled?", "fault",
        frozenset({"ept"}), default=False),
    _fn("vmx_vcpu_run", "How many VMX guest runs (entries) were made?", "function", _INTEL,
        default=False),
    _fn("svm_vcpu_run", "How many SVM guest runs (entries) were made?", "function", _AMD,
        default=False),
    _fn("kvm_arch_vcpu_ioctl_run", "How many KVM_RUN ioctls did QEMU make (userspace "
        "round trips)?", "function", _KVM, default=False),
    # Appended, not inserted: a probe's index is its id in programs and their output.
    _tp("kvm_mmu_set_accessed_bit", "kvmmmu", "How many guest accessed bits did KVM's own "
        "page-table walker set (shadow-paging faults, emulated accesses)?", "mmu", _KVM),
    _tp("kvm_mmu_set_dirty_bit", "kvmmmu", "How many guest dirty bits did KVM's own "
        "page-table walker set (shadow-paging write faults, emulated writes)?", "mmu", _KVM),
    _fn("kvm_mmu_new_pgd", "How many guest CR3 changes reached KVM's MMU (root switches, "
        "cached or not)?", "mmu", _KVM, default=True),
    # On kernels built with TDX (6.16+) the VMX op is this wrapper around
    # vmx_load_mmu_pgd; category "function", so root_loads does not count both.
    _fn("vt_load_mmu_pgd", "How many roots went through the VMX/TDX dispatch wrapper "
        "(kernels built with CONFIG_KVM_INTEL_TDX)?", "function", _INTEL, default=False),
)

#: The probe that sees guest phase markers.
MARKER_PROBE: Final = "kvm_cpuid"

_BY_NAME: Final[dict[str, Probe]] = {p.name: p for p in CATALOGUE}
if len(_BY_NAME) != len(CATALOGUE):  # pragma: no cover - catalogue invariant
    raise RuntimeError("duplicate probe names in CATALOGUE")

#: Named groups accepted by :func:`select`.
GROUPS: Final[dict[str, tuple[str, ...]]] = {
    "default": tuple(p.name for p in CATALOGUE if p.default),
    "all": tuple(p.name for p in CATALOGUE),
    "tracepoints": tuple(p.name for p in CATALOGUE if p.kind == "tracepoint"),
    "functions": tuple(p.name for p in CATALOGUE if p.kind != "tracepoint"),
    "markers": ("kvm_cpuid",),
}


#: Probes whose stacks answer "which path did this MMU work come from" (``stacks = ["stacks"]``):
#: root lookups, and the root-load, CR3 and context-reset functions where they attach. These
#: are rare next to faults and exits, and a stack costs about 2 us per event (measured: a
#: stack per emulated instruction made the micro guest 5.9x slower, counting alone 2.1x), so
#: kvm_page_fault and kvm_exit, whose path is nearly always the same, are stacked only by name.
STACK_GROUP: Final = "stacks"
STACK_DEFAULT: Final[tuple[str, ...]] = tuple(
    p.name
    for p in CATALOGUE
    if p.name == "kvm_mmu_get_page" or p.category == "root"
    or p.name in ("kvm_mmu_load", "kvm_set_cr3", "kvm_mmu_new_pgd", "kvm_mmu_reset_context")
)


#: Largest sampling period of a stacked probe (``stacks = ["kvm_emulate_insn/64"]``); a rate
#: target's period is kept in 1..MAX_STACK_PERIOD too.
MAX_STACK_PERIOD: Final = 1 << 20
#: Largest rate target (``stacks = ["kvm_emulate_insn@1000hz"]``), stacks per second per CPU.
MAX_STACK_RATE: Final = 100_000

_RATE = re.compile(r"([0-9]+)hz", re.ASCII)


class StackEntry(NamedTuple):
    """One ``stacks`` entry: a probe (or group) and how its stacks are sampled.

    ``period`` N (``name/N``): a stack on every Nth event per CPU and VM (1: every
    event). ``rate_hz`` R (``name@Rhz``): about R stacks per second per CPU and VM,
    the period picked in the kernel from the probe's measured event rate (period is 1
    then, and means nothing).
    """

    name: str
    period: int = 1
    rate_hz: int | None = None

    def __str__(self) -> str:
        if self.rate_hz is not None:
            return f"{self.name}@{self.rate_hz}hz"
        return self.name if self.period == 1 else f"{self.name}/{self.period}"

    @property
    def sampled(self) -> bool:
        """Whether only some events get a stack (paths are then estimates)."""
        return self.rate_hz is not None or self.period > 1


def split_stack_entry(entry: str) -> StackEntry:
    """``"kvm_emulate_insn/64"`` -> period 64; ``"kvm_emulate_insn@1000hz"`` -> rate 1000.

    A period N takes a kernel stack on every Nth event of the probe per CPU (and VM);
    a rate R about R stacks per second per CPU (and VM), whatever the event rate. The
    event counts stay exact either way. No suffix: every event (period 1). ValueError
    naming the entry and the fix otherwise.
    """
    if "@" in entry:
        name, _, rate = entry.partition("@")
        if "/" in name:
            raise ValueError(
                f"stacks: {entry!r}: give a period ('/N') or a rate ('@Rhz'), not both, "
                f"e.g. {name.partition('/')[0].strip() or 'kvm_emulate_insn'}@1000hz"
            )
        m = _RATE.fullmatch(rate.strip().lower())
        if m is None or not 1 <= int(m.group(1)) <= MAX_STACK_RATE:
            raise ValueError(
                f"stacks: {entry!r}: the rate after '@' must be a whole number of stacks per "
                f"second in 1..{MAX_STACK_RATE} followed by 'hz' (about R stacks a second "
                f"per CPU), e.g. {name.strip() or 'kvm_emulate_insn'}@1000hz"
            )
        return StackEntry(name, 1, int(m.group(1)))
    name, sep, period = entry.partition("/")
    if not sep:
        return StackEntry(entry)
    if not period.isdecimal() or not 1 <= int(period) <= MAX_STACK_PERIOD:
        raise ValueError(
            f"stacks: {entry!r}: the sampling period after '/' must be a whole number in "
            f"1..{MAX_STACK_PERIOD} (a stack every Nth event per CPU), e.g. "
            f"{name.strip() or 'kvm_emulate_insn'}/64"
        )
    return StackEntry(name, int(period))


def stack_sampling(
    names_or_groups: Iterable[str], traced: Iterable[Probe] | None = None
) -> dict[str, StackEntry]:
    """Probe name -> its :class:`StackEntry` (name = the probe) for each probe to stack.

    Groups resolve as in :func:`select_stacks`. A probe named on its own overrides the
    sampling of a group that holds it; the same probe named twice with different
    periods or rates, or with both a period and a rate, is a ValueError.
    """
    traced_list = None if traced is None else list(traced)
    named: dict[str, StackEntry] = {}
    grouped: dict[str, StackEntry] = {}
    for item in names_or_groups:
        entry = split_stack_entry(item)
        for p in select_stacks([entry.name], traced_list):
            mine = entry._replace(name=p.name)
            old = named.get(p.name, mine)
            if entry.name in (STACK_GROUP, *GROUPS):
                grouped[p.name] = mine
            elif old == mine:
                named[p.name] = mine
            elif (old.rate_hz is None) != (mine.rate_hz is None):
                raise ValueError(
                    f"stacks: {p.name} is listed with a period and with a rate ({old} and "
                    f"{mine}); list it once, either {p.name}/N (a stack every Nth event) or "
                    f"{p.name}@Rhz (about R stacks a second)"
                )
            elif old.rate_hz is not None:
                raise ValueError(
                    f"stacks: {p.name} is listed with rates {old.rate_hz}hz and "
                    f"{mine.rate_hz}hz; list it once (e.g. {mine})"
                )
            else:
                raise ValueError(
                    f"stacks: {p.name} is listed with periods {old.period} and {mine.period}; "
                    f"list it once (e.g. {p.name}/{mine.period})"
                )
    return {**grouped, **named}


def stack_periods(
    names_or_groups: Iterable[str], traced: Iterable[Probe] | None = None
) -> dict[str, int]:
    """Probe name -> fixed sampling period for each probe to stack (rate targets: 1)."""
    return {n: e.period for n, e in stack_sampling(names_or_groups, traced).items()}


def stack_rates(
    names_or_groups: Iterable[str], traced: Iterable[Probe] | None = None
) -> dict[str, int]:
    """Probe name -> rate target (stacks per second per CPU) of the rate-target probes."""
    return {n: e.rate_hz for n, e in stack_sampling(names_or_groups, traced).items()
            if e.rate_hz is not None}


def stack_entries(
    names_or_groups: Iterable[str], traced: Iterable[Probe] | None = None
) -> list[str]:
    """The tracer's ``stacks`` argument: ``name``, ``name/N`` or ``name@Rhz`` per probe."""
    return [str(e) for _, e in sorted(stack_sampling(names_or_groups, traced).items())]


def select_stacks(
    names_or_groups: Iterable[str], traced: Iterable[Probe] | None = None
) -> list[Probe]:
    """Resolve the probes to stack: names, probe groups, or "stacks" (the MMU default set).

    The "stacks" group takes only those of its probes that are ``traced``, so it
    fits any probe selection; a probe named on its own must be traced (spec.py).
    """
    traced_names = None if traced is None else {p.name for p in traced}
    wanted: set[str] = set()
    for entry in names_or_groups:
        item = split_stack_entry(entry).name
        if item == STACK_GROUP:
            wanted.update(n for n in STACK_DEFAULT if traced_names is None or n in traced_names)
        elif item in GROUPS:
            wanted.update(GROUPS[item])
        else:
            wanted.add(get(item).name)
    return [p for p in CATALOGUE if p.name in wanted]


def probe_id(name: str) -> int:
    """Stable numeric id of a probe (its catalogue index), used as a map key."""
    return CATALOGUE.index(get(name))


def get(name: str) -> Probe:
    """The catalogue entry called ``name``; ValueError listing valid names otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        # `harness probes` shows targets too; someone may copy one ("kvmmmu:kvm_mmu_get_page").
        by_target = [p.name for p in CATALOGUE if name in (p.target, p.target.split(":")[-1])]
        close = by_target or difflib.get_close_matches(name, [*_BY_NAME, *GROUPS], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown probe {name!r}{hint}; valid probes: {', '.join(_BY_NAME)}; "
            f"groups: {', '.join(GROUPS)}"
        ) from None


def select(names_or_groups: Iterable[str]) -> list[Probe]:
    """Resolve probe names and group names ("default", "all", ...) to probes.

    The result has no duplicates and keeps catalogue order, so the same
    selection always yields the same program. The marker probe (kvm_cpuid) is
    always included: guest-marker phase attribution depends on it.
    """
    wanted: set[str] = {MARKER_PROBE}
    for item in names_or_groups:
        if item in GROUPS:
            wanted.update(GROUPS[item])
        else:
            wanted.add(get(item).name)
    return [p for p in CATALOGUE if p.name in wanted]


# --- host view ----------------------------------------------------------------


@dataclass(frozen=True)
class HostView:
    """What the host offers to probes, gathered once; every field is plain data.

    ``btf_functions`` is None when the kernel has no BTF at all;
    ``bpftrace_kfunc`` is None when bpftrace could not be asked.
    """

    is_root: bool
    tracefs: Path | None
    tracepoints: frozenset[str]
    btf_functions: frozenset[str] | None
    bpftrace_kfunc: bool | None
    kprobes_enabled: bool
    kallsyms: frozenset[str]
    mmu_mode: str | None = None
    notes: tuple[str, ...] = field(default=())

    @classmethod
    def probe(cls, bpftrace: str = "bpftrace", mmu_mode: str | None = None) -> HostView:
        """Read the live host (tracefs, BTF, kallsyms, ``bpftrace --info``)."""
        tracefs = find_tracefs()
        return cls(
            is_root=os.geteuid() == 0,
            tracefs=tracefs,
            tracepoints=read_tracepoints(tracefs) if tracefs else frozenset(),
            btf_functions=read_btf_functions(),
            bpftrace_kfunc=bpftrace_supports_kfunc(bpftrace),
            kprobes_enabled=kprobes_enabled(),
            kallsyms=read_kallsyms(),
            mmu_mode=mmu_mode,
        )


@dataclass(frozen=True)
class ProbeStatus:
    """Whether ``probe`` can be attached here; ``attach`` is the bpftrace probe spec if so."""

    probe: Probe
    available: bool
    reason: str
    attach: str | None = None


def availability(probes: Sequence[Probe], view: HostView | None = None) -> list[ProbeStatus]:
    """Decide for each probe whether it can be attached on the host ``view`` describes.

    Unavailable probes carry the reason (so results can list what was not
    attached and why); available probes note when the MMU mode means they will
    not fire.
    """
    v = view if view is not None else HostView.probe()
    return [_status(p, v) for p in probes]


def _status(p: Probe, v: HostView) -> ProbeStatus:
    if not v.is_root:
        return ProbeStatus(p, False, "not root: bpftrace needs CAP_BPF/CAP_SYS_ADMIN; run as root")
    if p.kind == "tracepoint":
        if v.tracefs is None:
            return ProbeStatus(
                p, False, "tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing"
            )
        if p.target not in v.tracepoints:
            return ProbeStatus(
                p, False, f"tracepoint {p.target} not in {v.tracefs}/events (kvm module not "
                "loaded, or this kernel predates it)"
            )
        return ProbeStatus(p, True, _fires_note(p, v, f"tracepoint {p.target}"),
                           f"tracepoint:{p.target}")
    # Function probes: kfunc first, kprobe as fallback.
    why_not: list[str] = []
    if v.btf_functions is None:
        why_not.append("kfunc: no kernel BTF (/sys/kernel/btf/vmlinux missing)")
    elif p.target not in v.btf_functions:
        why_not.append(f"kfunc: {p.target} not in kernel or module BTF (kvm_intel/kvm_amd "
                       "not loaded, or inlined)")
    elif v.bpftrace_kfunc is not True:
        why_not.append("kfunc: bpftrace --info reports no kfunc support")
    else:
        return ProbeStatus(p, True, _fires_note(p, v, f"kfunc {p.target} (BTF)"),
                           f"kfunc:{p.target}")
    if not v.kprobes_enabled:
        why_not.append(
            "kprobe: kernel built without CONFIG_KPROBES (no /sys/kernel/debug/kprobes, "
            "no /sys/bus/event_source/devices/kprobe)"
        )
    elif p.target not in v.kallsyms:
        why_not.append(f"kprobe: {p.target} not in /proc/kallsyms (module not loaded?)")
    else:
        return ProbeStatus(p, True, _fires_note(p, v, f"kprobe {p.target}"),
                           f"kprobe:{p.target}")
    return ProbeStatus(p, False, "; ".join(why_not))


def _fires_note(p: Probe, v: HostView, what: str) -> str:
    if v.mmu_mode is not None and v.mmu_mode not in p.mmu_modes:
        return f"{what} attaches, but does not fire under MMU mode {v.mmu_mode!r}"
    return f"{what} attaches"


# --- live host readers -----------------------------------------------------------


def find_tracefs(candidates: Sequence[Path] = TRACEFS_CANDIDATES) -> Path | None:
    """The first mounted tracefs (it has an ``events`` directory), or None."""
    for c in candidates:
        if (c / "events").is_dir():
            return c
    return None


def read_tracepoints(tracefs: Path) -> frozenset[str]:
    """All ``system:event`` names under ``tracefs/events``."""
    out: set[str] = set()
    events = tracefs / "events"
    for system in events.iterdir():
        if not system.is_dir():
            continue
        for ev in system.iterdir():
            if (ev / "format").exists():
                out.add(f"{system.name}:{ev.name}")
    return frozenset(out)


def kprobes_enabled() -> bool:
    """True when the kernel has CONFIG_KPROBES (either interface is visible)."""
    return (
        Path("/sys/kernel/debug/kprobes").exists()
        or Path("/sys/bus/event_source/devices/kprobe").exists()
    )


def read_kallsyms(path: Path = Path("/proc/kallsyms")) -> frozenset[str]:
    """Text (function) symbol names from ``/proc/kallsyms``, module suffixes stripped."""
    try:
        text = path.read_text()
    except OSError:
        return frozenset()
    return parse_kallsyms(text)


def parse_kallsyms(text: str) -> frozenset[str]:
    """Function names in kallsyms text (types t/T); ``.cold``-style clones are skipped."""
    out: set[str] = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in ("t", "T") and "." not in parts[2]:
            out.add(parts[2])
    return frozenset(out)


def bpftrace_supports_kfunc(bpftrace: str = "bpftrace") -> bool | None:
    """Parse ``bpftrace --info`` for "kfunc: yes"; None when bpftrace cannot be run."""
    try:
        proc = subprocess.run([bpftrace, "--info"], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_bpftrace_info_kfunc(proc.stdout + proc.stderr)


def parse_bpftrace_info_kfunc(text: str) -> bool | None:
    """The "kfunc:" line of ``bpftrace --info`` output as a bool (None when absent)."""
    m = re.search(r"^\s*kfunc:\s*(yes|no)\s*$", text, re.MULTILINE)
    return None if m is None else m.group(1) == "yes"


# BTF (include/uapi/linux/btf.h): kinds and the size of the data after each type.
_BTF_MAGIC: Final = 0xEB9F
_BTF_KIND_FUNC: Final = 12


def _btf_extra(kind: int, vlen: int) -> int:
    if kind == 1:  # INT
        return 4
    if kind == 3:  # ARRAY
        return 12
    if kind in (4, 5):  # STRUCT, UNION
        return 12 * vlen
    if kind == 6:  # ENUM
        return 8 * vlen
    if kind == 13:  # FUNC_PROTO
        return 8 * vlen
    if kind == 14:  # VAR
        return 4
    if kind == 15:  # DATASEC
        return 12 * vlen
    if kind == 17:  # DECL_TAG
        return 4
    if kind == 19:  # ENUM64
        return 12 * vlen
    return 0  # PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG


def _btf_strings(data: bytes) -> bytes:
    """The string section of a raw BTF blob."""
    if len(data) < 24:
        raise ValueError("BTF blob too short")
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != _BTF_MAGIC:
        raise ValueError(f"not BTF (magic {magic:#x})")
    _type_off, _type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    return data[hdr_len + str_off:hdr_len + str_off + str_len]


def btf_function_names(data: bytes, base: bytes | None = None) -> frozenset[str]:
    """Names of FUNC types in a raw BTF blob.

    Module BTF is "split" BTF: name offsets below the length of the base
    (vmlinux) string section point into the base, so pass the vmlinux blob as
    ``base`` for modules.
    """
    strings = _btf_strings(data)
    base_strings = _btf_strings(base) if base is not None else b""
    hdr_len = struct.unpack_from("<I", data, 4)[0]
    type_off, type_len = struct.unpack_from("<II", data, 8)
    names: set[str] = set()
    pos = hdr_len + type_off
    end = pos + type_len
    while pos + 12 <= end:
        name_off, info, _size = struct.unpack_from("<III", data, pos)
        kind = (info >> 24) & 0x1F
        pos += 12 + _btf_extra(kind, info & 0xFFFF)
        if kind != _BTF_KIND_FUNC:
            continue
        table, off = (
            (base_strings, name_off)
            if name_off < len(base_strings)
            else (strings, name_off - len(base_strings))
        )
        stop = table.find(b"\0", off)
        if 0 <= off < stop:
            names.add(table[off:stop].decode(errors="replace"))
    return frozenset(names)


@functools.lru_cache(maxsize=4)
def read_btf_functions(btf_dir: Path = Path("/sys/kernel/btf")) -> frozenset[str] | None:
    """FUNC names from vmlinux BTF plus any kvm* module BTF; None without vmlinux BTF."""
    vmlinux = btf_dir / "vmlinux"
    try:
        base = vmlinux.read_bytes()
        names = btf_function_names(base)
    except (OSError, ValueError):
        return None
    out = set(names)
    for mod in sorted(btf_dir.glob("kvm*")):
        try:
            mod_names = btf_function_names(mod.read_bytes(), base)
        except (OSError, ValueError):
            continue
        out |= mod_names
    return frozenset(out)
