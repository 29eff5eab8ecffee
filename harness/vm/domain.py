"""libvirt domain XML, generated from a typed description of the VM.

Two shapes exist today: a Linux guest (q35, direct kernel boot, virtio disk on
an overlay, restricted user-mode networking with SSH forwarded to 127.0.0.1) and
the micro KVM guest (pc, boot sector on a floppy, isa-debug-exit). The QEMU
namespace carries what libvirt 9.0 cannot express: the user-mode netdev with
a loopback host forward (libvirt's passt backend is rejected there, and the
house rule forbids libvirt networks and bridges) and isa-debug-exit.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from harness.vm.windows import WindowsDomain

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)

#: The PCI slot of the virtio-net device added through the QEMU namespace; q35
#: needs an explicit address, and libvirt assigns its own devices from slot 1 up.
NET_PCI_SLOT = 0x09


@dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot: no bootloader, no firmware disk scan."""

    kernel: Path
    initrd: Path | None
    cmdline: str


@dataclass(frozen=True)
class RomBoot:
    """Replace the firmware with a ROM image (the micro guest).

    The micro guest's boot sector doubles as a 64 KiB BIOS ROM: it runs from
    reset, with no SeaBIOS floppy read, which times out when every emulated
    instruction is traced (seen in 3 of 5 traced runs here).
    """

    rom: Path


@dataclass(frozen=True)
class UefiBoot:
    """OVMF UEFI with TPM and Hyper-V (a Windows guest): its XML is harness/vm/windows.py's."""

    domain: WindowsDomain


@dataclass(frozen=True)
class FirmwareBoot:
    """Boot the disk through firmware (a cloud guest's own bootloader): SeaBIOS, or OVMF
    UEFI with ``nvram`` a per-boot copy of its variable store (made by libvirt at start)."""

    firmware: Literal["bios", "uefi"]
    nvram: Path | None = None


