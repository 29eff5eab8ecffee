"""`harness run --shard K/N`: shards cover every run exactly once; bad specs exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.shard import Shard, ShardError, parse_shard, select, units
from harness.spec import Suite, load_suite

VM = """
[[vms]]
name = "{name}"
image = "linux"
vcpus = 1
memory_mib = 512
"""


def _suite(tmp_path: Path, runs: int) -> Suite:
    text = 'name = "many"\nrepetitions = 1\n'
    text += "".join(VM.format(name=n) for n in ("solo", "a", "b"))
    for i in range(runs):
        text += f'[[runs]]\nworkload = "page-touch"\nvm = "solo"\nparams = {{ mib = {i + 1} }}\n'
    # A group is one unit: its VMs run side by side and stay together.
    text += '[[runs]]\nworkload = "page-touch"\nvm = "a"\n'
    text += '[[runs]]\nworkload = "page-touch"\nvm = "b"\n'
    text += '[[groups]]\nname = "pair"\nvms = ["a", "b"]\n'
    path = tmp_path / "many.toml"
    path.write_text(text)
    return load_suite(path)


def _key(run: object) -> str:
    return repr(run)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 12])
def test_shards_cover_every_run_exactly_once(tmp_path: Path, n: int) -> None:
    suite = _suite(tmp_path, runs=11)
    seen: list[str] = []
    for k in range(1, n + 1):
        part = select(suite, Shard(k, n))
        seen += [_key(r) for r in part.spec.runs]
        # Only the VMs and groups its runs use; a group keeps both of its members.
        assert {vm.name for vm in part.spec.vms} == {r.vm for r in part.spec.runs}
        for g in part.spec.groups:
            assert set(g.vms) <= {r.vm for r in part.spec.runs}
    assert sorted(seen) == sorted(_key(r) for r in suite.spec.runs)
    assert len(seen) == len(suite.spec.runs)


def test_shard_is_deterministic_and_keeps_groups_whole(tmp_path: Path) -> None:
    suite = _suite(tmp_path, runs=4)
    assert len(units(suite)) == 5  # four solo runs + the pair
    one = select(suite, parse_shard("2/3")).spec.runs
    again = select(_suite(tmp_path, runs=4), parse_shard(" 2 / 3 ")).spec.runs
    assert one == again
    # Units 1 and 4 (0-based) go to shard 2 of 3: solo mib=2 and the pair (a, b).
    assert [(r.vm, r.params) for r in one] == [("solo", {"mib": 2}), ("a", {}), ("b", {})]


@pytest.mark.parametrize("spec", ["4/3", "0/3", "1/0", "x", "1/3/4", "-1/3", ""])
def test_bad_shard_specs_are_refused(spec: str) -> None:
    with pytest.raises(ShardError, match="fix:"):
        parse_shard(spec)


def test_more_shards_than_units_is_refused(tmp_path: Path) -> None:
    suite = _suite(tmp_path, runs=1)
    with pytest.raises(ShardError, match=r"shard 3/3 has no runs.*at most 2 shards"):
        select(suite, Shard(3, 3))


@pytest.mark.parametrize("spec", ["4/3", "0/3"])
def test_cli_refuses_bad_shard_with_exit_2(tmp_path: Path, spec: str) -> None:
    suite = _suite(tmp_path, runs=2)
    out = CliRunner().invoke(main, ["run", str(suite.path), "--shard", spec, "--quiet"])
    assert out.exit_code == 2, out.output
    assert "--shard" in out.output and "fix:" in out.output
