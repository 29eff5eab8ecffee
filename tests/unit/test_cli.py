"""The `harness` command's cheap subcommands, through click's runner (no VMs)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.paths import SUITES_DIR


def test_validate_default_suite() -> None:
    result = CliRunner().invoke(main, ["validate"])
    assert result.exit_code == 0, result.output
    assert "default.toml: ok" in result.output


def test_validate_bad_suite_names_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'name = "bad"\n[[vms]]\nname = "g"\nvcpus = 0\n'
        '[[runs]]\nworkload = "page-touch"\nvm = "g"\n'
    )
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code != 0
    assert f"{bad}:4: vms[0].vcpus" in result.output


@pytest.mark.skipif(shutil.which("virt-xml-validate") is None, reason="needs libvirt-clients")
@pytest.mark.parametrize("suite", ["default.toml", "micro-kvm.toml"])
def test_vm_xml_prints_valid_domains(tmp_path: Path, suite: str) -> None:
    result = CliRunner().invoke(main, ["vm", "xml", str(SUITES_DIR / suite)])
    assert result.exit_code == 0, result.output
    xml = tmp_path / "d.xml"
    xml.write_text(result.output)
    proc = subprocess.run(
        ["virt-xml-validate", str(xml), "domain"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr + result.output


def test_vm_xml_unknown_vm_is_an_error() -> None:
    result = CliRunner().invoke(main, ["vm", "xml", "--vm", "nope"])
    assert result.exit_code != 0
    assert "no VM named 'nope'" in result.output


def test_probes_json_lists_catalogue_with_reasons() -> None:
    result = CliRunner().invoke(main, ["probes", "--json"])
    assert result.exit_code == 0, result.output
    probes = {p["name"]: p for p in json.loads(result.output)}
    assert {"kvm_exit", "kvm_page_fault", "kvm_cpuid", "kvm_mmu_load"} <= set(probes)
    for p in probes.values():
        assert p["question"] and (p["available"] or p["reason"])


def test_validate_names_concurrent_groups() -> None:
    result = CliRunner().invoke(main, ["validate", str(SUITES_DIR / "neighbours.toml")])
    assert result.exit_code == 0, result.output
    assert "group neighbours: toucher + stressor at once" in result.output


@pytest.mark.skipif(shutil.which("virt-xml-validate") is None, reason="needs libvirt-clients")
@pytest.mark.parametrize(
    ("suite", "vm"),
    [("neighbours.toml", "toucher"), ("neighbours.toml", "stressor"),
     ("micro-neighbours.toml", "falling")],
)
def test_vm_xml_of_a_group_member_is_valid(tmp_path: Path, suite: str, vm: str) -> None:
    result = CliRunner().invoke(main, ["vm", "xml", str(SUITES_DIR / suite), "--vm", vm])
    assert result.exit_code == 0, result.output
    assert f"<name>kvmh-RUNID-{vm}</name>" in result.output
    xml = tmp_path / "d.xml"
    xml.write_text(result.output)
    proc = subprocess.run(
        ["virt-xml-validate", str(xml), "domain"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr + result.output
