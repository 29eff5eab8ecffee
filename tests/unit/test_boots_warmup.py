"""Boots and warm-up repetitions in the plan, and CPU pinning in the domain (issue 16)."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.paths import SUITES_DIR
from harness.platform.base import with_pinning
from harness.run import plan_rounds
from harness.spec import SpecError, VmSpec, load_suite
from harness.vm.configs import linux_config
from harness.vm.domain import DomainConfig, domain_xml
from tests.unit.test_domain_xml import validate

SUITE = """\
name = "b"
boots = 3
repetitions = 2
[[vms]]
name = "lin"
[[vms]]
name = "mic"
image = "micro"
boots = 2
[[runs]]
workload = "stress-ng-vm"
vm = "lin"
[[runs]]
workload = "page-touch"
vm = "lin"
warmup = 0
[[runs]]
workload = "micro-touch"
vm = "mic"
"""


def suite_file(tmp_path: Path, text: str = SUITE) -> Path:
    path = tmp_path / "s.toml"  # its workloads come from the catalogue
    path.write_text(text)
    return path


def cfg(tmp_path: Path) -> DomainConfig:
    return linux_config(
        name="kvmh-test-pin", accelerator="tcg", memory_mib=512, vcpus=3,
        kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img", cmdline="root=/dev/vda",
        overlay=tmp_path / "o.qcow2", console_log=tmp_path / "console.log", ssh_port=40022,
    )


def test_linux_vm_boots_n_times_each_with_warmups_then_measured_repetitions() -> None:
    suite = load_suite(SUITES_DIR / "default.toml")
    rounds = plan_rounds(suite)
    assert [[p.name for p in r] for r in rounds] == [["linux-b1"], ["linux-b2"], ["linux-b3"]]
    for (plan,) in rounds:
        got = [(i.workload.name, i.repetition, i.warmup) for i in plan.items]
        assert got == [
            ("stress-ng-vm", 1, True), ("stress-ng-vm", 2, False), ("stress-ng-vm", 3, False),
            ("page-touch", 1, True), ("page-touch", 2, False), ("page-touch", 3, False),
        ]


def test_a_run_overrides_its_workloads_warmup_and_a_vm_the_suites_boots(
    tmp_path: Path,
) -> None:
    suite = load_suite(suite_file(tmp_path))
    plans = [p for r in plan_rounds(suite) for p in r]
    lin = [p for p in plans if p.vm.name == "lin"]
    mic = [p for p in plans if p.vm.name == "mic"]
    assert [p.name for p in lin] == ["lin-b1", "lin-b2", "lin-b3"]
    assert [(i.workload.name, i.warmup) for i in lin[0].items] == [
        ("stress-ng-vm", True), ("stress-ng-vm", False), ("stress-ng-vm", False),
        ("page-touch", False), ("page-touch", False),
    ]
    # The micro guest boots once per repetition: 2 boots x 2 repetitions, no warm-up.
    assert [p.name for p in mic] == ["mic-1", "mic-2", "mic-3", "mic-4"]
    assert [p.items[0].repetition for p in mic] == [1, 2, 1, 2]
    assert not any(p.items[0].warmup for p in mic)


@pytest.mark.parametrize("bad", ["boots = 0", "boots = 101"])
def test_bad_boots_are_refused_with_the_field(tmp_path: Path, bad: str) -> None:
    with pytest.raises(SpecError, match="boots"):
        load_suite(suite_file(tmp_path, SUITE.replace("boots = 3", bad)))


def test_pinning_becomes_cputune(tmp_path: Path) -> None:
    vm = VmSpec(name="v", vcpus=3, pin_vcpus=[1, 0], pin_emulator=[0])
    xml = domain_xml(with_pinning(cfg(tmp_path), vm))
    tune = ET.fromstring(xml).find("cputune")
    assert tune is not None
    assert [(p.get("vcpu"), p.get("cpuset")) for p in tune.findall("vcpupin")] == [
        ("0", "1"), ("1", "0"), ("2", "1")]
    assert tune.find("emulatorpin").get("cpuset") == "0"  # type: ignore[union-attr]
    assert validate(tmp_path, xml).returncode == 0  # libvirt's own schema
    plain = domain_xml(with_pinning(cfg(tmp_path), VmSpec(name="v")))
    assert ET.fromstring(plain).find("cputune") is None


def test_pinning_to_a_cpu_the_host_lacks_is_refused(tmp_path: Path) -> None:
    vm = VmSpec(name="v", pin_vcpus=[(os.cpu_count() or 1) + 3])
    with pytest.raises(ValueError, match=r"'v'.*CPUs 0-"):
        with_pinning(cfg(tmp_path), vm)
