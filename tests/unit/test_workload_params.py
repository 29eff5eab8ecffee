"""Typed workload parameters, --set overrides, every error at once, the shipped catalogue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import harness.spec as spec_module
from harness.cli import main
from harness.paths import WORKLOADS_DIR
from harness.spec import ParamSpec, SpecError, available_workloads, load_suite, load_workload

WORKLOAD = """\
name = "touch"
guest = "linux"
mmu_path = "first-touch faults"

[params]
label = "x"

[params.mib]
type = "int"
default = 64
min = 2
max = 1024
multiple_of = 2
unit = "MiB"
description = "memory touched"

[params.mode]
type = "str"
default = "anon"
choices = ["anon", "tmpfs"]

[params.ratio]
type = "float"
default = 0.5
min = 0
max = 1

[[phases]]
name = "run"
command = "page-touch --mib {mib} --backing {mode} --ratio {ratio} --label {label}"
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


def write(dir_: Path, name: str, text: str) -> Path:
    path = dir_ / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A catalogue of its own: suites under tree/suites/ find tree's workloads only."""
    write(tmp_path, "touch.toml", WORKLOAD)
    monkeypatch.setattr(spec_module, "WORKLOADS_DIR", tmp_path)
    return tmp_path


def test_typed_and_untyped_params_load_with_defaults(tree: Path) -> None:
    w = load_workload(tree / "touch.toml")
    assert w.mmu_path == "first-touch faults"
    assert w.defaults() == {"label": "x", "mib": 64, "mode": "anon", "ratio": 0.5}
    assert w.params["label"].type is None and w.params["label"].kind == "str"
    assert w.params["mib"].allowed() == "an integer in 2..1024, a multiple of 2"
    assert w.params["mode"].allowed() == "one of anon, tmpfs"
    assert (
        w.render(w.phases[0], {"mib": 8})
        == "page-touch --mib 8 --backing anon --ratio 0.5 --label x"
    )


def test_suite_param_out_of_bounds_names_workload_param_range_and_line(tree: Path) -> None:
    path = write(tree, "suites/s.toml", SUITE.replace("mib = 32", "mib = 4096"))
    with pytest.raises(SpecError) as err:
        load_suite(path)
    assert err.value.field == "runs[0].params.mib"
    assert "workload 'touch' parameter 'mib'" in err.value.reason
    assert "out of range: must be an integer in 2..1024" in err.value.reason
    assert f"{path}:7: runs[0].params.mib:" in str(err.value)
    assert "give mib an integer in 2..1024" in err.value.fix


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ('{ mib = 33 }', "a multiple of 2"),
        ('{ mib = "big" }', "'big' is not an integer"),
        ('{ mode = "disk" }', "'disk' is not one of anon, tmpfs"),
        ('{ ratio = 2 }', "out of range: must be a number in 0..1"),
        ('{ nope = 1 }', "unknown parameter 'nope' for workload 'touch'"),
    ],
)
def test_bad_run_params_are_rejected(tree: Path, params: str, needle: str) -> None:
    path = write(tree, "suites/s.toml", SUITE.replace("{ mib = 32 }", params))
    with pytest.raises(SpecError, match=needle):
        load_suite(path)


def test_untyped_param_takes_any_value(tree: Path) -> None:
    suite = load_suite(write(tree, "suites/s.toml", SUITE.replace("mib = 32", 'label = "y z"')))
    w = suite.workloads["touch"]
    assert w.render(w.phases[0], suite.spec.runs[0].params).endswith("--label 'y z'")


def test_set_overrides_a_parameter_for_one_run(tree: Path) -> None:
    path = write(tree, "suites/s.toml", SUITE)
    suite = load_suite(path, ["touch.mib=128", "touch.ratio=0.25", "touch.label=run 2"])
    run = suite.spec.runs[0]
    assert run.params == {"mib": 128, "ratio": 0.25, "label": "run 2"}
    assert isinstance(run.params["mib"], int)
    # The file is unchanged: the next load without --set sees the suite's own value.
    assert load_suite(path).spec.runs[0].params == {"mib": 32}


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("touch.mib=4096", "parameter 'mib': value 4096 is out of range: must be an integer in "
         "2..1024"),
        ("touch.mib=lots", "value 'lots' is not an integer in 2..1024"),
        ("touch.mode=disk", "is not one of anon, tmpfs"),
        ("touch.gib=1", "unknown parameter 'gib' for workload 'touch'"),
        ("other.mib=1", "the suite runs no workload 'other'"),
        ("touch.mib", "expected WORKLOAD.PARAM=VALUE"),
        ("mib=3", "expected WORKLOAD.PARAM=VALUE"),
    ],
)
def test_bad_set_is_rejected_naming_workload_param_and_range(
    tree: Path, override: str, needle: str
) -> None:
    path = write(tree, "suites/s.toml", SUITE)
    with pytest.raises(SpecError) as err:
        load_suite(path, [override])
    assert needle in str(err.value)
    assert err.value.field == f"--set {override}"


