"""tests/conftest.py on CI: a missing prerequisite fails, a host difference skips and is listed.

Each case runs a small test file under the project's real tests/conftest.py
in a pytest subprocess, with and without CI=true.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

CASES = '''
import pytest
from conftest import host_difference_skip, prerequisite_missing, requires

pytestmark = pytest.mark.integration


def test_prerequisite() -> None:
    prerequisite_missing("nasm is not installed")


def test_host_difference() -> None:
    host_difference_skip("MMU mode ept; known answers are for pvm")


def test_bare_skip() -> None:
    pytest.skip("tracefs not mounted")


@pytest.mark.skipif(True, reason="bpftrace not installed")
def test_bare_skipif() -> None:
    pass


@pytest.mark.requires(tools=["no-such-tool-kvmh"])
def test_requires_a_tool() -> None:
    pass


@pytest.mark.requires(tracepoints=["kvm/no_such_event_kvmh"])
def test_requires_a_tracepoint() -> None:
    pass


def test_requires_another_mmu_mode() -> None:
    requires(mmu_modes=["no-such-mode"], why="the answers count emulated instructions")
'''

UNIT = '''
import pytest


def test_unit_skip() -> None:
    pytest.skip("an optional extra is not installed")
'''


def run_cases(tmp_path: Path, ci: bool) -> tuple[dict[str, str], str]:
    """Run the cases; the outcome per test name (from JUnit XML) and the terminal output."""
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_cases.py").write_text(CASES)
    (tmp_path / "test_unit.py").write_text(UNIT)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    junit = tmp_path / "junit.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "-c", "/dev/null", f"--junitxml={junit}", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    outcomes: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[case.attrib["name"]] = kinds[0].upper() if kinds else "PASSED"
    return outcomes, proc.stdout


def host_difference_section(out: str) -> str:
    """The lines of the summary's "skipped: host differences" section."""
    lines: list[str] = []
    for line in out.split("skipped: host differences", 1)[1].splitlines()[1:]:
        if line.startswith("="):
            break
        lines.append(line)
    return "\n".join(lines)


@pytest.mark.skipif(os.geteuid() != 0, reason="the cases are integration tests: they need root")
def test_on_ci_only_host_differences_skip_and_they_are_listed(tmp_path: Path) -> None:
    outcomes, out = run_cases(tmp_path, ci=True)
    assert outcomes == {
        "test_prerequisite": "FAILURE",
        "test_host_difference": "SKIPPED",
        "test_bare_skip": "FAILURE",
        "test_bare_skipif": "ERROR",
        "test_requires_a_tool": "ERROR",
        "test_requires_a_tracepoint": "SKIPPED",
        "test_requires_another_mmu_mode": "SKIPPED",
        "test_unit_skip": "SKIPPED",
    }, out
    assert "./bootstrap" in out and "nasm is not installed" in out
    section = host_difference_section(out)
    assert "test_host_difference: MMU mode ept; known answers are for pvm" in section
    assert "this kernel has no tracepoint kvm:no_such_event_kvmh" in section
    assert "known answers are for no-such-mode (the answers count emulated" in section
    assert "an optional extra" not in section


@pytest.mark.skipif(os.geteuid() != 0, reason="the cases are integration tests: they need root")
def test_off_ci_prerequisites_skip_with_their_reason(tmp_path: Path) -> None:
    outcomes, out = run_cases(tmp_path, ci=False)
    assert set(outcomes.values()) == {"SKIPPED"}, out
    assert len(outcomes) == 8, out
    assert "prerequisite missing: no-such-tool-kvmh is not installed" in out
    section = host_difference_section(out)
    assert "nasm" not in section and "tracefs not mounted" not in section
