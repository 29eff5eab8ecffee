"""Host-fact parsing and MMU-mode decisions on Intel, AMD and PVM host samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.host.facts import (
    AcceleratorUnavailable,
    HostFacts,
    HostSources,
    choose_accelerator,
    collect_host_facts,
    decide_mmu_mode,
    facts_from_sources,
    format_libvirt_version,
    parse_bpftrace_version,
    parse_cpuinfo,
    parse_libvirtd_version,
    parse_proc_modules,
    parse_qemu_version,
    read_module_params,
)

INTEL_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 85
model name\t: Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz
stepping\t: 7
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush \
dts acpi mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc vmx smx est \
tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid dca sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx \
f16c rdrand lahf_lm abm 3dnowprefetch cpuid_fault epb cat_l3 cdp_l3 invpcid_single ssbd mba \
ibrs ibpb stibp ibrs_enhanced tpr_shadow flexpriority ept vpid ept_ad fsgsbase tsc_adjust
vmx flags\t: vnmi preemption_timer posted_intr invvpid ept_x_only ept_ad ept_1gb flexpriority \
apicv tsc_offset vtpr mtf vapic ept vpid unrestricted_guest vapic_reg vid ple shadow_vmcs pml

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz
flags\t\t: fpu vme vmx
"""

AMD_CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7713 64-Core Processor
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush \
mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl \
nonstop_tsc cpuid extd_apicid aperfmperf rapl pni pclmulqdq monitor ssse3 fma cx16 pcid sse4_1 \
sse4_2 movbe popcnt aes xsave avx f16c rdrand lahf_lm cmp_legacy svm extapic cr8_legacy abm \
sse4a misalignsse 3dnowprefetch osvw ibs skinit wdt tce topoext perfctr_core perfctr_nb \
npt lbrv svm_lock nrip_save tsc_scale vmcb_clean flushbyasid decodeassists pausefilter pfthreshold \
avic v_vmsave_vmload vgif v_spec_ctrl
"""

# Captured on the development host: a PVM guest kernel on AMD EPYC, no VMX/SVM offered.
PVM_CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model name\t: AMD EPYC
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx \
fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl \
xtopology nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 \
sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm \
cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext vmmcall fsgsbase

"""

INTEL_PROC_MODULES = """\
kvm_intel 409600 0 - Live 0x0000000000000000
kvm 1142784 1 kvm_intel, Live 0x0000000000000000
irqbypass 16384 1 kvm, Live 0x0000000000000000
ext4 1007616 1 - Live 0x0000000000000000
"""

AMD_PROC_MODULES = """\
kvm_amd 200704 0 - Live 0x0000000000000000
ccp 118784 1 kvm_amd, Live 0x0000000000000000
kvm 1351680 1 kvm_amd, Live 0x0000000000000000
"""

INTEL_PARAMS = {
    "kvm": {"tdp_mmu": "Y", "halt_poll_ns": "200000", "nx_huge_pages": "N"},
    "kvm_intel": {"ept": "Y", "unrestricted_guest": "Y", "enable_shadow_vmcs": "Y", "pml": "Y"},
}
AMD_PARAMS = {
    "kvm": {"tdp_mmu": "Y", "halt_poll_ns": "200000"},
    "kvm_amd": {"npt": "1", "avic": "0", "nested": "1", "sev": "0"},
}
PVM_PARAMS = {
    "kvm": {"tdp_mmu": "N", "halt_poll_ns": "200000", "mmio_caching": "N"},
    "kvm_pvm": {"pvm_native": "Y", "pvm_emul_batch": "1024", "stats": "N"},
}


def sources(
    cpuinfo: str,
    proc_modules: str | None,
    params: dict[str, dict[str, str]],
    kvm_device: bool = True,
) -> HostSources:
    return HostSources(
        hostname="h",
        kernel_release="6.18.0",
        kernel_cmdline="root=/dev/sda1 ro",
        cpuinfo=cpuinfo,
        proc_modules=proc_modules,
        sys_module_params=params,
        kvm_device=kvm_device,
        qemu_version="7.2.22",
        libvirt_version="9.0.0",
        bpftrace_version="0.17.0",
    )


