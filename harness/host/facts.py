"""Host facts recorded with every result: kernel, CPU, KVM modules and MMU mode, tool versions.

Reading the live host (``collect_host_facts``) is kept apart from deciding what
the readings mean (``parse_*`` / ``decide_*`` / ``facts_from_sources``), so the
decisions can be unit-tested with text captured on Intel, AMD and PVM hosts.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

MmuMode = Literal["ept", "npt", "shadow", "pvm", "none"]
CpuVendor = Literal["intel", "amd", "other"]
Accelerator = Literal["kvm", "tcg"]

#: CPU flags that say whether hardware virtualisation is offered to this kernel.
VIRT_FLAGS = ("vmx", "svm", "hypervisor")
#: The modes in which KVM runs an unmodified guest kernel.
STOCK_GUEST_MODES: frozenset[str] = frozenset({"ept", "npt", "shadow"})

SYS_MODULE = Path("/sys/module")


class HostFacts(BaseModel):
    """What a result needs to say about the host it was measured on.

    Embedded verbatim in result JSON: field names are part of the result schema.
    """

    hostname: str
    kernel_release: str
    kernel_cmdline: str
    cpu_model: str
    cpu_vendor: CpuVendor
    virt_flags: list[str] = Field(description="vmx / svm / hypervisor, if in /proc/cpuinfo")
    kvm_modules: list[str] = Field(description="loaded or built-in: kvm, kvm_intel, ...")
    kvm_params: dict[str, dict[str, str]] = Field(
        description="module -> parameter -> value, from /sys/module/<m>/parameters"
    )
    mmu_mode: MmuMode
    tdp_mmu: bool | None = Field(description="kvm.tdp_mmu; None when the parameter is absent")
    mmu_reason: str = Field(description="how mmu_mode was decided")
    kvm_device: bool = Field(description="/dev/kvm exists")
    stock_guest_kvm: bool = Field(description="an unmodified Linux guest can run with -accel kvm")
    stock_guest_reason: str
    qemu_version: str | None
    libvirt_version: str | None
    bpftrace_version: str | None
    microcode: str | None = Field(
        default=None, description="CPU microcode revision (/proc/cpuinfo), None where not shown"
    )
    thp_enabled: str | None = Field(
        default=None,
        description="host transparent hugepage mode (always / madvise / never), None if absent",
    )


class AcceleratorUnavailable(RuntimeError):
    """``accelerator = "kvm"`` was requested on a host whose KVM cannot run the guest."""


# --- pure parsing -----------------------------------------------------------


@dataclass(frozen=True)
class CpuInfo:
    """The parts of /proc/cpuinfo the harness records (first processor only)."""

    model: str
    vendor: CpuVendor
    virt_flags: list[str]
    microcode: str | None = None


def parse_cpuinfo(text: str) -> CpuInfo:
    """Parse /proc/cpuinfo text; all processors are assumed identical, so the first wins."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # end of the first processor block
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    vendor_id = fields.get("vendor_id", "")
    vendor: CpuVendor
    if vendor_id == "GenuineIntel":
        vendor = "intel"
    elif vendor_id in ("AuthenticAMD", "HygonGenuine"):  # Hygon runs kvm_amd / SVM
        vendor = "amd"
    else:
        vendor = "other"
    flags = set(fields.get("flags", "").split())
    return CpuInfo(
        model=fields.get("model name", "unknown"),
        vendor=vendor,
        virt_flags=[f for f in VIRT_FLAGS if f in flags],
        microcode=fields.get("microcode") or None,
    )


def parse_thp_mode(text: str | None) -> str | None:
    """The selected mode of a sysfs choice file: ``always [madvise] never`` -> ``madvise``."""
    if text is None:
        return None
    m = re.search(r"\[([^\]]+)\]", text)
    return m.group(1) if m else None


def parse_proc_modules(text: str) -> list[str]:
    """Module names from /proc/modules text (built-in modules are not listed there)."""
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def is_kvm_module(name: str) -> bool:
    """True for ``kvm`` and its vendor/backend modules (``kvm_intel``, ``kvm_amd``, ``kvm_pvm``)."""
    return name == "kvm" or name.startswith("kvm_")


def param_is_on(value: str | None) -> bool:
    """A module parameter read as a boolean: ``Y``/``y``/``1`` (bool or int params)."""
    return value is not None and value.strip() in ("Y", "y", "1")


@dataclass(frozen=True)
class MmuDecision:
    """The MMU mode KVM would use, and why."""

    mode: MmuMode
    tdp_mmu: bool | None
    reason: str


