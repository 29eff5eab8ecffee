"""The Windows domain XML: what `harness vm xml` prints for Windows and mixed suites."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.paths import SUITES_DIR
from harness.spec import SpecError, load_suite
from harness.vm.windows import (
    HYPERV,
    OVMF_CODE_SECBOOT,
    OVMF_VARS_MS,
    WindowsDomain,
    choose_enlightenments,
    windows_domain_xml,
)

pytestmark = pytest.mark.requires(tools=["virt-xml-validate"])


def validate(tmp_path: Path, xml: str) -> None:
    path = tmp_path / "d.xml"
    path.write_text(xml)
    proc = subprocess.run(
        ["virt-xml-validate", str(path), "domain"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr + xml


def domain(**kw: object) -> WindowsDomain:
    base: dict[str, object] = dict(
        name="kvmh-x-win", accelerator="tcg", memory_mib=4096, vcpus=2,
        disk=Path("/c/win.qcow2"), nvram=Path("/r/win.VARS.fd"),
        console_log=Path("/r/win.console.log"), winrm_port=45986,
    )
    base.update(kw)
    return WindowsDomain(**base)  # type: ignore[arg-type]


def test_vm_xml_of_windows_example_validates(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["vm", "xml", str(SUITES_DIR / "windows-example.toml")])
    assert result.exit_code == 0, result.output
    validate(tmp_path, result.output)
    root = ET.fromstring(result.output)
    assert root.findtext("os/type") == "hvm" and root.find("os/type").get("machine") == "q35"
    assert root.find("devices/tpm/backend").get("version") == "2.0"
    assert root.find("clock").get("offset") == "localtime"
    args = [a.get("value") for a in root.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    netdev = args[args.index("-netdev") + 1]
    # every forward binds the host's loopback only; rdp = true adds 3389
    assert netdev.count("hostfwd=tcp:127.0.0.1:") == 2 and ":5986-:5986" in netdev
    assert "restrict=on" in netdev


def test_mixed_suite_prints_both_domains_each_valid(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["vm", "xml", str(SUITES_DIR / "windows-mixed.toml")])
    assert result.exit_code == 0, result.output
    root = ET.fromstring(result.output)
    doms = root.findall("domain")
    assert [d.findtext("name") for d in doms] == ["kvmh-RUNID-lin", "kvmh-RUNID-win"]
    for i, d in enumerate(doms):
        (tmp_path / f"{i}").mkdir()
        validate(tmp_path / f"{i}", ET.tostring(d, encoding="unicode"))
    assert doms[1].find("os/loader") is not None and doms[0].find("os/kernel") is not None


def test_kvm_keeps_every_enlightenment_tcg_drops_vpindex_and_its_dependants() -> None:
    kept, dropped = choose_enlightenments("kvm")
    assert [e.name for e in kept] == [e.name for e in HYPERV] and dropped == {}
    kept, dropped = choose_enlightenments("tcg")
    assert set(dropped) == {"vpindex", "synic", "stimer", "tlbflush", "ipi"}
    assert "VP_INDEX" in dropped["vpindex"] and "vpindex" in dropped["synic"]
    assert {e.name for e in kept} == {"relaxed", "vapic", "spinlocks", "runtime", "reset",
                                      "frequencies"}


def test_every_enlightenment_is_commented_with_why(tmp_path: Path) -> None:
    xml = windows_domain_xml(domain(accelerator="kvm"))
    validate(tmp_path, xml)
    for e in HYPERV:
        assert f"<!-- {e.name}: {e.why} -->" in xml
        assert f"<{e.name} state=\"on\"" in xml
    assert 'domain xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0" type="kvm"' in xml
    assert 'mode="host-passthrough"' in xml


def test_secure_boot_uses_the_signed_firmware_with_microsoft_keys_and_smm(
    tmp_path: Path,
) -> None:
    xml = windows_domain_xml(domain(secure_boot=True))
    validate(tmp_path, xml)
    root = ET.fromstring(xml)
    loader = root.find("os/loader")
    assert loader is not None and loader.text == str(OVMF_CODE_SECBOOT)
    assert loader.get("secure") == "yes"
    assert root.find("os/nvram").get("template") == str(OVMF_VARS_MS)
    assert root.find("features/smm").get("state") == "on"


def test_no_rdp_forward_unless_asked() -> None:
    assert ":3389" not in windows_domain_xml(domain())
    assert "hostfwd=tcp:127.0.0.1:43389-:3389" in windows_domain_xml(domain(rdp_port=43389))


def test_uuid_follows_the_name_so_the_tpm_state_is_known() -> None:
    a, b = domain(), domain()
    assert a.uuid == b.uuid and a.tpm_state.name == a.uuid
    assert domain(name="kvmh-y-win").uuid != a.uuid


def test_secure_boot_on_a_linux_vm_is_an_error(tmp_path: Path) -> None:
    suite = tmp_path / "s.toml"
    suite.write_text(
        'name = "s"\n[[vms]]\nname = "g"\nimage = "linux"\nsecure_boot = true\n'
        '[[runs]]\nworkload = "page-touch"\nvm = "g"\n'
    )
    with pytest.raises(SpecError, match="secure_boot and rdp apply to image"):
        load_suite(suite)


def test_a_windows_workload_on_a_linux_vm_is_an_error(tmp_path: Path) -> None:
    suite = tmp_path / "s.toml"
    suite.write_text(
        'name = "s"\n[[vms]]\nname = "g"\nimage = "linux"\n'
        '[[runs]]\nworkload = "page-touch-win"\nvm = "g"\n'
    )
    with pytest.raises(SpecError, match="windows"):
        load_suite(suite)
