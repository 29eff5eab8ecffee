"""`harness report` pages of real results, opened in a real headless chromium.

Each page must load with no console error and no failed resource, every plot
must decode to a non-empty image, the page must need no network, and a
screenshot is kept in the artifacts directory (HARNESS_TEST_ARTIFACTS).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.results import load
from tests.integration.reports.real_results import ARTIFACTS

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium"),
]

#: Put first in <head> of a copy of the page: records errors, then on load writes what
#: every image decoded to into the DOM, which --dump-dom prints.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(
  e.message || ('failed to load ' + (e.target && (e.target.src || e.target.href)))), true);
for (const level of ['error', 'warn']) {
  const orig = console[level];
  console[level] = (...a) => { window.__errors.push(level + ': ' + a.join(' ')); orig(...a); };
}
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const out = document.createElement('pre');
  out.id = '__check';
  out.textContent = JSON.stringify({
    images: imgs.map(i => [i.dataset.plot, i.complete, i.naturalWidth, i.naturalHeight]),
    errors: window.__errors,
    text: document.body.innerText.slice(0, 20000),
  });
  document.body.appendChild(out);
});
</script>"""

CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0"]


def report(tmp_path: Path, name: str, results: list[Path], *extra: str) -> Path:
    html = tmp_path / f"{name}.html"
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "report", *map(str, results), "--html", str(html),
         "--png", str(tmp_path / f"{name}-png"), *extra],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return html


def open_in_chromium(html: Path, name: str) -> dict[str, Any]:
    """Load the page, check it, keep a screenshot; returns what the page reported."""
    text = html.read_text()
    # Self-contained: nothing fetched from anywhere (plots are data: URIs, style inline).
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", text), "external reference"
    probed = html.with_name(f"{html.stem}-probed.html")
    probed.write_text(text.replace("<head>", "<head>" + PROBE, 1))
    proc = subprocess.run(
        [*CHROMIUM, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r'<pre id="__check">(.*?)</pre>', proc.stdout, re.S)
    assert m is not None, "the page's load handler did not run"
    import html as htmllib

    check: dict[str, Any] = json.loads(htmllib.unescape(m.group(1)))
    assert check["errors"] == []
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert console == []
    assert check["images"], "no plot in the page"
    for plot, complete, width, height in check["images"]:
        assert complete and width > 0 and height > 0, plot
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"report-{name}.png"
    shot.unlink(missing_ok=True)
    subprocess.run(
        [*CHROMIUM, "--window-size=1300,3000", f"--screenshot={shot}", html.as_uri()],
        capture_output=True, timeout=120, check=True,
    )
    assert shot.stat().st_size > 10_000
    shutil.copy(html, ARTIFACTS / f"report-{name}.html")
    return check


def test_micro_kvm_report(tmp_path: Path, micro_results: tuple[Path, Path]) -> None:
    html = report(tmp_path, "micro", [micro_results[0]])
    check = open_in_chromium(html, "micro")
    result = load(micro_results[0])
    assert f"{result.run_id}: suite micro-kvm" in check["text"]
    assert "status: complete" in check["text"]
    # Traced counts are shown per repetition as the tracer recorded them.
    phase = result.runs[0].phases[0]
    assert phase.trace is not None
    reps = " / ".join(f"{r.phases[0].trace.emulated_insns:,}" for r in result.runs
                      if r.phases and r.phases[0].trace)
    assert reps in check["text"]
    assert "guest-marker" in check["text"]
    pngs = list((tmp_path / "micro-png").glob("*.png"))
    assert len(pngs) == len(check["images"])


def test_paging_report_has_call_paths(tmp_path: Path, paging_result: Path) -> None:
    html = report(tmp_path, "paging", [paging_result])
    check = open_in_chromium(html, "paging")
    assert "Call paths" in check["text"]
    assert any(p and "stacks" in p and "kvm-mmu-get-page" in p for p, *_ in check["images"])
    # The CR3 note of this host is said, not a bare 0.
    assert "CR3 writes: this host's KVM" in check["text"] or "kvm_cr" in check["text"]


def test_tcg_report_says_no_kvm_events(tmp_path: Path, tcg_result: Path) -> None:
    html = report(tmp_path, "tcg", [tcg_result])
    check = open_in_chromium(html, "tcg")
    assert all(v.accelerator == "tcg" for v in load(tcg_result).vms)
    assert "no KVM events: TCG" in check["text"]
    assert "exits by reason" not in check["text"]
    # The warm-up is shown, marked, and left out of the median (as compare does).
    assert "#1 (warm-up): ok" in check["text"]
    assert any(p and p.endswith("-metrics") for p, *_ in check["images"])


def test_comparison_report(tmp_path: Path, micro_results: tuple[Path, Path]) -> None:
    base, candidate = micro_results
    html = report(tmp_path, "compare", [candidate], "--compare", str(base))
    check = open_in_chromium(html, "compare")
    # The verdict is harness compare's, word for word.
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "compare", str(base), str(candidate),
         "--format", "md"], capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode in (0, 1, 2), proc.stderr
    headline = proc.stdout.splitlines()[0].removeprefix("### harness compare: ")
    assert headline in check["text"]
    assert f"harness compare exit status {proc.returncode}" in check["text"]


def test_killed_run_renders_with_its_status_on_top(tmp_path: Path, killed_result: Path) -> None:
    html = report(tmp_path, "killed", [killed_result])
    check = open_in_chromium(html, "killed")
    assert "KILLED" in check["text"].split("\n", 6)[3] or "KILLED" in check["text"][:600]
    assert "the harness process was SIGKILLed (by the test)" in check["text"]


def test_exits_and_faults_as_stacked_bars(tmp_path: Path,
                                          micro_results: tuple[Path, Path]) -> None:
    # Double: kvm_exit and kvm_page_fault never fire on this host's PVM KVM, so the
    # real micro result gets exit and fault counts written into its first phase.
    data = json.loads(micro_results[0].read_text())
    for run in data["runs"]:
        trace = run["phases"][0]["trace"]
        trace["exits"] = {"EPT_VIOLATION": 700, "IO_INSTRUCTION": 5, "CPUID": 2}
        trace["mmu_faults"] = {"ept_violation": 700}
    data["run_id"] += "-with-exits"
    path = tmp_path / "with-exits.json"
    path.write_text(json.dumps(data))
    html = report(tmp_path, "exits", [path])
    check = open_in_chromium(html, "exits")
    plotted = [p for p, *_ in check["images"]]
    assert any(p.endswith("-exits") for p in plotted)
    assert any(p.endswith("-mmu-faults") for p in plotted)
    assert f"exits by reason, total over {len(data['runs'])} repetition(s)" in html.read_text()


def test_result_of_a_newer_schema_is_bad_input(tmp_path: Path,
                                               micro_results: tuple[Path, Path]) -> None:
    data = json.loads(micro_results[0].read_text())
    data["schema_version"] = 99
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(data))
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "report", str(newer), "--html",
         str(tmp_path / "x.html")], capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert f"{newer}: schema_version 99" in proc.stderr and "fix:" in proc.stderr
    assert not (tmp_path / "x.html").exists()