def decide_mmu_mode(
    kvm_modules: list[str], kvm_params: dict[str, dict[str, str]], virt_flags: list[str]
) -> MmuDecision:
    """Decide the KVM MMU mode from the KVM modules, their parameters and the CPU flags.

    A vendor module only counts when the CPU offers its extension: a kernel can
    have both kvm_intel and kvm_amd built in, and only one of them initialises.
    """
    tdp_raw = kvm_params.get("kvm", {}).get("tdp_mmu")
    tdp_mmu = None if tdp_raw is None else param_is_on(tdp_raw)
    mods = set(kvm_modules)
    if not mods:
        return MmuDecision("none", tdp_mmu, "no kvm module is loaded or built in")
    if "kvm_intel" in mods and "vmx" in virt_flags:
        ept = kvm_params.get("kvm_intel", {}).get("ept")
        if param_is_on(ept):
            return MmuDecision("ept", tdp_mmu, "kvm_intel loaded with ept=Y")
        return MmuDecision(
            "shadow", tdp_mmu, f"kvm_intel loaded with ept={ept or 'absent'}: shadow paging"
        )
    if "kvm_amd" in mods and "svm" in virt_flags:
        npt = kvm_params.get("kvm_amd", {}).get("npt")
        if param_is_on(npt):
            return MmuDecision("npt", tdp_mmu, f"kvm_amd loaded with npt={npt}")
        return MmuDecision(
            "shadow", tdp_mmu, f"kvm_amd loaded with npt={npt or 'absent'}: shadow paging"
        )
    if "kvm_pvm" in mods:
        flags = ",".join(virt_flags) or "none"
        return MmuDecision(
            "pvm",
            tdp_mmu,
            f"kvm_pvm loaded (CPU virt flags: {flags}; tdp_mmu={tdp_raw or 'absent'}): "
            "PVM paravirtual backend with shadow paging",
        )
    present = ",".join(sorted(mods)) or "none"
    return MmuDecision(
        "none",
        tdp_mmu,
        f"KVM modules {present} but no usable backend for CPU virt flags "
        f"{','.join(virt_flags) or 'none'}",
    )


def decide_stock_guest(mode: MmuMode, kvm_device: bool) -> tuple[bool, str]:
    """Whether an unmodified Linux guest can run under ``-accel kvm`` here, with the reason."""
    if not kvm_device:
        return False, "/dev/kvm does not exist"
    if mode in STOCK_GUEST_MODES:
        return True, f"hardware-assisted KVM ({mode}) and /dev/kvm present"
    if mode == "pvm":
        return False, (
            "KVM here is the PVM backend (no VMX/SVM offered to this kernel); it "
            "cannot run an unmodified kernel: boot stops with 'KVM internal error ... "
            "emulation failure'. Use TCG for full guests; tiny real-mode guests still run"
        )
    return False, "no hardware-assisted KVM backend is active"


def parse_qemu_version(text: str) -> str | None:
    """``QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)`` -> ``7.2.22 (Debian ...)``."""
    m = re.search(r"QEMU emulator version (\S.*)", text)
    return m.group(1).strip() if m else None


def parse_libvirtd_version(text: str) -> str | None:
    """``libvirtd (libvirt) 9.0.0`` -> ``9.0.0``."""
    m = re.search(r"\(libvirt\)\s+(\S+)", text)
    return m.group(1) if m else None


def format_libvirt_version(number: int) -> str:
    """libvirt's packed version number (major*1e6 + minor*1e3 + micro) -> ``9.0.0``."""
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def parse_bpftrace_version(text: str) -> str | None:
    """``bpftrace v0.17.0`` -> ``0.17.0``."""
    m = re.search(r"bpftrace v?(\d[\w.\-+]*)", text)
    return m.group(1) if m else None


@dataclass
class HostSources:
    """Raw readings of a host, everything :func:`facts_from_sources` needs."""

    hostname: str
    kernel_release: str
    kernel_cmdline: str
    cpuinfo: str
    #: /proc/modules text, None when the kernel has no module support.
    proc_modules: str | None
    #: /sys/module/<m>/parameters for each KVM module directory present.
    sys_module_params: dict[str, dict[str, str]]
    kvm_device: bool
    qemu_version: str | None = None
    libvirt_version: str | None = None
    bpftrace_version: str | None = None
    #: /sys/kernel/mm/transparent_hugepage/enabled text, None when absent.
    thp_enabled: str | None = None


