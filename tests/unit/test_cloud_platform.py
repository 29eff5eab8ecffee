"""The cloud platform's pieces that need no VM: domain XML, sudo, console reading, guest tools."""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.guest.base import CommandResult, GuestError
from harness.image import guest_tools
from harness.image.linux import GUEST_TOOL_SOURCES, GUEST_TOOLS
from harness.paths import WORKLOADS_DIR
from harness.platform import platform_for
from harness.platform.cloud import (
    CloudError,
    _check_root,
    _ssh_diagnosis,
    cloud_init_errors,
    sudo_wrap,
)
from harness.spec import load_workload
from harness.vm.configs import cloud_config
from harness.vm.domain import QEMU_NS, domain_xml
from harness.vm.windows import OVMF_CODE, OVMF_VARS

needs_validator = pytest.mark.skipif(
    shutil.which("virt-xml-validate") is None or shutil.which("xmllint") is None,
    reason="virt-xml-validate/xmllint missing (apt-get install libvirt-clients libxml2-utils)",
)


def cloud_xml(tmp_path: Path, firmware: str, network: bool = False) -> str:
    return domain_xml(cloud_config(
        name="kvmh-test-cloud", accelerator="tcg", memory_mib=1024, vcpus=2,
        firmware=firmware,  # type: ignore[arg-type]
        nvram=tmp_path / "c.VARS.fd", overlay=tmp_path / "c.qcow2",
        seed=tmp_path / "c.cloud-init" / "seed.iso", mac="52:54:00:12:34:56",
        console_log=tmp_path / "c.console.log", ssh_port=40022, network=network,
    ))


def qemu_args(xml: str) -> list[str]:
    return [a.get("value", "") for a in ET.fromstring(xml).iter(f"{{{QEMU_NS}}}arg")]


def test_bios_boots_the_overlay_through_seabios_with_the_seed_read_only(tmp_path: Path) -> None:
    root = ET.fromstring(cloud_xml(tmp_path, "bios"))
    os_el = root.find("os")
    assert os_el is not None and os_el.find("loader") is None and os_el.find("kernel") is None
    assert [b.get("dev") for b in os_el.findall("boot")] == ["hd"]
    disks = {d.find("target").get("dev"): d for d in root.iter("disk")}  # type: ignore[union-attr]
    assert disks["vda"].find("source").get("file") == str(tmp_path / "c.qcow2")  # type: ignore[union-attr]
    assert disks["vda"].find("readonly") is None
    seed = disks["vdb"]  # virtio: Debian's cloud kernel has no AHCI for a CD
    assert seed.find("source").get("file") == str(tmp_path / "c.cloud-init" / "seed.iso")  # type: ignore[union-attr]
    assert seed.find("readonly") is not None and seed.find("driver").get("type") == "raw"  # type: ignore[union-attr]
    args = qemu_args(cloud_xml(tmp_path, "bios"))
    assert "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22" in args
    assert any(a.endswith(",romfile=,mac=52:54:00:12:34:56") for a in args)


def test_uefi_is_ovmf_with_a_per_boot_nvram_and_no_tpm(tmp_path: Path) -> None:
    root = ET.fromstring(cloud_xml(tmp_path, "uefi"))
    loader, nvram = root.find("os/loader"), root.find("os/nvram")
    assert loader is not None and nvram is not None
    assert (loader.text, loader.get("type"), loader.get("secure")) == (
        str(OVMF_CODE), "pflash", "no")
    assert (nvram.text, nvram.get("template")) == (str(tmp_path / "c.VARS.fd"), str(OVMF_VARS))
    assert root.find("devices/tpm") is None and root.find("features/hyperv") is None


def test_network_true_drops_restrict_and_keeps_the_forward_on_loopback(tmp_path: Path) -> None:
    args = qemu_args(cloud_xml(tmp_path, "bios", network=True))
    assert "user,id=n0,hostfwd=tcp:127.0.0.1:40022-:22" in args


