"""Host MMU configuration on this very host: what it permits is changed for real and restored.

This host allows the transparent-hugepage mode and hugetlb reservations to be
changed at run time. It does not allow KVM module parameters to change: kvm
and its PVM backend are built into the kernel and every parameter is
read-only, so the planner must say "impossible" with the command-line fix
(module reloads are covered on a test-made sysfs tree in
tests/unit/test_host_mmuconfig.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from harness.host.facts import parse_thp_mode
from harness.host.mmuconfig import (
    THP_ENABLED,
    HostConfigSpec,
    HostConfigurator,
    plan,
)
from tests.conftest import host_difference_skip

pytestmark = [pytest.mark.integration, pytest.mark.requires(root=True)]


@pytest.fixture(autouse=True)
def _thp_writable() -> None:
    # Root can write it wherever the kernel lets anyone: otherwise another kind of host.
    if not os.access("/" + THP_ENABLED, os.W_OK):
        host_difference_skip(f"/{THP_ENABLED} is not writable on this kernel")

HP = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")


def no_modprobe(argv: Sequence[str]) -> None:
    raise AssertionError(f"no module command may run on this host: {argv}")


def test_thp_mode_and_hugepages_change_for_real_and_come_back(tmp_path: Path) -> None:
    thp_file = Path("/" + THP_ENABLED)
    before_thp = parse_thp_mode(thp_file.read_text())
    before_hp = HP.read_text().strip()
    other = "never" if before_thp != "never" else "madvise"
    spec = HostConfigSpec(name="live", thp=other, hugepages_2m=int(before_hp) + 4)
    p = plan(spec)
    assert p.reload is None and not p.impossible
    conf = HostConfigurator(runner=no_modprobe, restore_file=tmp_path / "restore.json")
    with conf.applied(p) as record:
        assert parse_thp_mode(thp_file.read_text()) == other
        assert HP.read_text().strip() == str(int(before_hp) + 4)
        assert (tmp_path / "restore.json").exists()
    assert {s.key: (s.before, s.after) for s in record.settings} == {
        "thp.enabled": (before_thp, other),
        "hugepages.2048kB": (before_hp, str(int(before_hp) + 4)),
    }
    assert record.restored and record.restore_errors == []
    assert parse_thp_mode(thp_file.read_text()) == before_thp
    assert HP.read_text().strip() == before_hp
    assert not (tmp_path / "restore.json").exists()


def test_kvm_parameters_of_a_builtin_kvm_are_planned_as_impossible() -> None:
    if Path("/sys/module/kvm/initstate").exists():
        host_difference_skip("kvm is a loadable module here, not built in")
    current = Path("/sys/module/kvm/parameters/tdp_mmu").read_text().strip()
    wanted = "Y" if current == "N" else "N"
    p = plan(HostConfigSpec(name="tdp", kvm_params={"kvm.tdp_mmu": wanted}))
    (s,) = p.settings
    assert s.method == "impossible" and s.current == current
    assert f"kvm.tdp_mmu={wanted} on the kernel command line" in s.why