def facts_from_sources(src: HostSources) -> HostFacts:
    """Build :class:`HostFacts` from raw readings (pure: no host access)."""
    cpu = parse_cpuinfo(src.cpuinfo)
    loaded = {m for m in parse_proc_modules(src.proc_modules or "") if is_kvm_module(m)}
    # /sys/module/<m> exists for loaded modules and for built-in ones with parameters.
    modules = sorted(loaded | {m for m in src.sys_module_params if is_kvm_module(m)})
    params = {m: dict(sorted(src.sys_module_params.get(m, {}).items())) for m in modules}
    mmu = decide_mmu_mode(modules, params, cpu.virt_flags)
    stock, stock_reason = decide_stock_guest(mmu.mode, src.kvm_device)
    return HostFacts(
        hostname=src.hostname,
        kernel_release=src.kernel_release,
        kernel_cmdline=src.kernel_cmdline,
        cpu_model=cpu.model,
        cpu_vendor=cpu.vendor,
        virt_flags=cpu.virt_flags,
        kvm_modules=modules,
        kvm_params=params,
        mmu_mode=mmu.mode,
        tdp_mmu=mmu.tdp_mmu,
        mmu_reason=mmu.reason,
        kvm_device=src.kvm_device,
        stock_guest_kvm=stock,
        stock_guest_reason=stock_reason,
        qemu_version=src.qemu_version,
        libvirt_version=src.libvirt_version,
        bpftrace_version=src.bpftrace_version,
        microcode=cpu.microcode,
        thp_enabled=parse_thp_mode(src.thp_enabled),
    )


# --- reading the live host --------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _tool_output(argv: list[str]) -> str | None:
    """stdout+stderr of a short version query, None when the tool is missing or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout + proc.stderr


def read_module_params(module: str, root: Path = SYS_MODULE) -> dict[str, str]:
    """Parameters of one module from sysfs; unreadable ones (mode 0200 etc.) are skipped."""
    params: dict[str, str] = {}
    pdir = root / module / "parameters"
    if not pdir.is_dir():
        return params
    for p in sorted(pdir.iterdir()):
        value = _read(p)
        if value is not None:
            params[p.name] = value.strip()
    return params


def qemu_version() -> str | None:
    """Version of ``qemu-system-x86_64`` on PATH, None when it is missing."""
    out = _tool_output(["qemu-system-x86_64", "--version"])
    return parse_qemu_version(out) if out else None


def libvirt_version() -> str | None:
    """libvirt version from the Python binding, else from ``libvirtd --version``."""
    try:
        import libvirt

        return format_libvirt_version(int(libvirt.getVersion()))
    except Exception:  # binding missing or broken: fall back to the daemon binary
        out = _tool_output(["libvirtd", "--version"])
        return parse_libvirtd_version(out) if out else None


def bpftrace_version() -> str | None:
    """Version of ``bpftrace`` on PATH, None when it is missing."""
    out = _tool_output(["bpftrace", "--version"])
    return parse_bpftrace_version(out) if out else None


def read_host_sources() -> HostSources:
    """Read everything :func:`facts_from_sources` needs from the running host."""
    sys_params: dict[str, dict[str, str]] = {}
    if SYS_MODULE.is_dir():
        for d in sorted(SYS_MODULE.iterdir()):
            if is_kvm_module(d.name):
                sys_params[d.name] = read_module_params(d.name)
    return HostSources(
        hostname=socket.gethostname(),
        kernel_release=os.uname().release,
        kernel_cmdline=(_read(Path("/proc/cmdline")) or "").strip(),
        cpuinfo=_read(Path("/proc/cpuinfo")) or "",
        proc_modules=_read(Path("/proc/modules")),
        sys_module_params=sys_params,
        kvm_device=Path("/dev/kvm").exists(),
        qemu_version=qemu_version(),
        libvirt_version=libvirt_version(),
        bpftrace_version=bpftrace_version(),
        thp_enabled=_read(Path("/sys/kernel/mm/transparent_hugepage/enabled")),
    )


def collect_host_facts() -> HostFacts:
    """Facts about the running host (reads /proc, /sys and runs ``--version`` queries)."""
    return facts_from_sources(read_host_sources())


def choose_accelerator(
    requested: Literal["auto", "kvm", "tcg"], facts: HostFacts
) -> tuple[Accelerator, str]:
    """Pick the QEMU accelerator for a full (stock-kernel) guest and say why.

    ``auto`` takes KVM when it can run a stock guest, TCG otherwise; ``kvm`` on a
    host that cannot raises :class:`AcceleratorUnavailable` with the reason.
    """
    if requested == "tcg":
        return "tcg", 'accelerator = "tcg" requested'
    if requested == "kvm":
        if facts.stock_guest_kvm:
            return "kvm", f'accelerator = "kvm" requested; {facts.stock_guest_reason}'
        raise AcceleratorUnavailable(
            f'accelerator = "kvm" was requested, but KVM on {facts.hostname} cannot run a '
            f"stock guest (mmu_mode={facts.mmu_mode}): {facts.stock_guest_reason}. "
            'Set accelerator = "tcg" (or "auto") in the suite file.'
        )
    if requested == "auto":
        if facts.stock_guest_kvm:
            return "kvm", f"auto: {facts.stock_guest_reason}"
        return "tcg", f"auto: KVM unusable for a stock guest ({facts.stock_guest_reason})"
    raise ValueError(f'accelerator must be "auto", "kvm" or "tcg", got {requested!r}')
