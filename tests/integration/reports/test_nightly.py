"""ci/nightly/run end to end on the micro KVM suite (seconds a night), twice.

The first night has no baseline (exit 0, said in compare.md); the second is
compared with the first, taken from the history: its exit status is exactly
`harness compare`'s on the same two files, and its artifacts are all there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.paths import SUITES_DIR

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


def nightly(tmp_path: Path, night: int) -> tuple[int, Path, str]:
    out = tmp_path / f"out{night}"
    summary = tmp_path / f"summary{night}.md"
    env = {
        **os.environ,
        "HARNESS": str(Path(sys.executable).with_name("harness")),
        "NIGHTLY_SKIP_BOOTSTRAP": "1",  # the test host is prepared; bootstrap is apt-get
        "NIGHTLY_RESULTS": str(tmp_path / "results"),
        "NIGHTLY_OUT": str(out),
        "HARNESS_HISTORY_DB": f"sqlite:///{tmp_path / 'history.sqlite'}",
        "GITHUB_STEP_SUMMARY": str(summary),
    }
    proc = subprocess.run([str(ROOT / "ci" / "nightly" / "run"),
                           str(SUITES_DIR / "micro-kvm.toml")], env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    return proc.returncode, out, proc.stderr


def test_two_nights(tmp_path: Path) -> None:
    status, out1, log = nightly(tmp_path, 1)
    assert status == 0, log[-3000:]
    (first,) = out1.glob("*.json")
    assert "no baseline" in (out1 / "compare.md").read_text()
    assert (out1 / "report.html").stat().st_size > 0 and list((out1 / "png").glob("*.png"))

    status, out2, log = nightly(tmp_path, 2)
    (second,) = out2.glob("*.json")
    assert f"baseline: {(tmp_path / 'results' / first.name).resolve()}" in log, log[-3000:]
    direct = subprocess.run(
        [sys.executable, "-m", "harness.cli", "compare", str(first), str(second), "--format",
         "md"], capture_output=True, text=True, timeout=300, check=False,
    )
    assert status == direct.returncode, log[-3000:]
    md = (out2 / "compare.md").read_text()
    assert md == direct.stdout
    assert (tmp_path / "summary2.md").read_text() == md  # the GitHub job summary
    html = (out2 / "report.html").read_text()
    assert 'id="comparison"' in html and json.loads(second.read_text())["run_id"] in html
    assert list((out2 / "png").glob("*.png"))
