"""`harness report --compare` shows compare's verdict as compare decides it.

The sides are the synthetic result files of tests/unit/synthetic_results.py
(built through the real result model, one metric): here a 20% slowdown is a
regression, which no real run on this machine produces on demand. The
browser tests (tests/integration/reports) open reports of real runs.
"""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from harness.cli import main
from tests.unit.synthetic_results import STEADY, side


def test_regression_leads_the_page_with_compare_verdict(tmp_path: Path) -> None:
    base = side(tmp_path / "a", STEADY)
    slower = side(tmp_path / "b", [v * 0.8 for v in STEADY])
    md = CliRunner().invoke(main, ["compare", str(base), str(slower), "--format", "md"])
    assert md.exit_code == 1
    headline = md.output.splitlines()[0].removeprefix("### harness compare: ")

    html = tmp_path / "r.html"
    out = CliRunner().invoke(main, ["report", str(slower), "--compare", str(base), "--html",
                                    str(html), "--png", str(tmp_path / "png")])
    assert out.exit_code == 0, out.output
    page = html.read_text()
    assert f"{headline} (harness compare exit status 1)" in page
    # Regressions come first, before the per-result sections.
    assert page.index("<h3>Regressions") < page.index('<h2 id="b-0">')
    assert re.search(r"metric\.mib_per_s.*?-20\.0%", page, re.S)
    assert 'data-plot="comparison-forest"' in page
    assert (tmp_path / "png" / "comparison-forest.png").stat().st_size > 0


def test_failed_candidate_is_rendered_with_its_status(tmp_path: Path) -> None:
    base = side(tmp_path / "a", STEADY)
    failed = side(tmp_path / "f", [1000.0])
    path = next(failed.glob("*.json"))
    path.write_text(path.read_text().replace('"status": "complete"', '"status": "failed"', 1))
    html = tmp_path / "r.html"
    out = CliRunner().invoke(main, ["report", str(path), "--compare", str(base), "--html",
                                    str(html)])
    assert out.exit_code == 0, out.output
    page = html.read_text()
    # Whatever compare makes of a failed candidate (it judges failures), the page shows it
    # and the run's status comes before anything measured.
    assert 'id="comparison"' in page
    assert "status: FAILED" in page
    assert page.index("FAILED") < page.index("Provenance")
