"""Per-phase attribution of in-kernel aggregates (guest markers first, host windows else)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from harness.trace.correlate import attributor, phase_traces, unphased_totals
from harness.trace.exit_reasons import ept_qualification_to_error_code, fault_kind
from harness.trace.parse import TraceSnapshot, snapshot_from_lines
from harness.trace.probes import probe_id
from harness.trace.program import TraceTarget

VM = TraceTarget("vm", 100, 1)
OTHER = 200
EXIT, PF, CR, CPUID, PIO, EMU, GETPAGE = (
    probe_id(n) for n in ("kvm_exit", "kvm_page_fault", "kvm_cr", "kvm_cpuid", "kvm_pio",
                          "kvm_emulate_insn", "kvm_mmu_get_page")
)
EPT_QUAL = 0x182  # write, GVA valid and translated


Counts = Mapping[tuple[int, ...], int]


def _line(name: str, values: Mapping[tuple[int, ...], object], kind: str = "map") -> str:
    data = {",".join(str(k) for k in key): v for key, v in values.items()}
    return json.dumps({"type": kind, "data": {f"@{name}": data}})


def make_snapshot(ev: Counts, **extra: Counts) -> TraceSnapshot:
    """A snapshot whose @total and @vcpu agree with ``ev`` (as the kernel maps do)."""
    total: dict[tuple[int, ...], int] = {}
    vcpu: dict[tuple[int, ...], int] = {}
    for (pid, g, h, probe), n in ev.items():
        total[(pid, probe)] = total.get((pid, probe), 0) + n
        tid = pid + 1 if probe != GETPAGE else pid  # MMU work on the main thread
        vcpu[(pid, tid, g, h)] = vcpu.get((pid, tid, g, h), 0) + n
    lines = [_line("ev", dict(ev)), _line("total", total), _line("vcpu", vcpu)]
    lines += [_line(name, dict(v)) for name, v in extra.items()]
    lines.append(_line("lat", {
        (100, 1, 1, 0): [{"min": 1024, "max": 2047, "count": 3}],
        (100, 1, 3, 0): [{"min": 1024, "max": 2047, "count": 1},
                         {"min": 2048, "max": 4095, "count": 2}],
        (OTHER, 1, 1, 0): [{"min": 1, "max": 1, "count": 9}],
    }, kind="hist"))
    return snapshot_from_lines(lines)


EV: dict[tuple[int, ...], int] = {
    (100, 0, 0, CPUID): 10,      # BIOS before any marker -> phase 0
    (100, 0, 0, GETPAGE): 4,
    (100, 1, 1, CPUID): 1,       # the marker itself counts in its new phase
    (100, 1, 1, EMU): 1000,
    (100, 1, 1, EXIT): 4,
    (100, 1, 1, PF): 4,
    (100, 1, 1, CR): 8,
    (100, 1, 3, PIO): 5,         # guest phase 1 wins over host window 3
    (100, 2, 2, EMU): 2000,
    (100, 2, 2, EXIT): 6,
    (100, 2, 2, PF): 6,
    (100, 0, 3, EMU): 500,       # no guest marker for 3 -> host window 3
    (100, 7, 0, PIO): 3,         # unknown guest phase 7, no window -> phase 0
    (100, 0, 0, PF): 2,
    (OTHER, 1, 1, EMU): 99,      # another VM: never counted for VM
}
EXTRA: dict[str, Counts] = {
    "markers": {(100, 1): 1, (100, 2): 1, (100, 0): 2, (OTHER, 1): 1},
    "marker_ns": {(100, 1): 1_000, (100, 2): 5_000, (100, 0): 9_000},
    "gdur": {(100, 1): 4_000, (100, 2): 4_000},
    "hmarks": {(100, 3): 1, (100, 1): 1},
    "hmark_ns": {(100, 3): 20_000, (100, 1): 500},
    "hdur": {(100, 3): 7_000},
    "exits": {(100, 1, 1, 1, 48): 4, (100, 2, 2, 2, 0x400): 6},
    "pf": {(100, 1, 1, 1, 48, EPT_QUAL): 4, (100, 2, 2, 2, 0x400, 0x6): 6,
           (100, 0, 0, 0, 0, 0x2): 2},
    "crw": {(100, 1, 1, 3): 7, (100, 1, 1, 0): 1},
}


def test_attribution_labels_and_rule() -> None:
    snap = make_snapshot(EV, **EXTRA)
    attr = attributor(snap, VM.pid, [1, 2, 3])
    assert attr.guest == {1, 2} and attr.host == {3}
    assert (attr.phase(1, 3), attr.phase(0, 3), attr.phase(7, 0), attr.phase(2, 0)) == (1, 3, 0, 2)
    pt = phase_traces(snap, VM, [1, 2, 3])
    assert sorted(pt) == [0, 1, 2, 3]
    assert {p: t.attribution for p, t in pt.items()} == {
        0: "guest-marker", 1: "guest-marker", 2: "guest-marker", 3: "host-window"}
    assert pt[1].markers_seen == 1 and pt[1].host_marks_seen == 1
    assert pt[0].markers_seen == 2
    assert pt[3].markers_seen == 0 and pt[3].host_marks_seen == 1
    # Timestamps and durations come from the attribution that was used.
    assert (pt[1].marker_ns, pt[1].duration_ns) == (1_000, 4_000)
    assert (pt[3].marker_ns, pt[3].duration_ns) == (20_000, 7_000)
    assert pt[0].marker_ns == 9_000 and pt[0].duration_ns is None


def test_phases_including_zero_add_up_to_unphased_totals() -> None:
    snap = make_snapshot(EV, **EXTRA)
    pt = phase_traces(snap, VM, [1, 2, 3])
    totals = unphased_totals(snap, VM)
    assert sum(t.events_total for t in pt.values()) == sum(totals.values())
    for name, n in totals.items():
        assert sum(t.events_by_probe.get(name, 0) for t in pt.values()) == n
    for t in pt.values():
        assert sum(t.per_vcpu.values()) == t.events_total
    assert totals["kvm_emulate_insn"] == 3500  # the other VM's 99 are not included


def test_per_phase_contents() -> None:
    pt = phase_traces(make_snapshot(EV, **EXTRA), VM, [1, 2, 3])
    one, two, three, zero = pt[1], pt[2], pt[3], pt[0]
    assert one.emulated_insns == 1000 and two.emulated_insns == 2000
    assert three.emulated_insns == 500 and zero.emulated_insns == 0
    assert one.pio == 5 and zero.pio == 3
    assert one.exits == {"EPT_VIOLATION": 4} and two.exits == {"npf": 6}
    assert one.mmu_faults == {"ept_violation": 4} and two.mmu_faults == {"npf": 6}
    assert one.page_faults_by_error == {
        fault_kind(ept_qualification_to_error_code(EPT_QUAL)): 4}
    assert two.page_faults_by_error == {fault_kind(0x6): 6}
    assert zero.mmu_faults == {"page_fault": 2}
    assert one.cr3_writes == 7 and one.cr_writes == {"3": 7, "0": 1}
    assert zero.mmu_events == {"kvm_mmu_get_page": 4}
    assert zero.per_vcpu == {"100": 4, "101": 15}
    assert one.root_loads is None and one.function_calls == {}
    lat = one.latency_ns["exit_to_entry"]
    assert [(b.low, b.high, b.count) for b in lat] == [(1024, 2047, 4), (2048, 4095, 2)]
    assert two.latency_ns == {}


def test_host_windows_only_when_no_guest_markers() -> None:
    extra = {k: v for k, v in EXTRA.items() if k not in ("markers", "marker_ns", "gdur")}
    ev: Counts = {(100, 0, h, EMU): n for h, n in ((0, 7), (1, 11), (2, 13))}
    pt = phase_traces(make_snapshot(ev, **extra), VM, [1, 2])
    assert {p: t.attribution for p, t in pt.items()} == {
        0: "host-window", 1: "host-window", 2: "host-window"}
    assert {p: t.emulated_insns for p, t in pt.items()} == {0: 7, 1: 11, 2: 13}
    assert pt[1].marker_ns == 500


def test_root_loads_visible_only_with_a_root_probe() -> None:
    snap = make_snapshot(EV, **EXTRA)
    assert phase_traces(snap, VM, [1], attached=["kvm_exit"])[1].root_loads is None
    pgd = probe_id("vmx_load_mmu_pgd")
    pt = phase_traces(snap, VM, [1], attached=["kvm_exit", "vmx_load_mmu_pgd"])
    assert pt[1].root_loads == 0
    ev = dict(EV)
    ev[(100, 1, 1, pgd)] = 3
    pt = phase_traces(make_snapshot(ev, **EXTRA), VM, [1])  # inferred from @total
    assert pt[1].root_loads == 3 and pt[1].function_calls == {"vmx_load_mmu_pgd": 3}


def test_empty_snapshot_still_reports_phase_zero() -> None:
    pt = phase_traces(TraceSnapshot(), VM, [1])
    assert pt[0].events_total == 0 and pt[1].attribution == "host-window"
    assert pt[0].model_dump()["events_total"] == 0


def test_get_page_split_by_created_and_its_absence() -> None:
    ev = {(100, 0, 0, GETPAGE): 4, (100, 1, 1, GETPAGE): 7, (100, 2, 2, CPUID): 1}
    markers = {(100, 1): 1, (100, 2): 1}
    split = make_snapshot(ev, markers=markers,
                          getpage={(100, 0, 0, 1): 4, (100, 1, 1, 1): 2, (100, 1, 1, 0): 5})
    pt = phase_traces(split, VM, [1, 2], attached=["kvm_mmu_get_page", "kvm_cpuid"])
    assert [(pt[p].shadow_pages_created, pt[p].shadow_pages_found) for p in (0, 1, 2)] == [
        (4, 0), (2, 5), (0, 0)]
    # The split adds up to the phase's kvm_mmu_get_page events.
    for t in pt.values():
        assert (t.shadow_pages_created or 0) + (t.shadow_pages_found or 0) == t.mmu_events.get(
            "kvm_mmu_get_page", 0)
    # A program without the split: unknown where there were events, zero where there were none.
    old = phase_traces(make_snapshot(ev, markers=markers), VM, [1, 2],
                       attached=["kvm_mmu_get_page", "kvm_cpuid"])
    assert (old[1].shadow_pages_created, old[1].shadow_pages_found) == (None, None)
    assert (old[2].shadow_pages_created, old[2].shadow_pages_found) == (0, 0)
    # Not traced at all: unknown everywhere.
    none = phase_traces(split, VM, [1, 2], attached=["kvm_cpuid"])
    assert all(t.shadow_pages_created is None for t in none.values())


def test_cr3_writes_note_says_when_zero_is_not_a_count() -> None:
    snap = make_snapshot(EV, markers={(100, 1): 1})
    names = ["kvm_cr", "kvm_cpuid"]
    pvm = phase_traces(snap, VM, [1], attached=names, mmu_mode="pvm")
    assert pvm[1].cr3_writes_note is not None and "emulates guest MOV CR3" in pvm[1].cr3_writes_note
    ept = phase_traces(snap, VM, [1], attached=names, mmu_mode="ept")[1].cr3_writes_note
    assert ept is not None and "do not exit" in ept
    assert phase_traces(snap, VM, [1], attached=names, mmu_mode="shadow")[1].cr3_writes_note is None
    untraced = phase_traces(snap, VM, [1], attached=["kvm_cpuid"], mmu_mode="shadow")
    assert untraced[1].cr3_writes_note == "kvm:kvm_cr was not traced: cr3_writes is not a count"