def test_parse_cpuinfo_intel_uses_first_processor_only() -> None:
    cpu = parse_cpuinfo(INTEL_CPUINFO)
    assert cpu.vendor == "intel"
    assert cpu.model == "Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz"
    assert cpu.virt_flags == ["vmx"]


def test_parse_cpuinfo_amd_and_pvm() -> None:
    amd = parse_cpuinfo(AMD_CPUINFO)
    assert (amd.vendor, amd.virt_flags) == ("amd", ["svm"])
    pvm = parse_cpuinfo(PVM_CPUINFO)
    assert (pvm.vendor, pvm.model, pvm.virt_flags) == ("amd", "AMD EPYC", ["hypervisor"])


def test_parse_cpuinfo_unknown_vendor() -> None:
    assert parse_cpuinfo("vendor_id\t: CentaurHauls\nflags\t: fpu\n").vendor == "other"


def test_parse_proc_modules() -> None:
    assert parse_proc_modules(AMD_PROC_MODULES) == ["kvm_amd", "ccp", "kvm"]


def test_intel_ept() -> None:
    f = facts_from_sources(sources(INTEL_CPUINFO, INTEL_PROC_MODULES, INTEL_PARAMS))
    assert f.kvm_modules == ["kvm", "kvm_intel"]
    assert (f.mmu_mode, f.tdp_mmu, f.stock_guest_kvm) == ("ept", True, True)
    assert "ept=Y" in f.mmu_reason
    assert f.kvm_params["kvm_intel"]["ept"] == "Y"


def test_intel_ept_off_is_shadow() -> None:
    params = {**INTEL_PARAMS, "kvm_intel": {"ept": "N"}}
    f = facts_from_sources(sources(INTEL_CPUINFO, INTEL_PROC_MODULES, params))
    assert (f.mmu_mode, f.stock_guest_kvm) == ("shadow", True)
    assert "ept=N" in f.mmu_reason


def test_amd_npt_int_and_bool_forms() -> None:
    f = facts_from_sources(sources(AMD_CPUINFO, AMD_PROC_MODULES, AMD_PARAMS))
    assert (f.cpu_vendor, f.mmu_mode, f.tdp_mmu, f.stock_guest_kvm) == ("amd", "npt", True, True)
    yes = {**AMD_PARAMS, "kvm_amd": {"npt": "Y"}}
    assert facts_from_sources(sources(AMD_CPUINFO, AMD_PROC_MODULES, yes)).mmu_mode == "npt"
    off = {**AMD_PARAMS, "kvm_amd": {"npt": "0"}}
    assert facts_from_sources(sources(AMD_CPUINFO, AMD_PROC_MODULES, off)).mmu_mode == "shadow"


def test_pvm_host_built_in_modules() -> None:
    # The development host: no /proc/modules (everything built in), kvm + kvm_pvm in /sys/module.
    f = facts_from_sources(sources(PVM_CPUINFO, None, PVM_PARAMS))
    assert f.kvm_modules == ["kvm", "kvm_pvm"]
    assert (f.mmu_mode, f.tdp_mmu, f.stock_guest_kvm) == ("pvm", False, False)
    assert "emulation failure" in f.stock_guest_reason


def test_built_in_vendor_module_without_cpu_support_is_ignored() -> None:
    # A kernel with kvm_intel built in still shows /sys/module/kvm_intel on an AMD CPU.
    params = {**AMD_PARAMS, "kvm_intel": {"ept": "Y"}}
    f = facts_from_sources(sources(AMD_CPUINFO, None, params))
    assert f.mmu_mode == "npt"


