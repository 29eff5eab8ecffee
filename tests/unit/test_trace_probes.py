"""The probe catalogue, selection, and availability rules over injected and live host views."""

from __future__ import annotations

import os
import struct
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from harness.trace import probes as P
from tests.conftest import prerequisite_missing

TRACEPOINTS = frozenset(p.target for p in P.CATALOGUE if p.kind == "tracepoint")
FUNCTIONS = frozenset(p.target for p in P.CATALOGUE if p.kind != "tracepoint")

#: A VMX host with kfunc support: everything should attach as kfunc.
RICH = P.HostView(
    is_root=True,
    tracefs=Path("/sys/kernel/tracing"),
    tracepoints=TRACEPOINTS,
    btf_functions=FUNCTIONS,
    bpftrace_kfunc=True,
    kprobes_enabled=True,
    kallsyms=FUNCTIONS,
    mmu_mode="ept",
)


def test_catalogue_covers_the_brief() -> None:
    names = {p.name for p in P.CATALOGUE}
    for n in ("kvm_exit", "kvm_page_fault", "kvm_cr", "kvm_cpuid", "kvm_pio", "kvm_mmio",
              "kvm_emulate_insn", "kvm_entry", "kvm_mmu_get_page", "kvm_mmu_prepare_zap_page",
              "kvm_mmu_sync_page", "kvm_mmu_unsync_page", "fast_page_fault", "kvm_mmu_set_spte",
              "kvm_tdp_mmu_spte_changed", "kvm_mmu_split_huge_page", "kvm_mmu_zap_all_fast",
              "kvm_mmu_load", "kvm_mmu_reset_context", "kvm_set_cr3", "kvm_mmu_create",
              "vmx_load_mmu_pgd", "svm_load_mmu_pgd", "construct_eptp", "kvm_mmu_page_fault",
              "handle_ept_violation", "vmx_vcpu_run", "svm_vcpu_run", "kvm_arch_vcpu_ioctl_run"):
        assert n in names
    for p in P.CATALOGUE:
        assert p.question.endswith("?"), p.name
        assert p.mmu_modes and p.mmu_modes <= P.MMU_MODES, p.name
        assert p.kind in ("tracepoint", "kfunc"), p.name
        assert not (p.default and p.high_rate), p.name
    assert [P.probe_id(p.name) for p in P.CATALOGUE] == list(range(len(P.CATALOGUE)))


def test_select_groups_and_names() -> None:
    default = {p.name for p in P.select(["default"])}
    every = {p.name for p in P.select(["all"])}
    assert {"kvm_exit", "kvm_page_fault", "kvm_cr", "kvm_cpuid", "kvm_pio", "kvm_mmio",
            "kvm_mmu_get_page", "fast_page_fault", "vmx_load_mmu_pgd"} <= default
    high = {"kvm_emulate_insn", "kvm_entry", "kvm_mmu_set_spte", "kvm_tdp_mmu_spte_changed"}
    assert not high & default
    assert high <= every and default < every
    # The marker probe always comes along; order follows the catalogue.
    assert [p.name for p in P.select(["kvm_pio"])] == ["kvm_cpuid", "kvm_pio"]
    assert P.select(["kvm_pio", "kvm_pio"]) == P.select(["kvm_pio"])
    with pytest.raises(ValueError, match=r"unknown probe 'kvm_nope'.*groups: default"):
        P.select(["kvm_nope"])


def test_rich_host_attaches_everything_as_kfunc() -> None:
    st = P.availability(P.CATALOGUE, RICH)
    assert all(s.available for s in st)
    by = {s.probe.name: s for s in st}
    assert by["kvm_exit"].attach == "tracepoint:kvm:kvm_exit"
    assert by["vmx_load_mmu_pgd"].attach == "kfunc:vmx_load_mmu_pgd"
    assert "does not fire under MMU mode 'ept'" in by["svm_load_mmu_pgd"].reason


def test_kprobe_fallback_and_reasons() -> None:
    no_kfunc = replace(RICH, bpftrace_kfunc=False)
    s = P.availability([P.get("kvm_mmu_load")], no_kfunc)[0]
    assert s.available and s.attach == "kprobe:kvm_mmu_load"

    # This development host: no kfunc in bpftrace, no CONFIG_KPROBES, no kvm_intel.
    pvm_like = replace(
        RICH, bpftrace_kfunc=False, kprobes_enabled=False, mmu_mode="pvm",
        btf_functions=frozenset({"kvm_mmu_load"}), kallsyms=frozenset({"kvm_mmu_load"}),
    )
    load, pgd = P.availability([P.get("kvm_mmu_load"), P.get("vmx_load_mmu_pgd")], pvm_like)
    assert not load.available and load.attach is None
    assert "no kfunc support" in load.reason and "CONFIG_KPROBES" in load.reason
    assert "not in kernel or module BTF" in pgd.reason

    missing_sym = replace(no_kfunc, kallsyms=frozenset())
    s = P.availability([P.get("kvm_set_cr3")], missing_sym)[0]
    assert not s.available and "not in /proc/kallsyms" in s.reason
    no_btf = replace(RICH, btf_functions=None, kprobes_enabled=False)
    assert "no kernel BTF" in P.availability([P.get("kvm_set_cr3")], no_btf)[0].reason