def test_every_error_of_a_suite_is_reported_at_once(tree: Path) -> None:
    text = (
        SUITE.replace('name = "g"', 'name = "g"\nvcpus = 0\nmemory_mib = 8\ncolour = "red"')
    )
    path = write(tree, "suites/s.toml", text)
    with pytest.raises(SpecError) as err:
        load_suite(path)
    fields = [p.field for p in err.value.problems]
    assert fields == ["vms[0].vcpus", "vms[0].memory_mib", "vms[0].colour"]
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{path}:4: vms[0].vcpus:")
    assert lines[1].startswith(f"{path}:5: vms[0].memory_mib:")
    assert lines[2].startswith(f"{path}:6: vms[0].colour:") and "remove or rename" in lines[2]


def test_schema_errors_come_with_the_runs_param_errors(tree: Path) -> None:
    text = SUITE.replace('name = "g"', 'name = "g"\nvcpus = 0').replace("mib = 32", "mib = 3")
    path = write(tree, "suites/s.toml", text)
    with pytest.raises(SpecError) as err:
        load_suite(path)
    assert [p.field for p in err.value.problems] == ["vms[0].vcpus", "runs[0].params.mib"]


def test_every_cross_reference_error_is_reported_at_once(tree: Path) -> None:
    text = SUITE + (
        '[[runs]]\nworkload = "nope"\nvm = "g"\n'
        '[[runs]]\nworkload = "touch"\nvm = "h"\nparams = { mib = 3, mode = "disk" }\n'
    )
    path = write(tree, "suites/s.toml", text)
    with pytest.raises(SpecError) as err:
        load_suite(path)
    fields = [p.field for p in err.value.problems]
    assert fields == [
        "runs[1].workload", "runs[2].vm", "runs[2].params.mib", "runs[2].params.mode",
    ]


def test_every_bad_set_is_reported_at_once(tree: Path) -> None:
    path = write(tree, "suites/s.toml", SUITE)
    with pytest.raises(SpecError) as err:
        load_suite(path, ["touch.mib=1", "touch.mode=x", "x.y=1"])
    assert len(err.value.problems) == 3


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ('type = "int"\ndefault = 5\nmin = 10', "default 5 is out of range"),
        ('type = "int"\ndefault = 5\nmin = 10\nmax = 1', "min (10) is greater than max (1)"),
        ("default = 5\nmax = 10", "need a `type`"),
        ('type = "str"\ndefault = "a"\nmin = 1', "use choices for str"),
        ('type = "str"\ndefault = "a"\nmultiple_of = 2', "int parameters only"),
        ('type = "int"\ndefault = "five"', "default 'five' is not an integer"),
        ('type = "bool"\ndefault = 1', "params.mib.type"),
        ('type = "int"\ndefault = 1\nstep = 1', "Extra inputs"),
    ],
)
def test_bad_param_definition_names_the_field(tmp_path: Path, table: str, needle: str) -> None:
    text = WORKLOAD.replace(
        'type = "int"\ndefault = 64\nmin = 2\nmax = 1024\nmultiple_of = 2', table
    )
    path = write(tmp_path, "touch.toml", text)
    with pytest.raises(SpecError) as err:
        load_workload(path)
    assert needle in str(err.value)
    assert str(err.value).startswith(f"{path}:")
    assert err.value.field.startswith("params.mib")


def test_command_placeholder_without_param_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "touch.toml", WORKLOAD.replace("--label {label}", "--gib {gib}"))
    with pytest.raises(SpecError, match=r"commands use \['gib'\] but \[params\] does not"):
        load_workload(path)


def test_param_parse_coerces_command_line_text() -> None:
    assert ParamSpec(type="int", default=1, min=0).parse("7") == 7
    assert ParamSpec(type="float", default=1.0).parse("7") == 7.0
    assert ParamSpec(default=3).parse("9") == 9  # untyped: inferred from the default
    assert ParamSpec(default=3).parse("9M") == "9M"  # and anything else is accepted
    assert ParamSpec(type="str", default="a", choices=["a", "b"]).parse("b") == "b"
    with pytest.raises(ValueError, match="is not an integer"):
        ParamSpec(type="int", default=1).parse("1.5")


# ---------------------------------------------------------------- the shipped catalogue


LINUX = [
    w for w in (load_workload(WORKLOADS_DIR / f"{n}.toml") for n in available_workloads(
        [WORKLOADS_DIR])) if w.guest == "linux"
]