def test_no_kvm() -> None:
    f = facts_from_sources(sources(INTEL_CPUINFO, "ext4 1 0 - Live 0x0\n", {}, kvm_device=False))
    assert (f.kvm_modules, f.mmu_mode, f.tdp_mmu, f.stock_guest_kvm) == ([], "none", None, False)
    assert f.stock_guest_reason == "/dev/kvm does not exist"


def test_ept_without_dev_kvm_cannot_run_guest() -> None:
    f = facts_from_sources(sources(INTEL_CPUINFO, INTEL_PROC_MODULES, INTEL_PARAMS, False))
    assert f.mmu_mode == "ept"
    assert not f.stock_guest_kvm


def test_kvm_core_without_backend() -> None:
    d = decide_mmu_mode(["kvm"], {"kvm": {"tdp_mmu": "Y"}}, ["hypervisor"])
    assert d.mode == "none"
    assert "no usable backend" in d.reason


def test_version_parsers() -> None:
    assert (
        parse_qemu_version(
            "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n"
            "Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n"
        )
        == "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
    )
    assert parse_qemu_version("something else") is None
    assert parse_libvirtd_version("libvirtd (libvirt) 9.0.0\n") == "9.0.0"
    assert format_libvirt_version(9000000) == "9.0.0"
    assert format_libvirt_version(10010002) == "10.10.2"
    assert parse_bpftrace_version("bpftrace v0.17.0\n") == "0.17.0"
    assert parse_bpftrace_version("bpftrace v0.20.2-dirty\n") == "0.20.2-dirty"


def _facts(src: HostSources) -> HostFacts:
    return facts_from_sources(src)


def test_choose_accelerator() -> None:
    ept = _facts(sources(INTEL_CPUINFO, INTEL_PROC_MODULES, INTEL_PARAMS))
    pvm = _facts(sources(PVM_CPUINFO, None, PVM_PARAMS))
    assert choose_accelerator("auto", ept)[0] == "kvm"
    assert choose_accelerator("kvm", ept)[0] == "kvm"
    acc, reason = choose_accelerator("auto", pvm)
    assert acc == "tcg"
    assert "PVM" in reason
    assert choose_accelerator("tcg", ept) == ("tcg", 'accelerator = "tcg" requested')
    with pytest.raises(AcceleratorUnavailable, match='accelerator = "tcg"'):
        choose_accelerator("kvm", pvm)
    with pytest.raises(ValueError, match="auto"):
        choose_accelerator("hvf", ept)  # type: ignore[arg-type]


def test_read_module_params_skips_unreadable(tmp_path: Path) -> None:
    pdir = tmp_path / "kvm" / "parameters"
    pdir.mkdir(parents=True)
    (pdir / "tdp_mmu").write_text("Y\n")
    (pdir / "halt_poll_ns").write_text("200000\n")
    (pdir / "broken").mkdir()  # reading a directory fails like an unreadable parameter
    assert read_module_params("kvm", tmp_path) == {"halt_poll_ns": "200000", "tdp_mmu": "Y"}
    assert read_module_params("kvm_amd", tmp_path) == {}


def test_collect_live_host_is_consistent_and_serialisable() -> None:
    f = collect_host_facts()
    assert f.kernel_release == Path("/proc/sys/kernel/osrelease").read_text().strip()
    assert f.kvm_device == Path("/dev/kvm").exists()
    assert f.stock_guest_kvm == (f.kvm_device and f.mmu_mode in ("ept", "npt", "shadow"))
    for m in f.kvm_modules:
        assert Path("/sys/module", m).is_dir() or m in Path("/proc/modules").read_text()
    if Path("/sys/module/kvm/parameters/tdp_mmu").exists():
        raw = Path("/sys/module/kvm/parameters/tdp_mmu").read_text().strip()
        assert f.tdp_mmu == (raw == "Y")
    again = HostFacts.model_validate(json.loads(f.model_dump_json()))
    assert again == f
