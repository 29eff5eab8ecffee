"""Suite and workload validation: good files load, bad ones name file, line, field and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

import harness.spec as spec_module
from harness.paths import SUITES_DIR, WORKLOADS_DIR
from harness.spec import SpecError, load_suite, load_workload


def write(dir_: Path, name: str, text: str) -> Path:
    path = dir_ / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


WORKLOAD = """\
name = "touch"
guest = "linux"
[params]
mib = 64
[[phases]]
name = "run"
command = "page-touch --mib {mib}"
[[phases.metrics]]
name = "rate"
regex = 'mib_per_s=([\\d.]+)'
"""

SUITE = """\
name = "s"
[[vms]]
name = "g"
[[runs]]
workload = "touch"
vm = "g"
params = { mib = 32 }
"""


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A catalogue of its own: suites under tree/suites/ find tree's workloads only."""
    write(tmp_path, "touch.toml", WORKLOAD)
    monkeypatch.setattr(spec_module, "WORKLOADS_DIR", tmp_path)
    return tmp_path


def test_shipped_suites_and_workloads_load() -> None:
    for suite in sorted(SUITES_DIR.glob("*.toml")):
        loaded = load_suite(suite)
        assert loaded.workloads, suite
    for workload in sorted(WORKLOADS_DIR.glob("*.toml")):
        assert load_workload(workload).phases


def test_suite_finds_sibling_workloads_and_renders_params(tree: Path) -> None:
    suite = load_suite(write(tree, "suites/s.toml", SUITE))
    workload = suite.workloads["touch"]
    run = suite.spec.runs[0]
    assert workload.render(workload.phases[0], run.params) == "page-touch --mib 32"
    assert suite.repetitions(run) == 1


def test_params_are_shell_quoted(tree: Path) -> None:
    workload = load_workload(tree / "touch.toml")
    assert (
        workload.render(workload.phases[0], {"mib": "1; reboot"}) == "page-touch --mib '1; reboot'"
    )


@pytest.mark.parametrize(
    ("suite_text", "field", "needle"),
    [
        (
            SUITE.replace('workload = "touch"', 'workload = "nope"'),
            "runs[0].workload",
            "unknown workload 'nope'",
        ),
        (SUITE.replace('vm = "g"', 'vm = "h"'), "runs[0].vm", "no VM named 'h'"),
        (SUITE.replace("mib = 32", "gib = 1"), "runs[0].params", "unknown parameter"),
        (SUITE.replace('name = "g"', 'name = "g"\nvcpu = 2'), "vms[0].vcpu", "Extra inputs"),
        (
            SUITE.replace('name = "g"', 'name = "g"\nmemory_mib = 8'),
            "vms[0].memory_mib",
            "greater than or equal to 16",
        ),
        (SUITE + "[trace]\nenabled = 'maybe'\n", "trace.enabled", "valid boolean"),
    ],
)
def test_bad_suite_names_file_field_and_reason(
    tree: Path, suite_text: str, field: str, needle: str
) -> None:
    path = write(tree, "suites/s.toml", suite_text)
    with pytest.raises(SpecError) as err:
        load_suite(path)
    assert err.value.path == path
    assert err.value.field.startswith(field)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_error_points_at_the_line_of_the_field(tree: Path) -> None:
    path = write(tree, "suites/s.toml", SUITE.replace('name = "g"', 'name = "g"\nvcpus = 0'))
    with pytest.raises(SpecError) as err:
        load_suite(path)
    assert f"{path}:4: vms[0].vcpus:" in str(err.value)


def test_unknown_key_gets_a_fix(tree: Path) -> None:
    path = write(tree, "suites/s.toml", SUITE.replace('name = "g"', 'name = "g"\nvcpu = 2'))
    with pytest.raises(SpecError, match="fix: remove or rename the key"):
        load_suite(path)