@needs_validator
@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_cloud_domains_validate_against_libvirts_schema(tmp_path: Path, firmware: str) -> None:
    xml = tmp_path / "d.xml"
    xml.write_text(cloud_xml(tmp_path, firmware))
    proc = subprocess.run(["virt-xml-validate", str(xml), "domain"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_a_cloud_kernel_under_test_boots_directly_on_the_disk(tmp_path: Path) -> None:
    from harness.vm.domain import KernelBoot

    xml = domain_xml(cloud_config(
        name="kvmh-test-cloud", accelerator="tcg", memory_mib=1024, vcpus=1, firmware="uefi",
        nvram=tmp_path / "c.VARS.fd", overlay=tmp_path / "c.qcow2",
        seed=tmp_path / "c.cloud-init" / "seed.iso", mac="52:54:00:12:34:56",
        console_log=tmp_path / "c.console.log", ssh_port=40022, network=False,
        kernel=KernelBoot(tmp_path / "vmlinuz", tmp_path / "initrd", "root=LABEL=r ro"),
    ))
    os_el = ET.fromstring(xml).find("os")
    assert os_el is not None
    assert os_el.findtext("kernel") == str(tmp_path / "vmlinuz")
    assert os_el.findtext("initrd") == str(tmp_path / "initrd")
    assert os_el.findtext("cmdline") == "root=LABEL=r ro"
    assert os_el.find("loader") is None and os_el.find("nvram") is None  # no firmware boot
    assert str(tmp_path / "c.cloud-init" / "seed.iso") in xml  # the seed still goes in
    if shutil.which("virt-xml-validate") is not None:
        f = tmp_path / "d.xml"
        f.write_text(xml)
        proc = subprocess.run(["virt-xml-validate", str(f), "domain"], capture_output=True,
                              text=True, check=False)
        assert proc.returncode == 0, proc.stderr


def test_vm_xml_prints_a_cloud_vm(tmp_path: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "d.qcow2"), "1M"],
                   check=True)
    suite = tmp_path / "s.toml"
    suite.write_text(
        'name = "s"\n[[vms]]\nname = "c"\nimage = "cloud"\ndisk = "d.qcow2"\n'
        'os_user = "bench"\nfirmware = "uefi"\n[[runs]]\nworkload = "page-touch"\nvm = "c"\n'
    )
    result = CliRunner().invoke(main, ["vm", "xml", str(suite)])
    assert result.exit_code == 0, result.output
    assert f"overlay on {tmp_path / 'd.qcow2'}" in result.output
    assert "<name>kvmh-RUNID-c</name>" in result.output and "OVMF_CODE" in result.output
    assert platform_for("cloud").kind == "cloud"


def test_commands_run_as_root_through_sudo_with_the_harness_path() -> None:
    wrapped = sudo_wrap("page-touch --mib 8 && echo 'done'")
    argv = shlex.split(wrapped)
    assert argv[:3] == ["sudo", "-n", "env"]
    assert argv[3] == f"PATH={guest_tools.GUEST_PATH}"
    assert argv[3].split("=", 1)[1].startswith(guest_tools.GUEST_BIN + ":")
    assert argv[4:] == ["sh", "-c", "page-touch --mib 8 && echo 'done'"]


def test_cloud_init_errors_are_picked_out_of_the_console() -> None:
    console = "\n".join([
        "[  OK  ] Started ssh.service",
        "[   12.1] cloud-init[412]: 2026-12-04 12:00:01,000 - util.py[WARNING]: Failed to "
        "mount /dev/sr0 when looking for data",
        "[   13.0] cloud-init[412]: 2026-12-04 12:00:02,000 - __init__.py[ERROR]: no datasource",
        "random kernel line",
    ])
    errors = cloud_init_errors(console)
    assert len(errors) == 2 and all(e.startswith("cloud-init: 2026-12-04") for e in errors)
    assert "[ERROR]: no datasource" in errors[1]
    assert cloud_init_errors("plain boot\nlogin:\n") == []


def test_readiness_failures_say_what_sshd_did() -> None:
    no_sshd = _ssh_diagnosis(GuestError("no SSH on 127.0.0.1:1 after 9 s: SSHException("
                                        "'Error reading SSH protocol banner')"), "bench")
    assert "no SSH server answered" in no_sshd and "sshd" in no_sshd
    refused = _ssh_diagnosis(GuestError("AuthenticationException('Authentication failed.')"),
                             "bench")
    assert "refused this boot's key for 'bench'" in refused
    wrong = _ssh_diagnosis(GuestError("host key mismatch on 127.0.0.1:5"), "bench")
    assert "not the seed's" in wrong


