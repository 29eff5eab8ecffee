"""`harness plan`: boots and repetitions a wanted effect needs, from a pilot result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner

from harness.analysis import plan, stats
from harness.analysis.figures import phase_figures
from harness.analysis.resultset import load_side
from harness.cli import main
from harness.results import load
from tests.unit.test_compare import save
from tests.unit.test_compare_verdicts import booted


def pilot(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(11)
    boots = [list(1000 * np.exp(rng.normal(0, 0.04) + rng.normal(0, 0.01, 2)))
             for _ in range(5)]
    return save(tmp_path, booted("pilot", [[float(v) for v in b] for b in boots]))


def test_plan_uses_the_pilots_components_at_holms_strictest_level(tmp_path: Path) -> None:
    files = pilot(tmp_path)
    p = plan.plan(load_side("pilot", files), 0.05, pattern="metric.*")
    [fig] = p.figures
    comp = stats.variance_components([[list(map(float, b)) for b in _boots(files)]])
    assert fig.between_sd == comp.between_sd and fig.within_sd == comp.within_sd
    assert p.level == 0.05  # one figure: alpha itself
    assert fig.rows == stats.plan_design(fig.between_sd, fig.within_sd, 0.05, alpha=0.05)
    everything = plan.plan(load_side("pilot", files), 0.05)
    r = load(files[0])
    names = {n for run in r.runs for ph in run.phases for n in phase_figures(ph, {}).values}
    assert everything.level == 0.05 / len(names)


def _boots(files: list[Path]) -> list[list[float]]:
    r = load(files[0])
    by: dict[str | None, list[float]] = {}
    for run in r.runs:
        by.setdefault(run.boot, []).append(run.phases[0].metrics["mib_per_s"])
    return list(by.values())


def test_plan_command_prints_boots_per_repetition_choice(tmp_path: Path) -> None:
    files = pilot(tmp_path)
    out = CliRunner().invoke(main, ["plan", str(files[0]), "--effect", "10%",
                                    "--figure", "metric.*"])
    assert out.exit_code == 0, out.output
    assert "Boots a side to find a 10% change" in out.output
    assert "1 rep/boot | 2 reps/boot | 3 reps/boot | 5 reps/boot" in out.output
    assert "metric.mib_per_s" in out.output and "5 x 2" in out.output


def test_plan_of_a_missing_file_exits_2(tmp_path: Path) -> None:
    out = CliRunner().invoke(main, ["plan", str(tmp_path / "nope.json")])
    assert out.exit_code == 2 and "nope.json" in out.output