def test_workload_for_other_guest_kind_is_rejected(tree: Path) -> None:
    path = write(tree, "suites/s.toml", SUITE.replace('name = "g"', 'name = "g"\nimage = "micro"'))
    with pytest.raises(SpecError, match="is for linux guests but VM 'g' boots the micro image"):
        load_suite(path)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (
            ("regex = 'mib_per_s=([\\d.]+)'", "regex = 'mib_per_s=[\\d.]+'"),
            "exactly one capture group",
        ),
        (
            ("regex = 'mib_per_s=([\\d.]+)'", "regex = 'mib_per_s=(['"),
            "not a valid regular expression",
        ),
        (('command = "page-touch --mib {mib}"', "pages = 3"), "needs `command`"),
        (('guest = "linux"', 'guest = "windows95"'), "guest"),
        (('name = "touch"', 'name = "other"'), "rename the file"),
    ],
)
def test_bad_workload_is_rejected(tmp_path: Path, change: tuple[str, str], needle: str) -> None:
    path = write(tmp_path, "touch.toml", WORKLOAD.replace(*change))
    with pytest.raises(SpecError, match=needle):
        load_workload(path)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not valid TOML"):
        load_suite(write(tmp_path, "bad.toml", "name = \n"))
    with pytest.raises(SpecError, match="cannot read"):
        load_suite(tmp_path / "absent.toml")


PAIR = """\
name = "s"
[[vms]]
name = "a"
[[vms]]
name = "b"
[[vms]]
name = "c"
[[runs]]
workload = "touch"
vm = "a"
[[runs]]
workload = "touch"
vm = "b"

[[groups]]
name = "pair"
vms = ["a", "b"]
"""


def test_group_of_vms_loads(tree: Path) -> None:
    suite = load_suite(write(tree, "suites/s.toml", PAIR))
    (group,) = suite.spec.groups
    assert group.name == "pair" and group.vms == ["a", "b"]


@pytest.mark.parametrize(
    ("change", "field", "reason", "fix"),
    [
        (('vms = ["a", "b"]', 'vms = ["a"]'), "groups[0].vms", "needs at least two",
         "or remove the group"),
        (('vms = ["a", "b"]', 'vms = ["a", "x"]'), "groups[0].vms", "no VM named 'x'",
         "use names from [[vms]]: a, b, c"),
        (('vms = ["a", "b"]', 'vms = ["a", "a"]'), "groups[0].vms", "VM 'a' is listed twice",
         "define another [[vms]] entry"),
        (('vms = ["a", "b"]', 'vms = ["a", "c"]'), "groups[0].vms", "VM 'c' has no runs",
         'add a [[runs]] entry with vm = "c"'),
        (('vms = ["a", "b"]', 'vms = ["a", "b"]\n[[groups]]\nname = "two"\nvms = ["b", "a"]'),
         "groups[1].vms", "VM 'b' is already in group 'pair'", "runs in one group"),
        (('vms = ["a", "b"]', 'vms = ["a", "b"]\n[[groups]]\nname = "pair"\nvms = ["c", "a"]'),
         "groups[1].name", "group 'pair' is defined twice", "its own name"),
        (('name = "pair"', 'name = "Pair!"'), "groups[0].name", "should match pattern", ""),
        (('vms = ["a", "b"]', 'vms = ["a", "b"]\nconcurrent = true'), "groups[0].concurrent",
         "Extra inputs", "remove or rename the key"),
    ],
)
def test_bad_group_names_file_line_field_reason_and_fix(
    tree: Path, change: tuple[str, str], field: str, reason: str, fix: str
) -> None:
    path = write(tree, "suites/s.toml", PAIR.replace(*change))
    with pytest.raises(SpecError) as err:
        load_suite(path)
    assert err.value.field == field
    assert reason in err.value.reason
    assert fix in err.value.fix
    # The line of the offending group's entry, counted in the file as written.
    lines = path.read_text().splitlines()
    key = field.rsplit(".", 1)[1]
    index = int(field.split("[")[1].split("]")[0])
    header = [n for n, line in enumerate(lines) if line == "[[groups]]"][index]
    line = next(n for n in range(header, len(lines)) if lines[n].startswith(f"{key} ="))
    assert str(err.value).startswith(f"{path}:{line + 1}: {field}: ")
