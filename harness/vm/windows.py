"""The libvirt domain of a Windows guest: q35, OVMF UEFI, TPM 2.0, Hyper-V enlightenments.

What a Windows 10/11 or Server 2022 guest on KVM expects, and why each piece:

* q35 and OVMF (UEFI): Windows 11 refuses legacy BIOS; the firmware's NVRAM
  (boot entries, secure-boot keys) is a per-run copy of OVMF's template, made
  by libvirt at start and removed by the harness after, so no run inherits
  another's boot order.
* TPM 2.0 (``tpm-crb``, libvirt-managed swtpm): Windows 11 setup refuses to
  install without one. libvirt starts swtpm beside QEMU and, the domain being
  transient, removes its state (``/var/lib/libvirt/swtpm/<uuid>``) when it ends.
* Hyper-V enlightenments: Windows detects the hypervisor and uses its
  paravirtual interfaces instead of trapping on emulated hardware; each one
  below says what it spares. Under TCG QEMU 7.2 refuses ``vpindex`` ("kernel
  doesn't allow setting HyperV VP_INDEX"), and synic, stimer, tlbflush and ipi
  need vpindex, so those are dropped with that reason recorded (the domain
  XML's comment and the run's record say which).
* Clock: Windows keeps the RTC in local time, and the Hyper-V reference TSC
  page (hypervclock) spares a VM exit per clock read; no HPET (Windows
  would prefer it over the paravirtual clock), RTC catch-up, PIT delayed.
* virtio disk and network (virtio-win drivers loaded at install), user-mode
  networking that forwards WinRM HTTPS (5986) and optionally RDP (3389) from
  127.0.0.1 only, with ``restrict=on``: the guest reaches nothing outside.
"""

from __future__ import annotations

import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from harness.vm.domain import NET_PCI_SLOT, QEMU_NS

OVMF_DIR = Path("/usr/share/OVMF")
#: OVMF firmware (code, NVRAM template) without and with secure boot (Debian's ovmf).
OVMF_CODE = OVMF_DIR / "OVMF_CODE_4M.fd"
OVMF_VARS = OVMF_DIR / "OVMF_VARS_4M.fd"
OVMF_CODE_SECBOOT = OVMF_DIR / "OVMF_CODE_4M.secboot.fd"
OVMF_VARS_MS = OVMF_DIR / "OVMF_VARS_4M.ms.fd"  # Microsoft's keys enrolled: Windows boots
#: Where libvirt keeps a domain's swtpm state (removed with a transient domain).
SWTPM_STATE_DIR = Path("/var/lib/libvirt/swtpm")

WINRM_GUEST_PORT = 5986
RDP_GUEST_PORT = 3389


@dataclass(frozen=True)
class Enlightenment:
    """One Hyper-V enlightenment: libvirt's element name, its value, and why it is on."""

    name: str
    why: str
    value: str | None = None  # spinlocks' retry count


#: The enlightenments a Windows guest gets under KVM, each with what it spares.
HYPERV: tuple[Enlightenment, ...] = (
    Enlightenment("relaxed", "no watchdog BSOD when a vCPU is descheduled (timing checks off)"),
    Enlightenment("vapic", "APIC EOI/ICR/TPR through MSRs: fewer APIC-access exits"),
    Enlightenment("spinlocks", "spin this long before yielding: fewer PAUSE exits", "8191"),
    Enlightenment("vpindex", "virtual processor index: needed by synic, tlbflush and ipi"),
    Enlightenment("runtime", "the guest sees time stolen by the host"),
    Enlightenment("synic", "synthetic interrupt controller: needed by stimer (VMBus too)"),
    Enlightenment("stimer", "synthetic timers: no periodic RTC/HPET ticks, fewer exits when idle"),
    Enlightenment("reset", "a reset through a Hyper-V MSR"),
    Enlightenment("frequencies", "TSC/APIC frequencies read from MSRs, not calibrated"),
    Enlightenment("tlbflush", "remote TLB flushes by hypercall, not IPIs to every vCPU"),
    Enlightenment("ipi", "IPIs to many vCPUs by one hypercall"),
)

#: Enlightenments QEMU 7.2 refuses under TCG, with the reason recorded for the run.
TCG_REFUSED = {
    "vpindex": "QEMU 7.2 under TCG: \"kernel doesn't allow setting HyperV VP_INDEX\"",
}
#: What each enlightenment needs (QEMU enforces these under KVM).
NEEDS = {"synic": "vpindex", "stimer": "synic", "tlbflush": "vpindex", "ipi": "vpindex"}


