"""Workload lookup stays in the catalogue and the directories a suite names (issue 17 item 9,
issue 22 item 11): never the suite's grandparent, never a path, never a suite file."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.spec import SpecError, load_suite

WORKLOAD = """\
name = "{name}"
guest = "linux"
[[phases]]
name = "run"
command = "true"
"""

SUITE = """\
name = "s"
{extra}
[[vms]]
name = "g"
[[runs]]
workload = "{workload}"
vm = "g"
"""


def suite(path: Path, workload: str, extra: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SUITE.format(workload=workload, extra=extra))
    return path


def workload(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(WORKLOAD.format(name=path.stem))
    return path


def test_the_suites_grandparent_and_own_directory_are_not_searched(tmp_path: Path) -> None:
    workload(tmp_path / "planted.toml")
    workload(tmp_path / "x" / "planted.toml")
    path = suite(tmp_path / "x" / "y" / "s.toml", "planted")
    with pytest.raises(SpecError) as err:
        load_suite(path)
    assert err.value.field == "runs[0].workload"
    assert "unknown workload 'planted'" in err.value.reason


def test_directories_the_suite_names_are_searched(tmp_path: Path) -> None:
    workload(tmp_path / "mine" / "planted.toml")
    path = suite(tmp_path / "s.toml", "planted", 'workload_dirs = ["mine"]')
    assert load_suite(path).workloads["planted"].name == "planted"


@pytest.mark.parametrize("name", ["/tmp/evil", "../evil", "sub/evil", ".."])
def test_a_path_in_workload_is_refused_with_a_fix(tmp_path: Path, name: str) -> None:
    workload(tmp_path / "evil.toml")
    path = suite(tmp_path / "d" / "s.toml", name)
    with pytest.raises(SpecError) as err:
        load_suite(path)
    assert err.value.field == "runs[0].workload"
    assert "is a path; a workload is named by its file's stem" in err.value.reason
    assert "workload_dirs" in err.value.reason


def test_an_absolute_workload_in_an_invalid_suite_is_never_read(tmp_path: Path) -> None:
    """The raw-parameter pass of an invalid suite looked the workload up before validation."""
    evil = tmp_path / "evil.toml"
    evil.write_text('name = "evil"\nguest = "linux"\n[params.n]\ntype = "int"\ndefault = 1\n'
                    'max = 2\n[[phases]]\nname = "r"\ncommand = "true"\n')
    text = SUITE.format(workload=str(tmp_path / "evil"), extra="").replace(
        'vm = "g"', 'vm = "g"\nparams = { n = 99 }')
    path = tmp_path / "d" / "s.toml"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        load_suite(path)
    assert "out of range" not in str(err.value)  # evil.toml's parameter bounds: never read


def test_a_suite_is_never_loaded_as_a_workload(tmp_path: Path) -> None:
    suites = tmp_path / "suites"
    suite(suites / "nightly.toml", "other")
    path = suite(suites / "s.toml", "nightly")
    with pytest.raises(SpecError) as err:
        load_suite(path)
    assert "unknown workload 'nightly'" in err.value.reason
    named = suite(suites / "t.toml", "nightly", 'workload_dirs = ["."]')
    with pytest.raises(SpecError) as err:
        load_suite(named)
    assert "which is a suite, not a workload" in err.value.reason


def test_a_typo_gets_the_closest_catalogue_names(tmp_path: Path) -> None:
    path = suite(tmp_path / "s.toml", "page-tuch-4k")
    with pytest.raises(SpecError) as err:
        load_suite(path)
    assert "did you mean 'page-touch-4k'" in err.value.reason
    assert "page-touch-4k" in err.value.fix


@pytest.mark.parametrize(("entry", "why"), [
    ('"/etc"', "is not a relative directory"),
    ('"nowhere"', "is not a directory"),
    ('""', "is not a relative directory"),
])
def test_bad_workload_dirs_name_the_entry(tmp_path: Path, entry: str, why: str) -> None:
    path = suite(tmp_path / "s.toml", "page-touch-4k", f"workload_dirs = [{entry}]")
    with pytest.raises(SpecError) as err:
        load_suite(path)
    found = [p for p in err.value.problems if p.field == "workload_dirs[0]"]
    assert found and why in found[0].reason, str(err.value)
