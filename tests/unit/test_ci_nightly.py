"""The nightly CI files: valid against the published GitHub workflow and GitLab CI schemas.

check-jsonschema ships both schemas (``--builtin-schema``), so this needs no
network. A broken copy of each file must fail, so the check can fail.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = {
    "vendor.github-workflows": ROOT / ".github" / "workflows" / "nightly.yml",
    "vendor.gitlab-ci": ROOT / "ci" / "nightly" / "gitlab-ci.yml",
}
#: One edit per file that the schema must refuse: a misspelt key of a job.
BREAK = {
    "vendor.github-workflows": ("    steps:\n", "    step:\n"),
    "vendor.gitlab-ci": ("  script:\n", "  scripts:\n"),
}


def check(schema: str, path: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("check-jsonschema")
    cmd = [str(exe)] if exe.exists() else [shutil.which("check-jsonschema") or "check-jsonschema"]
    return subprocess.run([*cmd, "--builtin-schema", schema, str(path)], capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.parametrize("schema", sorted(FILES))
def test_workflow_is_valid(schema: str) -> None:
    out = check(schema, FILES[schema])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("schema", sorted(FILES))
def test_a_broken_copy_is_refused(schema: str, tmp_path: Path) -> None:
    old, new = BREAK[schema]
    text = FILES[schema].read_text()
    assert old in text
    broken = tmp_path / FILES[schema].name
    broken.write_text(text.replace(old, new, 1))
    out = check(schema, broken)
    assert out.returncode != 0


def test_both_run_the_same_script_on_both_runner_kinds() -> None:
    for path in FILES.values():
        text = path.read_text()
        assert "ci/nightly/run" in text and "kvm-intel" in text and "kvm-amd" in text
        assert "nightly-out/" in text


def test_run_script_parses() -> None:
    script = ROOT / "ci" / "nightly" / "run"
    assert script.stat().st_mode & 0o111
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
