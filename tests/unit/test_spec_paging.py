"""Paging-guest workloads and host configurations in suites: what loads, what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.image.paging import PagingPhase
from harness.paths import SUITES_DIR
from harness.spec import SpecError, load_suite

WORKLOAD = """\
name = "pg"
guest = "paging"
[params.address_spaces]
type = "int"
default = 5
min = 1
max = 32
[params.switches]
type = "int"
default = 100
min = 1
[[phases]]
name = "visit"
kind = "cr3"
count = "{address_spaces}"
[[phases]]
name = "cycle"
kind = "cr3"
count = "{switches}"
[[phases]]
name = "touch"
kind = "touch"
count = 64
"""

SUITE = """\
name = "s"
workload_dirs = [".."]  # pg.toml sits beside suites/
[[vms]]
name = "p"
image = "paging"
memory_mib = 16
[[runs]]
workload = "pg"
vm = "p"
params = { address_spaces = 8 }
"""


def _tree(tmp_path: Path, workload: str = WORKLOAD, suite: str = SUITE) -> Path:
    (tmp_path / "suites").mkdir()
    (tmp_path / "pg.toml").write_text(workload)
    path = tmp_path / "suites" / "s.toml"
    path.write_text(suite)
    return path


def test_paging_phases_take_parameters_and_run_overrides(tmp_path: Path) -> None:
    suite = load_suite(_tree(tmp_path))
    w = suite.workloads["pg"]
    (run,) = suite.spec.runs
    assert w.paging_phases(run.params) == (8, [
        PagingPhase("visit", "cr3", 8), PagingPhase("cycle", "cr3", 100),
        PagingPhase("touch", "touch", 64)])
    assert w.paging_phases({})[0] == 5
    assert suite.spec.host_configs == []


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        (('count = "{switches}"', 'count = "{swiches}"'), "(top level)",
         "'{swiches}' is not \"{name}\" of a parameter"),
        (('kind = "touch"\n', ""), "(top level)", "a paging workload phase needs `kind`"),
        (('count = 64', 'count = 5000'), "runs[0].params", "phases[2].count ('touch')"),
    ],
)
def test_bad_paging_workloads_name_the_field(
    tmp_path: Path, change: tuple[str, str], field: str, reason: str
) -> None:
    path = _tree(tmp_path, workload=WORKLOAD.replace(*change))
    with pytest.raises(SpecError) as err:
        load_suite(path)
    assert field in str(err.value) and reason in str(err.value)


def test_run_parameters_out_of_range_are_refused(tmp_path: Path) -> None:
    path = _tree(tmp_path, suite=SUITE.replace("address_spaces = 8", "address_spaces = 40"))
    with pytest.raises(SpecError, match=r"runs\[0\]\.params\.address_spaces.*1\.\.32"):
        load_suite(path)


def test_host_configs_load_and_bad_ones_name_the_field(tmp_path: Path) -> None:
    good = SUITE + '[[host_configs]]\nname = "shadow"\nkvm_params = { "kvm_intel.ept" = 0 }\n'
    suite = load_suite(_tree(tmp_path, suite=good))
    (cfg,) = suite.spec.host_configs
    assert cfg.kvm_params == {"kvm_intel.ept": 0}
    bad = SUITE + '[[host_configs]]\nname = "x"\nthp = "sometimes"\n'
    (tmp_path / "suites" / "s.toml").write_text(bad)
    with pytest.raises(SpecError, match=r"host_configs\[0\]\.thp"):
        load_suite(tmp_path / "suites" / "s.toml")


def test_shipped_paging_suites_cover_both_sides_of_the_root_cache() -> None:
    suite = load_suite(SUITES_DIR / "paging-kvm.toml")
    ks = {suite.workloads[r.workload].paging_phases(r.params)[0] for r in suite.spec.runs}
    assert {k for k in ks if k <= 4} and {k for k in ks if k >= 5}