@pytest.mark.parametrize("workload", LINUX, ids=lambda w: w.name)
def test_shipped_linux_workloads_say_what_they_stress(workload: object) -> None:
    from harness.spec import WorkloadSpec

    assert isinstance(workload, WorkloadSpec)
    assert workload.description and workload.mmu_path, "add description and mmu_path"
    for phase in workload.phases:
        names = [m.name for m in phase.metrics]
        assert len(set(names)) == len(names)
    if workload.name not in ("page-touch", "stress-ng-vm"):  # the two original, untyped ones
        assert all(p.type is not None for p in workload.params.values())


def test_page_touch_variants_split_first_touch_and_retouch() -> None:
    for name in ("page-touch-4k", "page-touch-thp", "page-touch-tmpfs", "page-touch-hugetlbfs"):
        w = load_workload(WORKLOADS_DIR / f"{name}.toml")
        assert [p.name for p in w.phases] == ["first-touch", "retouch"]
        first, again = (w.render(p, {}) for p in w.phases)
        hold = first.split("--hold ")[1]
        assert again == f"page-touch --resume {hold}"
        assert {"pgfault", "thp_fault_alloc", "huge_used"} <= {m.name for m in w.phases[0].metrics}


def test_workloads_command_lists_params_and_mmu_path() -> None:
    result = CliRunner().invoke(main, ["workloads", "--json"])
    assert result.exit_code == 0, result.output
    listed = {w["name"]: w for w in json.loads(result.output)}
    assert set(listed) == set(available_workloads([WORKLOADS_DIR]))
    touch = listed["page-touch-4k"]
    assert touch["mmu_path"]
    assert touch["params"]["mib"]["type"] == "int" and touch["params"]["mib"]["min"] == 1
    assert touch["phases"][1]["name"] == "retouch"
    assert touch["phases"][0]["metrics"][0]["higher_is_better"] is True
    text = CliRunner().invoke(main, ["workloads"])
    assert text.exit_code == 0
    assert "param mib = 256 MiB: an integer in 1..65536" in text.output


def test_run_with_bad_set_fails_before_any_vm_boots(tmp_path: Path) -> None:
    # No VM can boot from a ClickException raised while loading: run_suite is never called.
    result = CliRunner().invoke(
        main, ["run", "--set", "page-touch.mib=lots", "--results-dir", str(tmp_path)]
    )
    assert result.exit_code != 0
    assert "--set page-touch.mib=lots" in result.output
    assert list(tmp_path.iterdir()) == []


def test_validate_accepts_set() -> None:
    result = CliRunner().invoke(main, ["validate", "--set", "stress-ng-vm.seconds=1"])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- balloon


BALLOON_SUITE = """\
name = "b"
[[vms]]
name = "g"
memory_mib = 512
[[runs]]
workload = "balloon"
vm = "g"
"""


def test_balloon_workload_needs_a_vm_with_a_balloon(tmp_path: Path) -> None:
    path = write(tmp_path, "b.toml", BALLOON_SUITE)
    with pytest.raises(SpecError) as err:
        load_suite(path)
    assert err.value.field == "runs[0]"
    assert "resizes guest memory (balloon_percent) but VM 'g' has no balloon" in err.value.reason
    assert "set balloon = true" in err.value.fix
    ok = load_suite(write(tmp_path, "b.toml", BALLOON_SUITE.replace("512", "512\nballoon = true")))
    shrink = ok.workloads["balloon"].phases[1]
    assert shrink.name == "shrink" and shrink.balloon_percent == 50


def test_balloon_percent_is_for_linux_guests_only(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "m.toml",
        'name = "m"\nguest = "micro"\n[[phases]]\nname = "p"\npages = 1\nballoon_percent = 50\n',
    )
    with pytest.raises(SpecError, match="balloon_percent is for linux guests only"):
        load_workload(path)


def test_balloon_vm_gets_a_virtio_balloon_and_others_none(tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    from harness.vm import configs
    from harness.vm.domain import domain_xml

    def model(balloon: bool) -> str | None:
        cfg = configs.linux_config(
            name="kvmh-x", accelerator="tcg", memory_mib=512, vcpus=1,
            kernel=tmp_path / "k", initrd=None, cmdline="", overlay=tmp_path / "o",
            console_log=tmp_path / "c", ssh_port=2222, balloon=balloon,
        )  # fmt: skip
        node = ET.fromstring(domain_xml(cfg)).find("devices/memballoon")
        return None if node is None else node.get("model")

    assert model(True) == "virtio"
    assert model(False) == "none"


def test_workloads_doc_covers_every_linux_workload() -> None:
    doc = (WORKLOADS_DIR.parent / "docs" / "WORKLOADS.md").read_text()
    missing = [w.name for w in LINUX if f"| `{w.name}`" not in doc]
    assert missing == [], f"add these to docs/WORKLOADS.md: {missing}"