class FakeGuest:
    """A guest whose file system is a dict; commands are the few the installer sends."""

    def __init__(self, programs: set[str]) -> None:
        self.files: dict[str, bytes] = {}
        self.programs = programs
        self.commands: list[str] = []

    def put(self, local: Path, remote: str) -> None:
        self.files[remote] = local.read_bytes()

    def run(self, command: str, *, timeout_s: float, abort_if: object = None) -> CommandResult:
        self.commands.append(command)
        out = ""
        if command.startswith("sha256sum"):
            for path in shlex.split(command.split(" 2>")[0])[1:]:
                if path in self.files:
                    out += f"{hashlib.sha256(self.files[path]).hexdigest()}  {path}\n"
        elif command.startswith("mkdir -p"):
            words = shlex.split(command.split(";")[0])
            src, dest = words[-2], words[-1]
            self.files[dest] = self.files.pop(src)
        elif "command -v" in command:
            for part in command.split("; "):
                name = shlex.split(part)[2]
                if name not in self.programs:
                    out += f"{name}\n"
        return CommandResult(0, out, "", 0, 0)


def test_the_harness_programs_are_copied_once_and_checked_by_digest(tmp_path: Path) -> None:
    tools = guest_tools.GuestTools(
        files={n: tmp_path / n for n in ("kvm-marker", "page-touch")},
        sha256={},
    )
    for name, path in tools.files.items():
        path.write_bytes(name.encode() * 100)
        tools.sha256[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    guest = FakeGuest(set())
    names = guest_tools.harness_programs(["page-touch", "stress-ng"])
    assert names == ["kvm-marker", "page-touch"]
    assert guest_tools.install(guest, tools, names) == names  # type: ignore[arg-type]
    assert set(guest.files) == {f"{guest_tools.GUEST_BIN}/{n}" for n in names}
    assert guest_tools.install(guest, tools, names) == []  # type: ignore[arg-type]
    guest.files[f"{guest_tools.GUEST_BIN}/page-touch"] = b"someone else's page-touch"
    assert guest_tools.install(guest, tools, names) == ["page-touch"]  # type: ignore[arg-type]


def test_missing_package_programs_are_named(tmp_path: Path) -> None:
    guest = FakeGuest({"stress-ng"})
    found = guest_tools.missing_programs(guest, ["stress-ng", "redis-server"])  # type: ignore[arg-type]
    assert found == ["redis-server"]


def test_every_linux_workload_declares_the_programs_it_runs() -> None:
    known = set(GUEST_TOOL_SOURCES) | set(GUEST_TOOLS) | {"redis-cli"}
    for path in sorted(WORKLOADS_DIR.glob("*.toml")):
        workload = load_workload(path)
        if workload.guest != "linux":
            continue
        words = {w for p in workload.phases for w in (p.command or "").replace(";", " ").split()}
        used = {w for w in words if w in known} - {"python3"}
        assert used <= set(workload.needs), (workload.name, used - set(workload.needs))
        assert set(workload.needs) <= known, workload.name


class SudoGuest:
    """Answers ``id -u`` as a guest whose sudo does (or does not) let the user in."""

    def __init__(self, works: bool) -> None:
        self.works = works

    def run(self, command: str, *, timeout_s: float) -> CommandResult:
        assert command == "id -u"
        if self.works:
            return CommandResult(0, "0\n", "", 0, 0)
        return CommandResult(1, "", "sudo: a password is required\n", 0, 0)


def test_a_user_without_passwordless_sudo_is_a_boot_failure_that_says_why() -> None:
    _check_root(SudoGuest(True), "bench")  # type: ignore[arg-type]
    with pytest.raises(CloudError, match="sudo: a password is required") as info:
        _check_root(SudoGuest(False), "bench")  # type: ignore[arg-type]
    assert "'bench'" in str(info.value) and "NOPASSWD" in str(info.value)