def test_tracepoint_reasons() -> None:
    exit_probe = P.get("kvm_exit")
    assert "not root" in P.availability([exit_probe], replace(RICH, is_root=False))[0].reason
    unmounted = P.availability([exit_probe], replace(RICH, tracefs=None))[0]
    assert not unmounted.available and "mount -t tracefs" in unmounted.reason
    gone = P.availability([exit_probe], replace(RICH, tracepoints=frozenset()))[0]
    assert not gone.available and "kvm:kvm_exit not in" in gone.reason


def test_text_parsers() -> None:
    kallsyms = (
        "ffffffff812e1bf0 T kvm_mmu_load\n"
        "ffffffff81201733 t kvm_mmu_page_fault.cold\n"
        "ffffffff82000000 D some_data\n"
        "ffffffffc0001000 t vmx_load_mmu_pgd\t[kvm_intel]\n"
    )
    assert P.parse_kallsyms(kallsyms) == frozenset({"kvm_mmu_load", "vmx_load_mmu_pgd"})
    info = "Probe types\n  kprobe: yes\n  tracepoint: yes\n  kfunc: no\n  iter:task: no\n"
    assert P.parse_bpftrace_info_kfunc(info) is False
    assert P.parse_bpftrace_info_kfunc(info.replace("kfunc: no", "kfunc: yes")) is True
    assert P.parse_bpftrace_info_kfunc("nothing") is None


def _btf(types: list[tuple[str, int, int]], strings_base: bytes = b"") -> bytes:
    """A minimal BTF blob: (name, kind, vlen) types, no extra data beyond vlen members."""
    strtab = bytearray(b"" if strings_base else b"\0")
    body = bytearray()
    for name, kind, vlen in types:
        off = len(strings_base) + len(strtab)
        strtab += name.encode() + b"\0"
        body += struct.pack("<III", off, (kind << 24) | vlen, 0)
        body += bytes(P._btf_extra(kind, vlen))
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(body), len(body), len(strtab))
    return hdr + bytes(body) + bytes(strtab)


def test_btf_parser_on_synthetic_blobs() -> None:
    base = _btf([("int", 1, 0), ("task_struct", 4, 2), ("schedule", 12, 0)])
    assert P.btf_function_names(base) == frozenset({"schedule"})
    base_strings = P._btf_strings(base)
    module = _btf([("vmx_load_mmu_pgd", 12, 0), ("proto", 13, 3)], strings_base=base_strings)
    assert P.btf_function_names(module, base) == frozenset({"vmx_load_mmu_pgd"})
    with pytest.raises(ValueError, match="not BTF"):
        P.btf_function_names(b"\0" * 32)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="reading kallsyms/BTF needs root")


@needs_root
def test_live_host_view_is_consistent() -> None:
    view = P.HostView.probe(mmu_mode=None)
    if view.tracefs is None:
        prerequisite_missing("tracefs is not mounted (harness doctor --fix mounts it)")
    st = P.availability(P.CATALOGUE, view)
    for s in st:
        assert s.reason, s.probe.name
        if s.probe.kind == "tracepoint":
            assert s.available == (s.probe.target in view.tracepoints)
    if view.btf_functions is not None:
        assert "schedule" in view.btf_functions
    funcs = [s for s in st if s.probe.kind != "tracepoint"]
    if not view.kprobes_enabled and view.bpftrace_kfunc is not True:
        # e.g. this development host: function probes are unavailable, with reasons.
        assert all(not s.available and "CONFIG_KPROBES" in s.reason for s in funcs)


@pytest.mark.requires(root=True, tools=("bpftrace",))
def test_live_bpftrace_info_says_what_a_real_kfunc_attach_does() -> None:
    """``bpftrace --info``'s kfunc answer is the one attaching a kfunc probe gives.

    Here (no BTF trampolines for bpftrace 0.17) both say no: "kfunc/kretfunc not
    available for your kernel version"; where kfunc works, schedule() fires at once.
    """
    said = P.bpftrace_supports_kfunc()
    proc = subprocess.run(["bpftrace", "-e", "kfunc:schedule { exit(); }"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert said is (proc.returncode == 0), proc.stderr