@dataclass(frozen=True)
class DomainConfig:
    """Everything the XML says about one VM."""

    name: str
    domain_type: Literal["kvm", "qemu"]  # "qemu" = TCG
    memory_mib: int
    vcpus: int
    boot: KernelBoot | RomBoot | UefiBoot | FirmwareBoot
    console_log: Path
    disk: Path | None = None  # qcow2 overlay, virtio-blk
    ssh_port: int | None = None  # forwarded from 127.0.0.1
    debug_exit: bool = False  # isa-debug-exit at 0xf4: the guest can end itself
    balloon: bool = False  # virtio-balloon, resized through libvirt setMemory
    # "host": host-passthrough under KVM, "maximum" under TCG (all TCG can emulate);
    # "default": QEMU's own model, for the micro guest, which under the PVM
    # backend cannot take the host CPU's MSRs (QEMU aborts setting MSR 0x10a).
    cpu: Literal["host", "default"] = "host"
    emulator: str = "/usr/bin/qemu-system-x86_64"
    # Guest RAM from hugetlbfs pages of this size (2048 or 1048576 KiB), None: anonymous
    # memory. libvirt needs hugetlbfs mounted when libvirtd starts (or hugetlbfs_mount in
    # qemu.conf) and enough pages reserved (host configuration hugepages_2m / hugepages_1g).
    hugepages_kib: int | None = None
    # Host CPUs for vCPU i (vcpu_pins[i % len]) and for QEMU's emulator threads
    # (libvirt cputune): pinned guests measure the change, not the scheduler's choices.
    vcpu_pins: tuple[int, ...] | None = None
    emulator_pins: tuple[int, ...] | None = None
    # Cloud guests: the cloud-init seed as a read-only virtio disk (a CD would need AHCI,
    # which Debian's cloud kernel lacks), the NIC's MAC address (the seed's network config
    # matches it), and a network the guest may leave (no restrict=on).
    seed: Path | None = None
    mac: str | None = None
    outside_network: bool = False


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def domain_xml(cfg: DomainConfig) -> str:
    """The libvirt domain XML for ``cfg``, pretty-printed."""
    if isinstance(cfg.boot, UefiBoot):
        from harness.vm.windows import windows_domain_xml  # imports this module

        return windows_domain_xml(cfg.boot.domain)
    dom = ET.Element("domain", {"type": cfg.domain_type})
    _sub(dom, "name", cfg.name)
    _sub(dom, "memory", str(cfg.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(cfg.vcpus))
    if cfg.vcpu_pins or cfg.emulator_pins:
        tune = _sub(dom, "cputune")
        for i in range(cfg.vcpus if cfg.vcpu_pins else 0):
            assert cfg.vcpu_pins is not None
            _sub(tune, "vcpupin", vcpu=str(i), cpuset=str(cfg.vcpu_pins[i % len(cfg.vcpu_pins)]))
        if cfg.emulator_pins:
            _sub(tune, "emulatorpin", cpuset=",".join(str(c) for c in cfg.emulator_pins))
    if cfg.hugepages_kib is not None:
        backing = _sub(dom, "memoryBacking")
        _sub(_sub(backing, "hugepages"), "page", size=str(cfg.hugepages_kib), unit="KiB")

    os_el = _sub(dom, "os")
    if isinstance(cfg.boot, KernelBoot):
        _sub(os_el, "type", "hvm", arch="x86_64", machine="q35")
        _sub(os_el, "kernel", str(cfg.boot.kernel))
        if cfg.boot.initrd is not None:
            _sub(os_el, "initrd", str(cfg.boot.initrd))
        _sub(os_el, "cmdline", cfg.boot.cmdline)
    elif isinstance(cfg.boot, FirmwareBoot):
        _sub(os_el, "type", "hvm", arch="x86_64", machine="q35")
        if cfg.boot.firmware == "uefi":
            from harness.vm.windows import OVMF_CODE, OVMF_VARS  # imports this module

            _sub(os_el, "loader", str(OVMF_CODE), readonly="yes", type="pflash", secure="no")
            _sub(os_el, "nvram", str(cfg.boot.nvram), template=str(OVMF_VARS))
        _sub(os_el, "boot", dev="hd")
    else:
        # The micro guest is real-mode code from reset: the plain i440FX "pc" machine.
        _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
        _sub(os_el, "loader", str(cfg.boot.rom), type="rom", readonly="yes")

    features = _sub(dom, "features")
    _sub(features, "acpi")
    if cfg.cpu == "host" and cfg.domain_type == "kvm":
        _sub(dom, "cpu", mode="host-passthrough", check="none", migratable="off")
    elif cfg.cpu == "host":
        # TCG cannot pass the host CPU through; "maximum" is every feature TCG emulates.
        _sub(dom, "cpu", mode="maximum", check="none")
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "destroy")
    _sub(dom, "on_crash", "destroy")

    devices = _sub(dom, "devices")
    _sub(devices, "emulator", cfg.emulator)
    for path, dev, driver, readonly in (
        (cfg.disk, "vda", {"type": "qcow2", "cache": "unsafe", "discard": "unmap"}, False),
        (cfg.seed, "vdb", {"type": "raw"}, True),
    ):
        if path is None:
            continue
        disk = _sub(devices, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", **driver)
        _sub(disk, "source", file=str(path))
        _sub(disk, "target", dev=dev, bus="virtio")
        if readonly:
            _sub(disk, "readonly")
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(cfg.console_log))
    _sub(serial, "target", port="0")
    # No balloon unless asked for: it would give memory back behind the workload's back.
    # A requested one only moves when the harness calls setMemory (no autodeflate).
    _sub(devices, "memballoon", model="virtio" if cfg.balloon else "none")
    if isinstance(cfg.boot, KernelBoot | FirmwareBoot):
        _sub(devices, "rng", model="virtio").append(_backend_random())

    args: list[str] = []
    if cfg.ssh_port is not None:
        # restrict=on: the guest reaches nothing outside (not the host's loopback
        # services through 10.0.2.2, not the network); the forward still works. Only a
        # cloud VM with network = true goes without (cloud-init installs its packages).
        restrict = "" if cfg.outside_network else "restrict=on,"
        device = f"virtio-net-pci,netdev=n0,bus=pcie.0,addr={NET_PCI_SLOT:#x}"
        if isinstance(cfg.boot, FirmwareBoot):
            device += ",romfile="  # no iPXE option ROM: the firmware boots the disk at once
        args += [
            "-netdev",
            f"user,id=n0,{restrict}hostfwd=tcp:127.0.0.1:{cfg.ssh_port}-:22",
            "-device",
            device + (f",mac={cfg.mac}" if cfg.mac else ""),
        ]
    if cfg.debug_exit:
        args += ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
    if args:
        cmdline = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
        for arg in args:
            ET.SubElement(cmdline, f"{{{QEMU_NS}}}arg", {"value": arg})

    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def _backend_random() -> ET.Element:
    # Entropy for sshd at boot: without it, key exchange can stall under TCG.
    el = ET.Element("backend", {"model": "random"})
    el.text = "/dev/urandom"
    return el
