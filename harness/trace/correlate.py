"""Turn a trace snapshot into per-phase records for one VM.

Every in-kernel aggregate is keyed by (pid, g, h, ...): g is the guest-marker
phase and h the host-window phase the VM was in when the event happened. A
phase whose guest markers were seen is attributed by g (exact: the marker runs
on the vCPU, no clock involved); otherwise by h (the harness's own markers
around the guest command). Each (g, h) pair goes to exactly one phase, so the
phases, including phase 0 ("outside any phase"), always add up to the
unphased totals:

* g is a guest-attributed phase          -> phase g
* else h is a host-attributed phase      -> phase h
* else                                   -> phase 0
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from harness.trace.exit_reasons import (
    decode_exit_reason,
    ept_qualification_to_error_code,
    fault_kind,
    mmu_fault_exit,
)
from harness.trace.model import Attribution, HistBucketModel, PhaseTrace
from harness.trace.parse import TraceSnapshot, select_pid
from harness.trace.probes import CATALOGUE, Probe
from harness.trace.program import DEFAULT_STACK_DEPTH, LATENCIES, TraceTarget
from harness.trace.stacks import phase_stacks, probe_stacks


@dataclass(frozen=True)
class Attributor:
    """Which phases are attributed by guest markers (``guest``) and by host windows (``host``)."""

    guest: frozenset[int]
    host: frozenset[int]

    def phase(self, g: int, h: int) -> int:
        """The phase that an event seen in guest phase ``g`` and host window ``h`` belongs to."""
        if g in self.guest:
            return g
        if h in self.host:
            return h
        return 0


def attributor(snapshot: TraceSnapshot, pid: int, phases: Iterable[int]) -> Attributor:
    """Guest attribution for phases whose markers were seen, host windows for the rest."""
    markers = select_pid(snapshot.counter("markers"), pid)
    wanted = {p for p in phases if p != 0}
    guest = frozenset(p for p in wanted if markers.get((p,), 0) > 0)
    return Attributor(guest=guest, host=frozenset(wanted - guest))


def _probe_name(ident: int) -> str | None:
    probe = _probe(ident)
    return probe.name if probe is not None else None


def _probe(ident: int) -> Probe | None:
    return CATALOGUE[ident] if 0 <= ident < len(CATALOGUE) else None


def _add(d: dict[str, int], key: str, n: int) -> None:
    d[key] = d.get(key, 0) + n


def _fault_labels(isa: int, reason: int, error_code: int) -> tuple[str, str]:
    """(fault source, fault kind) of a kvm_page_fault whose preceding exit was (isa, reason)."""
    if isa == 0:  # the causing exit was not traced (kvm_exit off, or a PVM host)
        return "page_fault", fault_kind(error_code)
    source = mmu_fault_exit(isa, reason)
    if source == "ept_violation":
        # On VMX the tracepoint carries the raw exit qualification.
        return source, fault_kind(ept_qualification_to_error_code(error_code))
    return source or "shadow_pf", fault_kind(error_code)


def phase_traces(
    snapshot: TraceSnapshot,
    target: TraceTarget,
    phases: Sequence[int],
    *,
    attached: Iterable[str] | None = None,
    mmu_mode: str | None = None,
    stack_depth: int = DEFAULT_STACK_DEPTH,
    stack_offsets: bool = False,
    stack_periods: Mapping[str, int] | None = None,
    stack_rates: Mapping[str, int] | None = None,
) -> dict[int, PhaseTrace]:
    """Per-phase records of ``target`` for ``phases`` plus phase 0 (outside any phase).

    ``attached`` names the probes that were attached (from the tracer); it
    decides whether ``root_loads`` is a number or None (no root-load probe).
    Without it, root loads count as seen when any root probe has events.
    ``mmu_mode`` (HostFacts.mmu_mode) decides ``cr3_writes_note``.
    ``stack_depth`` is the program's kstack depth (stacks that reach it were cut);
    ``stack_offsets`` keeps ``function+offset`` frames instead of function names;
    ``stack_periods`` names sampled probes and their periods (TraceProgram.stack_periods),
    ``stack_rates`` rate-target probes and their rates (TraceProgram.stack_rates).
    """
    pid = target.pid
    attr = attributor(snapshot, pid, phases)
    all_phases = sorted({0, *phases})
    guest_seen = bool(select_pid(snapshot.counter("markers"), pid))
    label: dict[int, Attribution] = {
        p: "guest-marker" if (p in attr.guest or (p == 0 and guest_seen)) else "host-window"
        for p in all_phases
    }
    recs: dict[int, dict[str, object]] = {p: {} for p in all_phases}
    by_probe: dict[int, dict[str, int]] = {p: {} for p in all_phases}
    exits: dict[int, dict[str, int]] = {p: {} for p in all_phases}
    faults: dict[int, dict[str, int]] = {p: {} for p in all_phases}
    by_error: dict[int, dict[str, int]] = {p: {} for p in all_phases}
    crs: dict[int, dict[str, int]] = {p: {} for p in all_phases}
    vcpus: dict[int, dict[str, int]] = {p: {} for p in all_phases}
    lat: dict[int, dict[str, dict[tuple[int | None, int], int]]] = {
        p: defaultdict(dict) for p in all_phases
    }

    def slot(g: int, h: int) -> int | None:
        p = attr.phase(g, h)
        return p if p in recs else None

    for (g, h, ident), n in select_pid(snapshot.counter("ev"), pid).items():
        probe = _probe(ident)
        if (p := slot(g, h)) is not None and probe is not None:
            _add(by_probe[p], probe.name, n)
    for (g, h, isa, reason), n in select_pid(snapshot.counter("exits"), pid).items():
        if (p := slot(g, h)) is not None:
            _add(exits[p], decode_exit_reason(isa, reason), n)
    for (g, h, isa, reason, ec), n in select_pid(snapshot.counter("pf"), pid).items():
        if (p := slot(g, h)) is not None:
            source, kind = _fault_labels(isa, reason, ec)
            _add(faults[p], source, n)
            _add(by_error[p], kind, n)
    for (g, h, cr), n in select_pid(snapshot.counter("crw"), pid).items():
        if (p := slot(g, h)) is not None:
            _add(crs[p], str(cr), n)
    for (tid, g, h), n in select_pid(snapshot.counter("vcpu"), pid).items():
        if (p := slot(g, h)) is not None:
            _add(vcpus[p], str(tid), n)
    for key, buckets in snapshot.hist("lat").items():
        if len(key) != 4 or key[0] != pid:
            continue
        _, g, h, lid = key
        if (p := slot(g, h)) is None or lid not in LATENCIES:
            continue
        merged = lat[p][LATENCIES[lid][0]]
        for b in buckets:
            merged[(b.low, b.high)] = merged.get((b.low, b.high), 0) + b.count

    markers = select_pid(snapshot.counter("markers"), pid)
    hmarks = select_pid(snapshot.counter("hmarks"), pid)
    first = {
        "guest-marker": select_pid(snapshot.counter("marker_ns"), pid),
        "host-window": select_pid(snapshot.counter("hmark_ns"), pid),
    }
    durs = {
        "guest-marker": select_pid(snapshot.counter("gdur"), pid),
        "host-window": select_pid(snapshot.counter("hdur"), pid),
    }
    totals = select_pid(snapshot.counter("total"), pid)
    if attached is not None:
        attached_names = set(attached)
    else:
        attached_names = {p.name for i, p in enumerate(CATALOGUE) if (i,) in totals}
    roots_visible = any(p.category == "root" and p.name in attached_names for p in CATALOGUE)
    cr3_note = cr3_writes_note(mmu_mode, "kvm_cr" in attached_names)
    # @getpage[pid, g, h, created]: absent when empty or when the program had no split.
    getpage: dict[int, dict[int, int]] = {p: {} for p in all_phases}
    for (g, h, made), n in select_pid(snapshot.counter("getpage"), pid).items():
        if (p := slot(g, h)) is not None:
            getpage[p][made] = getpage[p].get(made, 0) + n
    split_traced = "getpage" in snapshot.counters

    def get_page_split(p: int, total: int) -> tuple[int | None, int | None]:
        if "kvm_mmu_get_page" not in attached_names:
            return None, None
        if split_traced or total == 0:  # no events: zero either way
            return getpage[p].get(1, 0), getpage[p].get(0, 0)
        return None, None  # events, but a program without the split

    stk = phase_stacks(snapshot, pid, slot, _probe_name, offsets=stack_offsets,
                       depth=stack_depth)
    # Rate targets: the summed weights (and squares) of each stack, folded alike.
    stkw, stkw2 = (
        phase_stacks(snapshot, pid, slot, _probe_name, offsets=stack_offsets,
                     depth=stack_depth, map_name=m) if stack_rates else {}
        for m in ("stkw", "stkw2")
    )
    out: dict[int, PhaseTrace] = {}
    for p in all_phases:
        ev = by_probe[p]
        how = label[p]
        created, found = get_page_split(p, ev.get("kvm_mmu_get_page", 0))
        out[p] = PhaseTrace(
            attribution=how,
            markers_seen=markers.get((p,), 0),
            host_marks_seen=hmarks.get((p,), 0),
            marker_ns=first[how].get((p,)),
            duration_ns=durs[how].get((p,)),
            exits=exits[p],
            mmu_faults=faults[p],
            page_faults_by_error=by_error[p],
            mmu_events={k: v for k, v in ev.items() if _category(k) == "mmu"},
            cr3_writes=crs[p].get("3", 0),
            cr3_writes_note=cr3_note,
            shadow_pages_created=created,
            shadow_pages_found=found,
            cr_writes=crs[p],
            root_loads=(
                sum(v for k, v in ev.items() if _category(k) == "root") if roots_visible else None
            ),
            emulated_insns=ev.get("kvm_emulate_insn", 0),
            pio=ev.get("kvm_pio", 0),
            mmio=ev.get("kvm_mmio", 0),
            function_calls={k: v for k, v in ev.items() if _kind(k) != "tracepoint"},
            events_by_probe=dict(sorted(ev.items())),
            events_total=sum(ev.values()),
            per_vcpu=vcpus[p],
            latency_ns={
                name: [HistBucketModel(low=lo, high=hi, count=c)
                       for (lo, hi), c in sorted(b.items(), key=lambda x: x[0][1])]
                for name, b in lat[p].items()
            },
            stacks=probe_stacks(stk.get(p, {}), ev, stack_depth, stack_periods, stack_rates,
                                stkw.get(p, {}), stkw2.get(p, {})),
        )
    return out


def cr3_writes_note(mmu_mode: str | None, kvm_cr_attached: bool) -> str | None:
    """Why ``cr3_writes`` (from kvm:kvm_cr) is not the guest's CR3 write count, or None.

    kvm_cr fires in the VMX/SVM control-register exit handlers only: it sees
    CR3 loads that exit to KVM (shadow paging on VMX/SVM), none under EPT/NPT
    (CR3 loads do not exit), and none on PVM (MOV CR3 is emulated).
    """
    if not kvm_cr_attached:
        return "kvm:kvm_cr was not traced: cr3_writes is not a count"
    if mmu_mode == "pvm":
        return (
            "this host's KVM (PVM) emulates guest MOV CR3 without the VMX/SVM CR-access exit "
            "where kvm:kvm_cr fires: cr3_writes = 0 here is not the guest's CR3 write count"
        )
    if mmu_mode in ("ept", "npt"):
        return (
            f"under {mmu_mode.upper()} guest CR3 loads do not exit to KVM: cr3_writes counts "
            "only the ones KVM intercepted"
        )
    return None


def unphased_totals(snapshot: TraceSnapshot, target: TraceTarget) -> dict[str, int]:
    """Events per probe for ``target`` regardless of phase (``@total``)."""
    out: dict[str, int] = {}
    for (ident,), n in select_pid(snapshot.counter("total"), target.pid).items():
        probe = _probe(ident)
        if probe is not None:
            out[probe.name] = n
    return out


def _category(name: str) -> str:
    return next(p.category for p in CATALOGUE if p.name == name)


def _kind(name: str) -> str:
    return next(p.kind for p in CATALOGUE if p.name == name)
