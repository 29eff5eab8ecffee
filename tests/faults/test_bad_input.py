"""Bad input at every door of the real CLI: a clear error naming file, field and fix,
exit status 2, and nothing started (no domain, run directory, bpftrace or result).

Every command that reads a suite (run, validate, vm xml, host plan) gets each
broken suite; every command that reads result files (compare, stacks) gets
each broken result. The reaper of ``harness run`` reads the result file of a
dead run too: a broken one there must not stop the next run. Unit tests of
the same checks (tests/unit/test_spec.py, test_cli.py, test_results.py) call
the functions; these go through the installed entry point in a subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.paths import WORKLOADS_DIR
from tests.faults.helpers_a import (
    assert_nothing_left,
    nothing_left_behind_by_fault,  # noqa: F401  (fair on a shared host; see helpers_a)
    only_result,
    private_cache,
    run_cli,
)

pytestmark = pytest.mark.integration

GOOD_SUITE = """\
name = "bad-input"
repetitions = 1

[[vms]]
name = "micro"
image = "{image}"
vcpus = {vcpus}
memory_mib = 16
accelerator = "kvm"

[[runs]]
workload = "{workload}"
vm = "micro"
"""

#: Workload file next to the suite (found because the suite names its own directory).
BAD_WORKLOAD = """\
name = "broken-touch"
description = "a micro workload whose page count is not a number"
guest = "micro"

