"""Verdicts one can act on (issue 16): warm-ups, boots, the exit status's guarantee,
broken phases, counts from zero, what the comparison could have seen, a busy host."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.analysis import render
from harness.analysis.compare import compare
from harness.analysis.resultset import load_side
from harness.analysis.steady import steady_state_notes
from harness.host.load import HostLoad
from harness.results import RunResult, VmRecord
from tests.unit.test_compare import run_result, save


def booted(run_id: str, boots: list[list[float]], *, warm: list[float] | None = None,
           kernel: str = "6.1.0") -> RunResult:
    """One run whose VM booted len(boots) times; each boot: an optional warm-up repetition,
    then its measured throughputs."""
    values, flags, names = [], [], []
    for i, boot in enumerate(boots):
        reps = ([warm[i]] if warm else []) + boot
        values += reps
        flags += [bool(warm) and j == 0 for j in range(len(reps))]
        names += [f"vm1-b{i + 1}"] * len(reps)
    r = run_result(run_id, values, kernel=kernel)
    reps_seen: dict[str, int] = {}
    for run, flag, name in zip(r.runs, flags, names, strict=True):
        run.boot, run.warmup = name, flag
        reps_seen[name] = reps_seen.get(name, 0) + 1
        run.repetition = reps_seen[name]
    return r


def around(centre: float, n: int, rng: np.random.Generator, sd: float = 0.01) -> list[float]:
    return [float(x) for x in centre * rng.lognormal(0, sd, n)]


def test_a_halved_throughput_behind_slow_warm_ups_is_flagged(tmp_path: Path) -> None:
    """Issue 16: repetition 1 of each boot was 1.2-4x slower than repetition 2; with it
    pooled in, a halved stress-ng throughput across three runs was not flagged."""
    rng = np.random.default_rng(1)
    warm = [2150.0, 845.0, 332.0]
    base = [booted(f"b{i}", [around(4000, 2, rng)], warm=[warm[i]]) for i in range(3)]
    cand = [booted(f"c{i}", [around(2000, 2, rng)], warm=[warm[i]], kernel="6.6.0")
            for i in range(3)]
    report = compare(load_side("b", save(tmp_path, *base)), load_side("c", save(tmp_path, *cand)))
    [reg] = report.failing()
    assert reg.figure == "metric.mib_per_s" and reg.change == pytest.approx(-0.5, abs=0.03)
    assert report.exit_status == 1
    assert report.base.warmups_excluded == 3 and reg.n_base == 6 and reg.boots_base == 3
    # The same data with the warm-ups taken for samples: the halving drowns in them.
    for r in (*base, *cand):
        for run in r.runs:
            run.warmup = False
    pooled = compare(load_side("b", save(tmp_path / "p", *base)),
                     load_side("c", save(tmp_path / "q", *cand)))
    assert pooled.exit_status == 0


def test_listed_regressions_that_fail_holm_do_not_fail_the_comparison(tmp_path: Path) -> None:
    """BH lists them (q = p = 0.027 for ten equal p-values); the exit status needs Holm's
    family-wise q (10 x 0.027 = 0.27): no exit 1."""
    base_boots = [[1000.0], [1030.0], [970.0]]
    cand_boots = [[920.0], [947.6], [892.4]]  # every boot 8% lower: the same p for each
    base, cand = [], []
    for mib in range(1, 11):
        b, c = booted(f"b{mib}", base_boots), booted(f"c{mib}", cand_boots, kernel="6.6.0")
        for run in (*b.runs, *c.runs):
            run.params = {"mib": mib}
        base.append(b)
        cand.append(c)
    report = compare(load_side("b", save(tmp_path, *base)), load_side("c", save(tmp_path, *cand)))
    listed = report.by_verdict("regression")
    assert len(listed) == 10
    p = listed[0].p
    assert p is not None and 0.005 < p < 0.05
    assert all(f.q == pytest.approx(p) for f in listed)  # BH: equal p-values stay p
    assert all(f.q_fwer == pytest.approx(min(1.0, 10 * p)) and not f.gating for f in listed)
    assert report.failing() == [] and report.exit_status == 0
    assert "do not pass the family-wise gate" in render.table(report)
    holm = compare(load_side("b", save(tmp_path / "h", *base)),
                   load_side("c", save(tmp_path / "i", *cand)), correction="holm")
    assert holm.by_verdict("regression") == [] and holm.exit_status == 0


def test_a_phase_failing_on_the_candidate_only_is_a_regression_of_its_own(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(2)
    base = booted("b", [around(1000, 2, rng) for _ in range(3)])
    cand = booted("c", [around(1000, 2, rng) for _ in range(3)], kernel="6.6.0")
    cand.status = "failed"
    broken = cand.runs[1].phases[0]
    broken.status, broken.error, broken.metrics = "timeout", "no output for 600 s", {}
    report = compare(load_side("b", save(tmp_path, base)), load_side("c", save(tmp_path, cand)))
    [failure] = report.broken()
    assert (failure.candidate_failed, failure.candidate_total) == (1, 6)
    assert failure.base_failed == 0 and "timeout" in failure.how[0]
    assert report.exit_status == 1 and report.failing() == []
    assert render.headline(report).startswith("1 phase broken on the candidate")
    md = render.markdown(report)
    assert md.index("Phases that failed") < md.index("Unchanged")
    # Failing on both sides is listed, not a regression.
    base.runs[1].phases[0].status = "error"
    both = compare(load_side("b", save(tmp_path / "x", base)),
                   load_side("c", save(tmp_path / "y", cand)))
    assert both.failures[0].verdict == "failing on both" and both.exit_status == 0


def test_nothing_testable_is_no_verdict_never_exit_0(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    base = booted("b", [around(1000, 5, rng)])  # one boot: five repetitions share its noise
    cand = booted("c", [around(1000, 5, rng)], kernel="6.6.0")
    report = compare(load_side("b", save(tmp_path, base)), load_side("c", save(tmp_path, cand)))
    assert report.tested == 0 and report.exit_status == 2
    assert report.no_verdict is not None and "boot" in report.no_verdict
    # --unit repetition takes repetitions for samples (and says so in the method line).
    pooled = compare(load_side("b", save(tmp_path, base)), load_side("c", save(tmp_path, cand)),
                     unit="repetition")
    assert pooled.tested > 0 and pooled.exit_status == 0
    assert "--unit repetition" in render.method_line(pooled)


def test_counts_from_zero_are_judged_as_counts(tmp_path: Path) -> None:
    """0 events on every base repetition, 1 on every candidate one: no regression (p 0.25
    with 3 a side); 0 against about 100: a regression, its change "new"."""
    def with_exits(run_id: str, n: list[int], kernel: str) -> RunResult:
        r = run_result(run_id, [1000.0, 1001.0, 999.0], faults=[500, 500, 500], kernel=kernel)
        for run, k in zip(r.runs, n, strict=True):
            trace = run.phases[0].trace
            assert trace is not None
            if k:
                trace.exits["HLT"] = k
        return r

    report = compare(load_side("b", save(tmp_path, with_exits("b", [0, 0, 0], "6.1"))),
                     load_side("c", save(tmp_path, with_exits("c", [1, 1, 1], "6.6"))))
    hlt = next(f for f in report.figures if f.figure == "exits.HLT")
    assert hlt.change is None and hlt.p == pytest.approx(0.25) and hlt.verdict == "no change"
    assert report.exit_status == 0
    many = compare(load_side("b", save(tmp_path, with_exits("b", [0, 0, 0], "6.1"))),
                   load_side("c", save(tmp_path / "m", with_exits("c2", [100, 97, 103], "6.6"))))
    hlt = next(f for f in many.figures if f.figure == "exits.HLT")
    assert hlt.verdict == "regression" and hlt.gating and many.exit_status == 1
    assert "new" in render.table(many)


def test_unchanged_says_within_how_much(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    base = booted("b", [around(1000, 2, rng, 0.02) for _ in range(4)])
    cand = booted("c", [around(1000, 2, rng, 0.02) for _ in range(4)], kernel="6.6.0")
    report = compare(load_side("b", save(tmp_path, base)), load_side("c", save(tmp_path, cand)))
    fig = next(f for f in report.figures if f.figure == "metric.mib_per_s")
    assert fig.verdict == "no change" and fig.mde is not None and fig.mde >= 0.05
    assert fig.between_boot_sd is not None and fig.within_boot_sd is not None
    assert "Unchanged: " in render.table(report) and "within ±" in render.table(report)
    assert f"±{fig.mde * 100:.1f}%" in render.table(report)


def test_a_drift_inside_boots_is_marked_not_steady(tmp_path: Path) -> None:
    drifting = [[300.0, 400.0, 440.0], [280.0, 390.0, 430.0], [310.0, 405.0, 445.0]]
    base = booted("b", drifting)
    cand = booted("c", drifting, kernel="6.6.0")
    report = compare(load_side("b", save(tmp_path, base)), load_side("c", save(tmp_path, cand)))
    fig = next(f for f in report.figures if f.figure == "metric.mib_per_s")
    assert fig.not_steady is not None and "per repetition" in fig.not_steady
    [note] = [n for n in steady_state_notes(base) if "mib_per_s" in n]
    assert "not at steady state" in note and "vm1/touch" in note


def test_a_figure_measured_once_a_boot_is_steady_and_a_run_needs_no_scipy() -> None:
    # One measured repetition (after a warm-up that drifts far): nothing to fit.
    assert steady_state_notes(booted("one", [[300.0]], warm=[10.0])) == []
    # So `harness run` imports no scipy (about a second of every run) until a figure has two.
    assert steady_state_notes(booted("two", [[300.0], [30.0]])) == []  # one a boot
    code = "import sys, harness.run; assert 'scipy' not in sys.modules, 'scipy loaded'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_busy_host_is_a_warning_not_unfair(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    base = booted("b", [around(1000, 2, rng) for _ in range(3)])
    cand = booted("c", [around(1000, 2, rng) for _ in range(3)])
    base.host_load = HostLoad(cpus=2, loadavg_start=[0.1, 0.1, 0.1], other_cpu_share=0.02)
    cand.host_load = HostLoad(cpus=2, loadavg_start=[1.0, 1.0, 1.0], other_cpu_share=0.48,
                              busy=True, other_vms=["pid 9: qemu-system-x86"])
    report = compare(load_side("b", save(tmp_path, base)), load_side("c", save(tmp_path, cand)))
    assert report.unfair == [] and report.exit_status == 0
    assert any("candidate: 1 of 1 run(s) measured on a busy host" in w and "48%" in w
               for w in report.warnings)
    assert any("other VM" in w for w in report.warnings)
    assert "WARNING: candidate" in render.table(report)


def test_a_paging_suite_against_itself_is_never_unfair(tmp_path: Path) -> None:
    """Issue 22 item 7: each K builds its own ROM, so one run holds several images of one
    VM on purpose; compared per workload and parameters, an A/A is fair."""
    def paging(run_id: str) -> RunResult:
        r = run_result(run_id, [1.0] * 4)
        proto = r.vms[0]
        r.vms = []
        for i, k in enumerate((2, 2, 5, 5)):
            run = r.runs[i]
            run.params, run.boot = {"address_spaces": k}, f"paging-{i + 1}"
            r.vms.append(VmRecord(**{**proto.model_dump(), "boot": run.boot, "image": "paging",
                                     "image_recipe": f"recipe-K{k}"}))
        return r

    report = compare(load_side("b", save(tmp_path, paging("a1"))),
                     load_side("c", save(tmp_path, paging("a2"))))
    assert report.unfair == [] and report.exit_status == 0
    # A different ROM for the same K is still unfair.
    other = paging("a3")
    other.vms[0].image_recipe = other.vms[1].image_recipe = "recipe-K2-changed"
    unfair = compare(load_side("b", save(tmp_path, paging("a1"))),
                     load_side("c", save(tmp_path, other)))
    assert [c.field for c in unfair.unfair] == ["vm vm1: image for touch[address_spaces=2]"]


def test_labels_carry_parameters(tmp_path: Path) -> None:
    r = run_result("p", [1.0, 1.1])
    assert "touch[mib=64] vm1/touch" in {f.phase.label() for f in compare(
        load_side("b", save(tmp_path, r)), load_side("c", save(tmp_path, r)),
        unit="repetition").figures}

