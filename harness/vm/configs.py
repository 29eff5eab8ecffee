"""The DomainConfig of each guest kind, shared by the orchestrator and `harness vm xml`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from harness.vm.domain import DomainConfig, FirmwareBoot, KernelBoot, RomBoot


def linux_config(
    *,
    name: str,
    accelerator: Literal["kvm", "tcg"],
    memory_mib: int,
    vcpus: int,
    kernel: Path,
    initrd: Path | None,
    cmdline: str,
    overlay: Path,
    console_log: Path,
    ssh_port: int,
    balloon: bool = False,
) -> DomainConfig:
    """A Linux guest: direct kernel boot, disk overlay, SSH forwarded on 127.0.0.1."""
    return DomainConfig(
        name=name,
        domain_type="kvm" if accelerator == "kvm" else "qemu",
        memory_mib=memory_mib,
        vcpus=vcpus,
        boot=KernelBoot(kernel, initrd, cmdline),
        console_log=console_log,
        disk=overlay,
        ssh_port=ssh_port,
        balloon=balloon,
    )


def micro_config(*, name: str, memory_mib: int, rom: Path, console_log: Path) -> DomainConfig:
    """The micro guest: one vCPU under KVM, its ROM as firmware, and a way to end itself."""
    return DomainConfig(
        name=name,
        domain_type="kvm",
        memory_mib=memory_mib,
        vcpus=1,
        boot=RomBoot(rom),
        console_log=console_log,
        debug_exit=True,
        cpu="default",
    )


def cloud_config(
    *,
    name: str,
    accelerator: Literal["kvm", "tcg"],
    memory_mib: int,
    vcpus: int,
    firmware: Literal["bios", "uefi"],
    nvram: Path,
    overlay: Path,
    seed: Path,
    mac: str,
    console_log: Path,
    ssh_port: int,
    network: bool,
    kernel: KernelBoot | None = None,
) -> DomainConfig:
    """A cloud guest: its own bootloader through SeaBIOS or OVMF (``nvram``: a per-boot copy
    of the variable store), or ``kernel`` booted directly (a guest kernel under test); an
    overlay on the user's disk, the cloud-init seed (read-only)."""
    return DomainConfig(
        name=name,
        domain_type="kvm" if accelerator == "kvm" else "qemu",
        memory_mib=memory_mib,
        vcpus=vcpus,
        boot=kernel or FirmwareBoot(firmware, nvram if firmware == "uefi" else None),
        console_log=console_log,
        disk=overlay,
        ssh_port=ssh_port,
        seed=seed,
        mac=mac,
        outside_network=network,
    )