def choose_enlightenments(
    accelerator: Literal["kvm", "tcg"],
) -> tuple[tuple[Enlightenment, ...], dict[str, str]]:
    """The enlightenments to turn on, and those dropped with the reason why."""
    dropped: dict[str, str] = dict(TCG_REFUSED) if accelerator == "tcg" else {}
    kept: list[Enlightenment] = []
    for e in HYPERV:  # in dependency order: a need is decided before what needs it
        need = NEEDS.get(e.name)
        if e.name in dropped:
            continue
        if need is not None and need in dropped:
            dropped[e.name] = f"needs {need}, which was dropped"
            continue
        kept.append(e)
    return tuple(kept), dropped


@dataclass(frozen=True)
class WindowsDomain:
    """Everything the XML of one Windows guest says."""

    name: str
    accelerator: Literal["kvm", "tcg"]
    memory_mib: int
    vcpus: int
    disk: Path  # qcow2 overlay of the Windows image, virtio-blk
    nvram: Path  # this run's copy of the OVMF variable store (libvirt copies the template)
    console_log: Path
    winrm_port: int  # 127.0.0.1 port forwarded to the guest's 5986
    rdp_port: int | None = None  # 127.0.0.1 port forwarded to 3389, when asked for
    secure_boot: bool = False
    tpm: bool = True
    uuid: str = ""  # "": derived from the name (unique per run: it carries the run id)
    emulator: str = "/usr/bin/qemu-system-x86_64"
    vcpu_pins: tuple[int, ...] | None = None
    emulator_pins: tuple[int, ...] | None = None
    #: A directory served as a read-only FAT disk instead of ``disk`` (tests: a stand-in
    #: EFI program at EFI/BOOT/BOOTX64.EFI, since no Windows image exists on these hosts).
    standin_dir: Path | None = None
    #: Read-only CDs (SATA), in order: the image build's Windows ISO, virtio-win, answers.
    cdroms: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if not self.uuid:
            object.__setattr__(self, "uuid", str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, self.name)))

    @property
    def loader(self) -> Path:
        """The OVMF code image."""
        return OVMF_CODE_SECBOOT if self.secure_boot else OVMF_CODE

    @property
    def nvram_template(self) -> Path:
        """The variable store libvirt copies to ``nvram`` at start."""
        return OVMF_VARS_MS if self.secure_boot else OVMF_VARS

    @property
    def tpm_state(self) -> Path:
        """Where libvirt's swtpm keeps this domain's TPM state while it exists."""
        return SWTPM_STATE_DIR / self.uuid

    def enlightenments(self) -> tuple[tuple[Enlightenment, ...], dict[str, str]]:
        """See :func:`choose_enlightenments`."""
        return choose_enlightenments(self.accelerator)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def windows_domain_xml(cfg: WindowsDomain) -> str:
    """The libvirt domain XML of ``cfg``, with a comment per enlightenment and per drop."""
    kept, dropped = cfg.enlightenments()
    dom = ET.Element("domain", {"type": "kvm" if cfg.accelerator == "kvm" else "qemu"})
    _sub(dom, "name", cfg.name)
    _sub(dom, "uuid", cfg.uuid)
    _sub(dom, "memory", str(cfg.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(cfg.vcpus))
    if cfg.vcpu_pins or cfg.emulator_pins:
        tune = _sub(dom, "cputune")
        for i in range(cfg.vcpus if cfg.vcpu_pins else 0):
            assert cfg.vcpu_pins is not None
            _sub(tune, "vcpupin", vcpu=str(i), cpuset=str(cfg.vcpu_pins[i % len(cfg.vcpu_pins)]))
        if cfg.emulator_pins:
            _sub(tune, "emulatorpin", cpuset=",".join(str(c) for c in cfg.emulator_pins))

    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="q35")
    _sub(
        os_el, "loader", str(cfg.loader), readonly="yes", type="pflash",
        secure="yes" if cfg.secure_boot else "no",
    )
    _sub(os_el, "nvram", str(cfg.nvram), template=str(cfg.nvram_template))
    _sub(os_el, "boot", dev="hd")
    if cfg.cdroms:
        _sub(os_el, "boot", dev="cdrom")  # the empty disk falls through to the installer

    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    hv = _sub(features, "hyperv", mode="custom")
    for e in kept:
        hv.append(ET.Comment(f" {e.name}: {e.why} "))
        el = _sub(hv, e.name, state="on")
        if e.value is not None:
            el.set("retries", e.value)
    for name, reason in dropped.items():
        hv.append(ET.Comment(f" {name} dropped: {reason} "))
    if cfg.secure_boot:
        _sub(features, "smm", state="on")  # OVMF's secure boot variables live in SMM
    if cfg.accelerator == "kvm":
        _sub(dom, "cpu", mode="host-passthrough", check="none", migratable="off")
    else:
        _sub(dom, "cpu", mode="maximum", check="none")

    clock = _sub(dom, "clock", offset="localtime")
    _sub(clock, "timer", name="rtc", tickpolicy="catchup")
    _sub(clock, "timer", name="pit", tickpolicy="delay")
    _sub(clock, "timer", name="hpet", present="no")
    _sub(clock, "timer", name="hypervclock", present="yes")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")  # Windows setup and updates reboot on their own
    _sub(dom, "on_crash", "destroy")
    if cfg.secure_boot:
        pm = _sub(dom, "pm")
        _sub(pm, "suspend-to-mem", enabled="no")
        _sub(pm, "suspend-to-disk", enabled="no")

    devices = _sub(dom, "devices")
    _sub(devices, "emulator", cfg.emulator)
    if cfg.standin_dir is not None:
        disk = _sub(devices, "disk", type="dir", device="disk")
        _sub(disk, "driver", name="qemu", type="fat")
        _sub(disk, "source", dir=str(cfg.standin_dir))
        _sub(disk, "target", dev="vda", bus="virtio")
        _sub(disk, "readonly")
    else:
        disk = _sub(devices, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type="qcow2", cache="unsafe", discard="unmap")
        _sub(disk, "source", file=str(cfg.disk))
        _sub(disk, "target", dev="vda", bus="virtio")
    for i, iso in enumerate(cfg.cdroms):
        cd = _sub(devices, "disk", type="file", device="cdrom")
        _sub(cd, "driver", name="qemu", type="raw")
        _sub(cd, "source", file=str(iso))
        _sub(cd, "target", dev=f"sd{chr(ord('a') + i)}", bus="sata")
        _sub(cd, "readonly")
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(cfg.console_log))
    _sub(serial, "target", port="0")
    if cfg.tpm:
        tpm = _sub(devices, "tpm", model="tpm-crb")
        _sub(tpm, "backend", type="emulator", version="2.0")
    _sub(devices, "memballoon", model="none")  # no memory given back behind a workload
    _sub(devices, "rng", model="virtio").append(_urandom())

    fwd = f"hostfwd=tcp:127.0.0.1:{cfg.winrm_port}-:{WINRM_GUEST_PORT}"
    if cfg.rdp_port is not None:
        fwd += f",hostfwd=tcp:127.0.0.1:{cfg.rdp_port}-:{RDP_GUEST_PORT}"
    cmdline = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
    for arg in (
        "-netdev", f"user,id=n0,restrict=on,{fwd}",
        # romfile="": no iPXE option ROM, so OVMF does not try a network boot first
        "-device", f"virtio-net-pci,netdev=n0,bus=pcie.0,addr={NET_PCI_SLOT:#x},romfile=",
    ):
        ET.SubElement(cmdline, f"{{{QEMU_NS}}}arg", {"value": arg})

    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def _urandom() -> ET.Element:
    el = ET.Element("backend", {"model": "random"})
    el.text = "/dev/urandom"
    return el


def dropped_note(cfg: WindowsDomain) -> str:
    """An XML comment naming the enlightenments dropped under this accelerator (or "")."""
    _, dropped = cfg.enlightenments()
    if not dropped:
        return ""
    return "<!-- Hyper-V enlightenments dropped: " + "; ".join(
        f"{k} ({v})" for k, v in dropped.items()
    ).replace("--", "-") + " -->\n"


def swtpm_pids(cfg: WindowsDomain) -> list[int]:
    """The swtpm processes libvirt runs for ``cfg`` (their state directory names its uuid)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # ended meanwhile
        if argv and Path(argv[0].decode(errors="replace")).name == "swtpm" and any(
            cfg.uuid.encode() in a for a in argv
        ):
            pids.append(int(proc.name))
    return pids


def remove_run_files(cfg: WindowsDomain) -> list[Path]:
    """After the domain ended: remove this run's NVRAM copy; return what is still left
    (the NVRAM, and the TPM state libvirt should have removed with the transient domain)."""
    cfg.nvram.unlink(missing_ok=True)
    return [p for p in (cfg.nvram, cfg.tpm_state) if p.exists()]
