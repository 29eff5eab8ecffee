"""Domain XML: what the harness asks libvirt for, checked against libvirt's own schema."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.vm.configs import linux_config, micro_config
from harness.vm.domain import QEMU_NS, domain_xml

needs_validator = pytest.mark.skipif(
    shutil.which("virt-xml-validate") is None or shutil.which("xmllint") is None,
    reason="virt-xml-validate/xmllint missing (apt-get install libvirt-clients libxml2-utils)",
)


def linux_xml(tmp_path: Path, accel: str = "tcg") -> str:
    return domain_xml(
        linux_config(
            name="kvmh-test-linux",
            accelerator=accel,
            memory_mib=1024,
            vcpus=2,  # type: ignore[arg-type]
            kernel=tmp_path / "vmlinuz",
            initrd=tmp_path / "initrd.img",
            cmdline="root=/dev/vda rw",
            overlay=tmp_path / "linux.qcow2",
            console_log=tmp_path / "console.log",
            ssh_port=40022,
        )
    )


def micro_xml(tmp_path: Path) -> str:
    return domain_xml(
        micro_config(
            name="kvmh-test-micro",
            memory_mib=16,
            rom=tmp_path / "micro.rom",
            console_log=tmp_path / "console.log",
        )
    )


def validate(tmp_path: Path, xml: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    return subprocess.run(
        ["virt-xml-validate", str(path), "domain"], capture_output=True, text=True, check=False
    )


@needs_validator
@pytest.mark.parametrize("accel", ["tcg", "kvm"])
def test_linux_domain_validates_against_libvirt_schema(tmp_path: Path, accel: str) -> None:
    proc = validate(tmp_path, linux_xml(tmp_path, accel))
    assert proc.returncode == 0, proc.stderr


@needs_validator
def test_micro_domain_validates_against_libvirt_schema(tmp_path: Path) -> None:
    proc = validate(tmp_path, micro_xml(tmp_path))
    assert proc.returncode == 0, proc.stderr


@needs_validator
def test_validator_rejects_broken_xml(tmp_path: Path) -> None:
    # The schema check above is only worth something if it can fail.
    broken = linux_xml(tmp_path).replace("<vcpu>2</vcpu>", "<vcpu>two</vcpu>")
    assert validate(tmp_path, broken).returncode != 0


def test_linux_domain_shape(tmp_path: Path) -> None:
    root = ET.fromstring(linux_xml(tmp_path))
    assert root.get("type") == "qemu"
    assert root.find("os/type").get("machine") == "q35"  # type: ignore[union-attr]
    assert root.findtext("os/kernel") == str(tmp_path / "vmlinuz")
    assert root.findtext("os/cmdline") == "root=/dev/vda rw"
    disk = root.find("devices/disk[@device='disk']")
    assert disk is not None
    assert disk.find("source").get("file") == str(tmp_path / "linux.qcow2")  # type: ignore[union-attr]
    assert disk.find("target").get("bus") == "virtio"  # type: ignore[union-attr]
    assert root.find("devices/serial/source").get("path") == str(tmp_path / "console.log")  # type: ignore[union-attr]
    assert root.find("devices/interface") is None  # no libvirt network, no bridge
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    netdev = args[args.index("-netdev") + 1]
    # SSH is reachable on loopback only, and the guest reaches nothing of the host's
    # (restrict=on: no 10.0.2.2 to host loopback services; tests/integration/test_hostile_guest).
    assert netdev == "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22"
    assert root.find("cpu").get("mode") == "maximum"  # type: ignore[union-attr]


def test_kvm_domain_passes_host_cpu_through(tmp_path: Path) -> None:
    root = ET.fromstring(linux_xml(tmp_path, "kvm"))
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]


def test_micro_domain_shape(tmp_path: Path) -> None:
    root = ET.fromstring(micro_xml(tmp_path))
    assert root.get("type") == "kvm"
    assert root.find("os/type").get("machine") == "pc"  # type: ignore[union-attr]
    loader = root.find("os/loader")
    assert loader is not None and loader.get("type") == "rom"
    assert loader.text == str(tmp_path / "micro.rom")
    assert root.find("devices/disk") is None
    assert root.find("cpu") is None  # QEMU's default model: PVM rejects host MSRs
    assert root.find("devices/memballoon").get("model") == "none"  # type: ignore[union-attr]
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    assert "isa-debug-exit,iobase=0xf4,iosize=0x04" in args
    assert "-netdev" not in args


@pytest.mark.parametrize("kib", [2048, 1048576])
def test_hugetlbfs_backed_memory(tmp_path: Path, kib: int) -> None:
    cfg = dataclasses.replace(
        micro_config(name="kvmh-test-huge", memory_mib=16, rom=tmp_path / "paging.rom",
                     console_log=tmp_path / "console.log"),
        hugepages_kib=kib,
    )
    xml = domain_xml(cfg)
    page = ET.fromstring(xml).find("memoryBacking/hugepages/page")
    assert page is not None and (page.get("size"), page.get("unit")) == (str(kib), "KiB")
    assert ET.fromstring(micro_xml(tmp_path)).find("memoryBacking") is None
    if shutil.which("virt-xml-validate") and shutil.which("xmllint"):
        proc = validate(tmp_path, xml)
        assert proc.returncode == 0, proc.stderr


def test_applied_host_config_backs_every_guest_with_its_huge_pages(tmp_path: Path) -> None:
    """A host configuration with guest_hugepages reaches the domain XML of each platform."""
    from harness.host.mmuconfig import HostConfigRecord
    from harness.platform.base import RunContext, with_host_memory
    from harness.progress import QuietReporter
    from harness.runstate import RunState
    from harness.vm import configs
    from tests.unit.test_results import host, result

    state = RunState(result(), tmp_path / "r.json", tmp_path / "run", QuietReporter(), True, [])
    ctx = RunContext(state, None, host())  # type: ignore[arg-type]  # no libvirt needed here
    cfg = configs.micro_config(
        name="kvmh-x", memory_mib=16, rom=tmp_path / "r.rom", console_log=tmp_path / "c.log"
    )
    assert with_host_memory(cfg, ctx) is cfg  # no host configuration: untouched
    state.result.host_config = HostConfigRecord(
        name="huge", settings=[], commands=[], guest_hugepages_kib=2048
    )
    xml = domain_xml(with_host_memory(cfg, ctx))
    assert "<memoryBacking><hugepages><page size=\"2048\" unit=\"KiB\" />" in xml.replace(
        "\n", "").replace("  ", "")
