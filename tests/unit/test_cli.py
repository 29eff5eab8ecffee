"""The `harness` command's cheap subcommands, through click's runner (no VMs)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.paths import SUITES_DIR
from harness.spec import TraceSpec, load_suite
from harness.trace.probes import CATALOGUE
from tests.unit.synthetic_results import STEADY, side


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
    assert result.exit_code == 2
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


# --- bad input exits 2, never a traceback (issue 22 item 10) ---------------------------


@pytest.mark.parametrize("where", ["missing-folder", "a-folder"])
def test_compare_output_that_cannot_be_written_is_bad_input(tmp_path: Path, where: str) -> None:
    base = side(tmp_path / "a", STEADY)
    output = tmp_path / "nowhere" / "ab.md" if where == "missing-folder" else tmp_path
    result = CliRunner().invoke(main, ["compare", str(base), str(base), "--output", str(output)])
    assert result.exit_code == 2, result.output  # 1 would read as "regression" in CI
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"--output {output}" in result.output and "fix:" in result.output


def test_compare_output_is_written_where_it_can_be(tmp_path: Path) -> None:
    base = side(tmp_path / "a", STEADY)
    out = tmp_path / "ab.md"
    result = CliRunner().invoke(main, ["compare", str(base), str(base), "--format", "md",
                                       "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text().strip()


# --- --threshold: a percentage, or a fraction as in the JSON report ---------------------


@pytest.mark.parametrize("given", ["5%", "0.05", " 5% "])
def test_threshold_five_percent_either_way(tmp_path: Path, given: str) -> None:
    base = side(tmp_path / "a", STEADY)
    result = CliRunner().invoke(main, ["compare", str(base), str(base), "--format", "json",
                                       "--threshold", given])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["threshold"] == pytest.approx(0.05)


@pytest.mark.parametrize("given", ["5", "1", "lots", "-1%", "nan"])
def test_threshold_ambiguous_or_wrong_is_refused(tmp_path: Path, given: str) -> None:
    base = side(tmp_path / "a", STEADY)
    result = CliRunner().invoke(main, ["compare", str(base), str(base), "--threshold", given])
    assert result.exit_code == 2, result.output
    assert "--threshold" in result.output
    if given in ("5", "1"):
        assert f"write {given}%" in result.output


def test_threshold_decides_the_verdict_as_a_fraction(tmp_path: Path) -> None:
    """0.05 must not mean 0.05%: a 3% change is no regression at 0.05, one at 0.01."""
    base = side(tmp_path / "a", STEADY)
    slower = side(tmp_path / "b", [v * 0.97 for v in STEADY])
    at_5 = CliRunner().invoke(main, ["compare", str(base), str(slower), "--threshold", "0.05"])
    at_1 = CliRunner().invoke(main, ["compare", str(base), str(slower), "--threshold", "0.01"])
    assert (at_5.exit_code, at_1.exit_code) == (0, 1), at_5.output + at_1.output


# --- vm xml ------------------------------------------------------------------------------


def test_vm_xml_unknown_vm_is_bad_input_with_a_suggestion() -> None:
    result = CliRunner().invoke(
        main, ["vm", "xml", str(SUITES_DIR / "neighbours.toml"), "--vm", "touchr"]
    )
    assert result.exit_code == 2, result.output
    assert "no VM named 'touchr' (did you mean 'toucher'?)" in result.output


@pytest.mark.parametrize(
    "suite", ["neighbours.toml", "neighbours-catalogue.toml", "micro-neighbours.toml"]
)
def test_vm_xml_of_several_vms_is_one_document(tmp_path: Path, suite: str) -> None:
    path = SUITES_DIR / suite
    result = CliRunner().invoke(main, ["vm", "xml", str(path)])
    assert result.exit_code == 0, result.output
    root = ET.fromstring(result.output)  # one well-formed document, or this raises
    assert root.tag == "domains"
    vms = [vm.name for vm in load_suite(path).spec.vms]
    domains = root.findall("domain")
    assert [d.findtext("name") for d in domains] == [f"kvmh-RUNID-{vm}" for vm in vms]
    for vm in vms:
        assert f"<!-- VM {vm} -->" in result.output
    ports = re.findall(r"hostfwd=tcp:127\.0\.0\.1:(\d+)-:22", result.output)
    assert len(ports) == len(set(ports)), ports  # one forward port per VM
    if shutil.which("virt-xml-validate") is None:
        return
    for i, d in enumerate(domains):  # each part as virsh define would take it
        one = tmp_path / f"d{i}.xml"
        one.write_text(ET.tostring(d, encoding="unicode"))
        proc = subprocess.run(["virt-xml-validate", str(one), "domain"], capture_output=True,
                              text=True, check=False)
        assert proc.returncode == 0, proc.stderr


def test_vm_xml_linux_vms_forward_distinct_ports() -> None:
    result = CliRunner().invoke(main, ["vm", "xml", str(SUITES_DIR / "neighbours.toml")])
    ports = re.findall(r"hostfwd=tcp:127\.0\.0\.1:(\d+)-:22", result.output)
    assert len(ports) == 2 and ports[0] != ports[1], result.output


# --- probes: names as suites take them ---------------------------------------------------


def test_probes_table_names_are_what_suites_and_stacks_accept() -> None:
    result = CliRunner().invoke(main, ["probes"])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.split()[:1] != ["name"]]
    names = [ln.split()[0] for ln in lines if ln and not ln.startswith(("groups", "libbpf"))]
    assert set(names) == {p.name for p in CATALOGUE}
    for name in names:
        TraceSpec(probes=[name], stacks=[name])  # raises if a suite would refuse it
    assert "kvmmmu:kvm_mmu_get_page" not in names


def test_a_probe_target_in_a_suite_gets_the_name_suggested() -> None:
    with pytest.raises(ValueError, match=r"did you mean 'kvm_mmu_get_page'"):
        TraceSpec(probes=["all"], stacks=["kvmmmu:kvm_mmu_get_page"])


# --- validate ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suite", "counts"),
    [("default.toml", "(1 VM, 2 runs,"), ("neighbours.toml", "(2 VMs, 2 runs,")],
)
def test_validate_counts_in_words(suite: str, counts: str) -> None:
    result = CliRunner().invoke(main, ["validate", str(SUITES_DIR / suite)])
    assert result.exit_code == 0, result.output
    assert counts in result.output


ALL_WRONG = """\
name = "bad"
[[vms]]
name = "g"
vcpus = 0
[[vms]]
name = "h"
memroy_mib = 512
[[runs]]
workload = "page-touch"
vm = "g"
[[runs]]
workload = "page-touch"
vm = "hh"
[[groups]]
name = "alone"
vms = ["g"]
[trace]
backend = "bpftarce"
stacks = ["kvmmmu:kvm_mmu_get_page"]
"""


def test_validate_reports_every_mistake_in_one_pass(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(ALL_WRONG)
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code == 2, result.output
    out = result.output
    assert f"{bad}:4: vms[0].vcpus" in out
    assert "vms[1].memroy_mib" in out and "did you mean 'memory_mib'" in out
    assert "trace.backend" in out and "did you mean 'bpftrace'" in out
    # hidden behind the backend typo before: the stacks probe ...
    assert "unknown probe 'kvmmmu:kvm_mmu_get_page' (did you mean 'kvm_mmu_get_page'?)" in out
    # ... and behind both, the cross-references of a suite with broken fields
    assert "runs[1].vm: no VM named 'hh' (did you mean 'h'?)" in out
    assert "groups[0].vms: group 'alone' lists 1 VM(s)" in out
    assert "Traceback" not in out


def test_validate_all_at_once_keeps_list_positions(tmp_path: Path) -> None:
    """A broken [[vms]] entry is left out for the later checks; the rest keep their index."""
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'name = "bad"\n[[vms]]\nname = "Bad Name"\n[[vms]]\nname = "ok"\nvcpus = -1\n'
        '[[runs]]\nworkload = "page-touch"\nvm = "ok"\n[[runs]]\nworkload = "page-touch"\n'
        'vm = "ok"\nparams = { mibb = 1 }\n'
    )
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code == 2, result.output
    assert "vms[0].name" in result.output and "vms[1].vcpus" in result.output
    assert "runs[1].params.mibb" in result.output and "did you mean 'mib'" in result.output


def test_set_typos_get_suggestions() -> None:
    result = CliRunner().invoke(
        main, ["validate", "--set", "page-tuch.mib=8", "--set", "page-touch.mibb=8"]
    )
    assert result.exit_code == 2, result.output
    assert "no workload 'page-tuch' (did you mean 'page-touch'?)" in result.output
    assert "'mibb' for workload 'page-touch' (did you mean 'mib'?)" in result.output


# --- cache prune --dry-run ---------------------------------------------------------------


@pytest.mark.parametrize("exists", [False, True])
def test_cache_prune_dry_run_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exists: bool
) -> None:
    cache = tmp_path / "cache"
    if exists:
        cache.mkdir()
    monkeypatch.setenv("HARNESS_CACHE", str(cache))
    result = CliRunner().invoke(main, ["cache", "prune", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "would free 0.0 MB" in result.output
    assert sorted(tmp_path.rglob("*")) == ([cache] if exists else [])


# --- suites say what they run ------------------------------------------------------------

COUNT_WORDS = {"one": 1, "a single": 1, "two": 2, "three": 3, "four": 4}


@pytest.mark.parametrize("path", sorted(SUITES_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_suite_descriptions_match_their_vms(path: Path) -> None:
    spec = load_suite(path).spec
    text = spec.description
    sizes = {(vm.vcpus, vm.memory_mib) for vm in spec.vms}
    for vcpus, gib in re.findall(r"(\d+)-vCPU (\d+) GiB", text):
        assert (int(vcpus), int(gib) * 1024) in sizes, f"{path.name}: {text!r}"
    m = re.search(r"\b(one|a single|two|three|four)\b[\w\s-]*?\bguests?\b", text)
    if m:
        assert COUNT_WORDS[m.group(1)] == len(spec.vms), f"{path.name}: {text!r}"


def test_set_mistakes_are_reported_beside_the_suites_own(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[[vms]]\nname = "g"\nvcpus = 0\n'
                   '[[runs]]\nworkload = "page-touch"\nvm = "g"\n')
    result = CliRunner().invoke(main, ["validate", str(bad), "--set", "page-touch.mib=0"])
    assert result.exit_code == 2, result.output
    assert "vms[0].vcpus" in result.output
    assert "--set page-touch.mib=0" in result.output


def test_a_workload_files_mistakes_come_in_one_pass(tmp_path: Path) -> None:
    """Field errors no longer hide the workload's own checks (placeholders, guest fit)."""
    (tmp_path / "bad-w.toml").write_text(
        'name = "bad-w"\nguest = "linux"\ndescripton = "x"\n'
        '[[phases]]\nname = "p"\ncommand = "run {mib}"\ntimeout_s = -1\n'
    )
    suite = tmp_path / "s.toml"
    suite.write_text('name = "s"\nworkload_dirs = ["."]\n[[vms]]\nname = "g"\n'
                     '[[runs]]\nworkload = "bad-w"\nvm = "g"\n')
    result = CliRunner().invoke(main, ["validate", str(suite)])
    assert result.exit_code == 2, result.output
    assert "phases[0].timeout_s" in result.output
    assert "descripton" in result.output and "did you mean 'description'" in result.output
    assert "commands use ['mib'] but [params] does not define them" in result.output