[[phases]]
name = "touch"
pages = "many"
"""

# (id, suite text, extra files, what the message must name)
SUITES: list[tuple[str, str, dict[str, str], list[str]]] = [
    (
        "toml-syntax",
        GOOD_SUITE.format(image="micro", vcpus=1, workload="micro-touch").replace(
            "[[runs]]", "[[runs]"
        ),
        {},
        ["suite.toml", "not valid TOML", "line 11", "fix: fix the TOML syntax"],
    ),
    (
        "field-out-of-range",
        GOOD_SUITE.format(image="micro", vcpus=0, workload="micro-touch"),
        {},
        ["suite.toml:7", "vms[0].vcpus", "greater than or equal to 1"],
    ),
    (
        "missing-image",
        GOOD_SUITE.format(image="windows-11", vcpus=1, workload="micro-touch"),
        {},
        ["suite.toml:6", "vms[0].image", "'linux', 'micro', 'paging', 'windows' or 'cloud'"],
    ),
    (
        "unknown-workload",
        GOOD_SUITE.format(image="micro", vcpus=1, workload="no-such-workload"),
        {},
        [
            "suite.toml", "runs[0].workload", "unknown workload 'no-such-workload'",
            "fix: use one of",
        ],
    ),
    (
        "malformed-workload",
        GOOD_SUITE.format(image="micro", vcpus=1, workload="broken-touch").replace(
            "repetitions = 1", 'repetitions = 1\nworkload_dirs = ["."]'
        ),
        {"broken-touch.toml": BAD_WORKLOAD},
        ["broken-touch.toml", "phases[0].pages", "integer"],
    ),
    (
        "workload-toml-syntax",
        GOOD_SUITE.format(image="micro", vcpus=1, workload="broken-touch").replace(
            "repetitions = 1", 'repetitions = 1\nworkload_dirs = ["."]'
        ),
        {"broken-touch.toml": 'name = "broken-touch\n'},
        ["broken-touch.toml", "not valid TOML", "fix: fix the TOML syntax"],
    ),
]

SUITE_COMMANDS = [("run",), ("validate",), ("vm", "xml"), ("host", "plan")]


@pytest.fixture
def cache() -> Iterator[Path]:
    with private_cache(share_images=False) as root:
        yield root


def assert_nothing_started(cache: Path, results: Path) -> None:
    assert not (cache / "runs").exists() or not any((cache / "runs").iterdir())
    assert not results.exists(), "no result file may be written for input that is refused"
    # The autouse fixture checks that no domain and no bpftrace appeared.


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("case", "text", "files", "names"), SUITES, ids=[s[0] for s in SUITES])
def test_bad_suite_is_refused_by_every_command(
    tmp_path: Path, cache: Path, case: str, text: str, files: dict[str, str], names: list[str]
) -> None:
    suite = tmp_path / "suite.toml"
    suite.write_text(text)
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    results = tmp_path / "results"
    for command in SUITE_COMMANDS:
        extra = ("--results-dir", str(results)) if command == ("run",) else ()
        proc = run_cli(*command, str(suite), *extra, cache=cache, timeout=60)
        assert proc.returncode == 2, (command, proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        for needle in names:
            assert needle in proc.stderr, (command, needle, proc.stderr)
    assert_nothing_started(cache, results)


@pytest.mark.timeout(60)
def test_bad_override_is_refused_before_anything_starts(tmp_path: Path, cache: Path) -> None:
    suite = tmp_path / "suite.toml"
    suite.write_text(GOOD_SUITE.format(image="micro", vcpus=1, workload="micro-touch"))
    results = tmp_path / "results"
    proc = run_cli(
        "run", str(suite), "--results-dir", str(results), "--set", "micro-touch.nope=1",
        cache=cache, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--set micro-touch.nope=1" in proc.stderr or "nope" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_nothing_started(cache, results)


def _a_result() -> dict[str, object]:
    """A complete, valid result document (the unit tests' example) to break."""
    from tests.unit.test_results import result

    data: dict[str, object] = json.loads(result("complete").model_dump_json())
    return data


# (id, how to make the broken file from a good document, what the message must say)
BROKEN_RESULTS = [
    ("truncated", lambda d: json.dumps(d, indent=2)[:700], "not a readable result file"),
    ("empty", lambda d: "", "not a readable result file"),
    ("not-an-object", lambda d: "[1, 2, 3]\n", "schema_version None"),
    (
        "newer-schema",
        lambda d: json.dumps({**d, "schema_version": 99}),
        "schema_version 99, this harness reads 1 (fix: use the harness version that wrote it)",
    ),
    (
        "wrong-shape",
        lambda d: json.dumps({k: v for k, v in d.items() if k != "status"}),
        "status: Field required",
    ),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("case", "make", "says"), BROKEN_RESULTS, ids=[b[0] for b in BROKEN_RESULTS]
)
def test_broken_result_is_refused_by_every_reader(
    tmp_path: Path, case: str, make: object, says: str
) -> None:
    assert callable(make)
    bad = tmp_path / "broken.json"
    bad.write_text(make(_a_result()))
    good_dir = tmp_path / "good"
    good_dir.mkdir()
    readers = [
        ("compare", str(bad), str(bad)),
        ("stacks", str(bad)),
    ]
    (good_dir / "ok.json").write_text(json.dumps(_a_result()))
    for argv in readers:
        proc = run_cli(*argv, timeout=60)
        assert proc.returncode == 2, (argv, proc.returncode, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert str(bad) in proc.stderr and says in proc.stderr, (argv, proc.stderr)
    # A directory holding it: a file that is no result document at all (empty, a list) is
    # not taken for one, and then the directory has none; one that is, is named.
    only_bad = tmp_path / "only-bad"
    only_bad.mkdir()
    (only_bad / bad.name).write_text(bad.read_text())
    proc = run_cli("compare", str(only_bad), str(good_dir), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert (str(only_bad / bad.name) in proc.stderr and says in proc.stderr) or (
        f"{only_bad}: no result files" in proc.stderr
    ), proc.stderr


MICRO1 = GOOD_SUITE.format(image="micro", vcpus=1, workload="micro-touch") + """
[trace]
enabled = true
probes = ["default"]
"""


@pytest.mark.timeout(120)
def test_reaper_leaves_a_broken_result_alone_and_the_run_goes_on(
    tmp_path: Path, cache: Path
) -> None:
    """A dead run's directory names a result file that is truncated: the next run reaps the
    directory, leaves the file as it is (it cannot be read, so it is not rewritten), and
    succeeds."""
    broken = tmp_path / "old" / "dead.json"
    broken.parent.mkdir()
    text = json.dumps(_a_result(), indent=2)[:500]
    broken.write_text(text)
    dead = cache / "runs" / "19700101T000000-dead"
    dead.mkdir(parents=True)
    (dead / "owner.pid").write_text("999999999")  # no such process
    (dead / "result.path").write_text(str(broken))
    suite = tmp_path / "micro1.toml"
    suite.write_text(MICRO1)
    results = tmp_path / "results"
    proc = run_cli("run", str(suite), "--results-dir", str(results), "--quiet", cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = only_result(results)
    assert data["status"] == "complete"
    assert f"reaped leftover of a killed run: run directory {dead}" in data["notes"]
    assert broken.read_text() == text, "an unreadable result file is left exactly as it was"
    assert_nothing_left(data["run_id"], cache)


@pytest.mark.timeout(60)
def test_broken_workload_file_in_the_catalogue(tmp_path: Path) -> None:
    """`harness workloads` lists the good workloads and names the broken file (exit 2).

    The catalogue is the project's workloads/ directory; this test points the real
    CLI at a copy of it with one broken file added, so the shared tree is not touched.
    """
    catalogue = tmp_path / "workloads"
    catalogue.mkdir()
    for f in WORKLOADS_DIR.glob("*.toml"):
        shutil.copy(f, catalogue / f.name)
    (catalogue / "broken-touch.toml").write_text(BAD_WORKLOAD)
    code = (
        "import sys, harness.paths as p; from pathlib import Path; "
        f"p.WORKLOADS_DIR = Path({str(catalogue)!r}); "
        "from harness.cli import main; sys.argv = ['harness', 'workloads']; main()"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "broken-touch.toml" in proc.stderr and "phases[0].pages" in proc.stderr
    assert "micro-touch (micro)" in proc.stdout  # the good ones are still listed
