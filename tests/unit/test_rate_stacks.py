"""Rate-target sampled stacks (``name@Rhz``): parsing, both backends' programs, the weighted
estimator and its interval, compare's sampling test, and old result files."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from harness.analysis import callpaths
from harness.analysis.compare import _sampled, compare
from harness.analysis.figures import phase_figures
from harness.analysis.resultset import load_side
from harness.analysis.stats import sampling_test
from harness.report import html, plots
from harness.spec import SpecError, load_suite
from harness.trace import libbpf as L
from harness.trace import probes as P
from harness.trace.model import PathEstimate, PhaseTrace, ProbeStacks
from harness.trace.parse import StackMapOutput, parse_line
from harness.trace.program import ProgramError, check_program, generate, probe_id
from harness.trace.stacks import (
    effective,
    path_estimates,
    probe_stacks,
    weighted_path_estimates,
    wilson,
)
from tests.unit.test_compare import run_result, save
from tests.unit.test_sampled_stacks import EMUL, PIO, _suite
from tests.unit.test_trace_libbpf import BUILT, lb_status
from tests.unit.test_trace_program import T1, T2, fake_status, needs_bpftrace

PROBE = "kvm_emulate_insn"


# --- the entry ---------------------------------------------------------------------


def test_a_rate_entry_splits_into_probe_and_rate() -> None:
    e = P.split_stack_entry("kvm_emulate_insn@1000hz")
    assert e == (PROBE, 1, 1000) and e.sampled and str(e) == "kvm_emulate_insn@1000hz"
    assert P.split_stack_entry("kvm_emulate_insn@100000hz").rate_hz == P.MAX_STACK_RATE
    assert P.split_stack_entry("kvm_emulate_insn@1Hz").rate_hz == 1
    assert str(P.split_stack_entry("kvm_emulate_insn/61")) == "kvm_emulate_insn/61"
    assert not P.split_stack_entry(PROBE).sampled


@pytest.mark.parametrize("bad", ["kvm_emulate_insn@0hz", "kvm_emulate_insn@100001hz",
                                 "kvm_emulate_insn@hz", "kvm_emulate_insn@1000",
                                 "kvm_emulate_insn@1.5hz", "kvm_emulate_insn@-5hz",
                                 "kvm_emulate_insn@", "kvm_emulate_insn@1000khz"])
def test_a_bad_rate_names_the_entry_and_the_fix(bad: str) -> None:
    with pytest.raises(ValueError, match=r"the rate after '@' must be a whole number of stacks "
                       r"per second in 1\.\.100000 followed by 'hz'.*kvm_emulate_insn@1000hz"
                       ) as exc:
        P.split_stack_entry(bad)
    assert repr(bad) in str(exc.value)


def test_a_period_and_a_rate_in_one_entry_or_for_one_probe_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"'kvm_emulate_insn/8@100hz': give a period \('/N'\) "
                       r"or a rate \('@Rhz'\), not both, e\.g\. kvm_emulate_insn@1000hz"):
        P.split_stack_entry("kvm_emulate_insn/8@100hz")
    with pytest.raises(ValueError, match=r"kvm_emulate_insn is listed with a period and with a "
                       r"rate \(kvm_emulate_insn/61 and kvm_emulate_insn@1000hz\); list it once"):
        P.stack_sampling(["kvm_emulate_insn/61", "kvm_emulate_insn@1000hz"])
    with pytest.raises(ValueError, match="listed with rates 1000hz and 50hz"):
        P.stack_sampling(["kvm_emulate_insn@1000hz", "kvm_emulate_insn@50hz"])
    # The same entry twice is one entry; a name overrides its group.
    traced = P.select(["all"])
    got = P.stack_sampling(["stacks/8", "kvm_mmu_load@500hz", "kvm_emulate_insn@1000hz",
                            "kvm_emulate_insn@1000hz"], traced)
    assert got["kvm_mmu_load"] == ("kvm_mmu_load", 1, 500)
    assert got["kvm_mmu_get_page"] == ("kvm_mmu_get_page", 8, None)
    assert P.stack_rates(["kvm_emulate_insn@1000hz", "kvm_cpuid/3"]) == {PROBE: 1000}
    assert P.stack_periods(["kvm_emulate_insn@1000hz", "kvm_cpuid/3"]) == {
        PROBE: 1, "kvm_cpuid": 3}
    assert P.stack_entries(["kvm_emulate_insn@1000hz", "kvm_cpuid/3", "kvm_exit"]) == [
        "kvm_cpuid/3", "kvm_emulate_insn@1000hz", "kvm_exit"]


def test_suites_and_run_take_a_rate_and_refuse_a_bad_one(tmp_path: Path) -> None:
    ok = load_suite(_suite(tmp_path, '["kvm_emulate_insn@1000hz"]'))
    assert ok.spec.trace.stacks == ["kvm_emulate_insn@1000hz"]
    with pytest.raises(SpecError, match=r"stacks.*'kvm_emulate_insn@0hz'.*kvm_emulate_insn@1000hz"):
        load_suite(_suite(tmp_path, '["kvm_emulate_insn@0hz"]'))
    with pytest.raises(SpecError, match="listed with a period and with a rate"):
        load_suite(_suite(tmp_path, '["kvm_emulate_insn@1000hz", "kvm_emulate_insn/61"]'))
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(_suite(tmp_path, "[]")),
         "--stacks", "kvm_emulate_insn@1000hz,kvm_cpuid@2000", "--results-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--stacks" in proc.stderr and "'kvm_cpuid@2000'" in proc.stderr, proc.stderr
    assert "kvm_cpuid@1000hz" in proc.stderr and not list(tmp_path.glob("*.json"))


# --- the programs -------------------------------------------------------------------


def _sts() -> list[P.ProbeStatus]:
    return [fake_status("kvm_cpuid"), fake_status(PROBE), fake_status("kvm_exit")]


def test_bpftrace_program_adapts_the_period_per_cpu_and_phase() -> None:
    prog = generate(_sts(), [T1, T2], stacks=["kvm_emulate_insn@2000hz", "kvm_exit/7"])
    ident = probe_id(PROBE)
    body = [ln.strip() for ln in prog.text.splitlines()]
    at = body.index(f"$sv = @scnt[pid, cpu, {ident}, $g, $h];")
    # The exact count first, unconditionally; then one lookup and one compare per event.
    assert body[at - 1] == f"@evt[pid, tid, $g, $h, {ident}] = count();"
    assert body[at + 1:at + 6] == [
        "$n = ($sv & 0xffffffff) + 1;", "$p = $sv >> 32;", "if ($n >= $p) {",
        "$w = $p > 0 ? $p : 1;", "$k = kstack(36);"]
    sampled = body[at + 6:body.index("}", at)]
    assert sampled[:3] == [f"@stk[pid, $g, $h, {ident}, $k] = count();",
                           f"@stkw[pid, $g, $h, {ident}, $k] = sum($w);",
                           f"@stkw2[pid, $g, $h, {ident}, $k] = sum($w * $w);"]
    # 2000 stacks a second: 500,000 ns between stacks; nsecs only on sampled events.
    assert "$q = ($w + $w * 500000 / ($dt > 0 ? $dt : 1)) / 2;" in sampled
    assert f"$p = $q < 1 ? 1 : ($q > {P.MAX_STACK_PERIOD} ? {P.MAX_STACK_PERIOD} : $q);" in sampled
    assert sum("nsecs" in ln for ln in body[at:at + 25]) == 2
    assert body[body.index("}", at) + 1] == f"@scnt[pid, cpu, {ident}, $g, $h] = ($p << 32) | $n;"
    # The fixed period keeps its own code; the weight maps are dumped, the scratch is not.
    assert f"$n = @scnt[pid, cpu, {probe_id('kvm_exit')}] + 1;" in body
    assert prog.stack_rates == ((PROBE, 2000),) and prog.stack_periods == (("kvm_exit", 7),)
    assert "print(@stkw);" in prog.text and "print(@stkw2);" in prog.text
    assert "clear(@slast);" in prog.text and "clear(@scnt);" in prog.text
    with pytest.raises(ProgramError, match="listed with a period and with a rate"):
        generate(_sts(), [T1], stacks=["kvm_emulate_insn@2000hz", "kvm_emulate_insn/7"])
    with pytest.raises(ProgramError, match="whole number of stacks per second"):
        generate(_sts(), [T1], stacks=["kvm_emulate_insn@0hz"])


def test_a_fixed_period_program_has_nothing_of_the_rate_target() -> None:
    for stacks in (["kvm_emulate_insn/61"], ["kvm_emulate_insn"]):
        text = generate(_sts(), [T1], stacks=stacks).text
        assert not {"@stkw", "@slast", "$sv", "$w"} & set(text.replace(";", " ").split())
        assert "@stkw" not in text and "@slast" not in text


@needs_bpftrace
def test_bpftrace_compiles_a_rate_target_program() -> None:
    check_program(generate(_sts(), [T1, T2], stacks=["kvm_emulate_insn@1000hz",
                                                     "kvm_exit@50hz", "kvm_cpuid"]).text)


def test_libbpf_configuration_carries_the_rate() -> None:
    prog = L.generate(lb_status(), [T1], BUILT,
                      stacks=["kvm_emulate_insn@1000hz", "kvm_exit/61", "kvm_cpuid"])
    lines = prog.text.splitlines()
    assert "stack_rate kvm_emulate_insn 1000" in lines
    assert "stack kvm_exit 61" in lines and "stack kvm_cpuid" in lines
    assert prog.stack_rates == ((PROBE, 1000),) and prog.stack_periods == (("kvm_exit", 61),)
    with pytest.raises(ProgramError, match="listed with a period and with a rate"):
        L.generate(lb_status(), [T1], BUILT, stacks=["kvm_emulate_insn@1000hz",
                                                     "kvm_emulate_insn/3"])


def test_weight_maps_parse_like_the_stack_counts() -> None:
    line = ('{"type": "map", "data": {"@stkw": {'
            '"1,2,0,8,\\n    bpf_prog_x+1\\n    x86_emulate_instruction+10\\n": 600, '
            '"1,2,0,8,\\n    bpf_prog_x+9\\n    x86_emulate_instruction+10\\n": 40}}}')
    assert parse_line(line) == StackMapOutput(
        "stkw", {((1, 2, 0, 8), ("x86_emulate_instruction+10",)): 640})


# --- the estimator ------------------------------------------------------------------


@pytest.mark.parametrize("k,n,period", [(7, 10, 64), (1, 3, 61), (3, 1000, 1 << 20),
                                        (997, 1000, 9), (0, 50, 7), (50, 50, 7), (5, 17, 1)])
def test_constant_weights_give_the_fixed_period_counts_exactly(k: int, n: int, period: int) -> None:
    keff, neff = effective(period * k, period * n, period**2 * k, period**2 * n)
    assert (keff, neff) == (k, n)  # exactly: computed on integers, rounded once
    assert wilson(keff, neff) == wilson(k, n)


def test_a_hand_computed_weighted_share() -> None:
    # Weights 1 and 3 through f, 2 not: W = 6, W_f = 4, p = 2/3, sum w^2 = 10 (f), 14.
    # V = [10 (1/3)^2 + 4 (2/3)^2] / 36 = 26/324; n_eff = p(1-p)/V = 36/13, k_eff = 24/13.
    keff, neff = effective(4, 6, 10, 14)
    assert keff == pytest.approx(24 / 13, rel=1e-15) and neff == pytest.approx(36 / 13, rel=1e-15)
    (est,) = weighted_path_estimates({"f": 4}, {"f": 10}, 6, 14, 600).values()
    lo, hi = wilson(24 / 13, 36 / 13)
    assert (est.share, est.events) == pytest.approx((2 / 3, 400))
    assert (est.share_low, est.share_high) == pytest.approx((lo, hi))
    assert (est.low, est.high) == pytest.approx((lo * 600, hi * 600))
    assert (est.weight, est.weight_sq, est.effective_samples) == (4, 10, pytest.approx(36 / 13))
    # At p = 0 or 1 the linearized variance is 0: Kish's n_eff = W^2 / sum w^2.
    assert effective(0, 6, 0, 14) == (0.0, 36 / 14)
    assert effective(6, 6, 14, 14) == (36 / 14, 36 / 14)
    assert effective(0, 0, 0, 0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="weights 7 of 6"):
        effective(7, 6, 10, 14)


def _rate_stacks(samples: dict[tuple[str, ...], list[int]], events: int) -> ProbeStacks:
    """ProbeStacks of a rate target from each stack's list of sample weights."""
    counts = Counter({f: len(ws) for f, ws in samples.items()})
    w = {f: sum(ws) for f, ws in samples.items()}
    w2 = {f: sum(x * x for x in ws) for f, ws in samples.items()}
    return probe_stacks({PROBE: counts}, {PROBE: events}, depth=32, rates={PROBE: 1000},
                        weights={PROBE: w}, weights_sq={PROBE: w2})[PROBE]


def test_constant_weights_give_the_fixed_period_estimates_exactly() -> None:
    fixed = probe_stacks({PROBE: Counter({PIO: 7, EMUL: 3})}, {PROBE: 640}, depth=32,
                         periods={PROBE: 64})[PROBE]
    rate = _rate_stacks({PIO: [64] * 7, EMUL: [64] * 3}, 640)
    assert rate.paths == fixed.paths and rate.stacked == fixed.stacked == 10
    assert (rate.period, rate.rate_hz, rate.weight, rate.weight_sq) == (64, 1000, 640, 40960)
    assert rate.effective_samples == 10
    for fn, est in fixed.path_estimates.items():
        got = rate.path_estimates[fn]
        assert (got.share, got.share_low, got.share_high, got.events, got.low, got.high) == (
            est.share, est.share_low, est.share_high, est.events, est.low, est.high)
        assert got.effective_samples == 10


def test_weighted_estimates_conserve_the_event_count() -> None:
    # Periods of 1..500 (the rate changed): shares of weight, not of samples.
    rate = _rate_stacks({PIO: [500, 400, 3], EMUL: [1, 2, 2, 7, 90]}, 1100)
    assert (rate.stacked, rate.weight, rate.period) == (8, 1005, 126)
    est = rate.path_estimates
    io = est["handle_io"]
    assert io.share == pytest.approx(903 / 1005) and io.weight == 903
    # handle_io and the direct path split the events; both have x86_emulate_instruction.
    assert est["handle_io"].events + (1100 - io.events) == pytest.approx(1100)
    assert est["x86_emulate_instruction"].events == 1100
    assert est["kvm_arch_vcpu_ioctl_run"].events == 1100
    rows = {tuple(s.frames): s for s in rate.stacks}
    assert (rows[PIO].count, rows[PIO].weight, rows[PIO].weight_sq) == (3, 903, 410009)
    split = _rate_stacks({("a", "x"): [5, 9], ("a", "y"): [300], ("b", "z"): [2, 2, 2]}, 977)
    assert sum(split.path_estimates[f].events for f in "ab") == pytest.approx(977, rel=1e-12)
    assert sum(split.path_estimates[f].events for f in "xyz") == pytest.approx(977, rel=1e-12)


def test_weighted_intervals_cover_the_truth_95_percent_of_the_time() -> None:
    """2000 draws of 200 weighted samples whose periods vary 1..400 (two event rates, and
    the path's share differs between them): the 95% interval covers the event share in
    95% of them, within a binomial 99% band. Unweighted shares would be biased here."""
    rng = np.random.default_rng(21)
    draws = 2000

    def covered(share_slow: float, share_fast: float) -> tuple[bool, bool]:
        fast = rng.random(200) < 0.5  # fast event rate: long periods
        w = np.where(fast, rng.integers(100, 400, 200), rng.integers(1, 30, 200))
        share = np.where(fast, share_fast, share_slow)
        through = rng.random(200) < share
        truth = float((w * share).sum() / w.sum())
        k, n = effective(int(w[through].sum()), int(w.sum()), int((w[through] ** 2).sum()),
                         int((w**2).sum()))
        lo, hi = wilson(k, n)
        ulo, uhi = wilson(int(through.sum()), 200)
        return lo <= truth <= hi, ulo <= truth <= uhi

    for slow, fast in ((0.3, 0.3), (0.6, 0.2)):
        got = [covered(slow, fast) for _ in range(draws)]
        hits = sum(c for c, _ in got)
        band = binomtest(hits, draws).proportion_ci(0.99)
        assert band.low <= 0.95 <= band.high, (slow, fast, hits / draws)
        if slow != fast:  # the samples' own share misses the event share
            assert sum(u for _, u in got) / draws < 0.5


# --- compare -------------------------------------------------------------------------


def _trace(st: ProbeStacks) -> PhaseTrace:
    return PhaseTrace(attribution="guest-marker", markers_seen=1, marker_ns=1,
                      events_by_probe={PROBE: st.events}, events_total=st.events,
                      stacks={PROBE: st})


def _side(tmp: Path, run_id: str, st: ProbeStacks) -> list[Path]:
    r = run_result(run_id, [1000.0] * 6, reps_per_boot=2)
    for run in r.runs:
        run.phases[0].trace = _trace(st)
    return save(tmp, r)


def _fixed(pio: int, emul: int, events: int) -> ProbeStacks:
    return probe_stacks({PROBE: Counter({PIO: pio, EMUL: emul})}, {PROBE: events}, depth=32,
                        periods={PROBE: 64})[PROBE]


def test_fixed_period_paths_reach_the_sampling_test_as_before() -> None:
    """Pooled over repetitions, a fixed period's (k, n) are the samples summed, exactly."""
    r = run_result("b", [1.0] * 3)
    reps = []
    for i, run in enumerate(r.runs):
        run.phases[0].trace = _trace(_fixed(7 + i, 3, 640 + i))
        reps.append(("boot", phase_figures(run.phases[0], {})))
    name = "path.kvm_emulate_insn.handle_io"
    assert _sampled(reps, name) == (24, 33, 1923, 3)
    old = ((24, 33, 1923, 3), (18, 30, 1920, 3))  # the integers compare passed before
    new = (_sampled(reps, name), (18.0, 30.0, 1920, 3))
    assert new[0] is not None
    assert sampling_test((new[0], new[1])) == sampling_test(old)


def test_a_rate_target_with_constant_weights_compares_like_the_fixed_period(
    tmp_path: Path,
) -> None:
    fixed_b, fixed_c = _fixed(7, 3, 640), _fixed(6, 4, 640)
    rate_b = _rate_stacks({PIO: [64] * 7, EMUL: [64] * 3}, 640)
    rate_c = _rate_stacks({PIO: [64] * 6, EMUL: [64] * 4}, 640)
    name = "path.kvm_emulate_insn.handle_io"
    got = {}
    for label, (b, c) in {"fixed": (fixed_b, fixed_c), "rate": (rate_b, rate_c)}.items():
        d = tmp_path / label
        d.mkdir()
        (d / "b").mkdir()
        (d / "c").mkdir()
        report = compare(load_side("base", _side(d / "b", "b", b)),
                         load_side("candidate", _side(d / "c", "c", c)))
        fig = next(f for f in report.figures if f.figure == name)
        got[label] = (fig.p, fig.test, fig.change, fig.mde)
    assert got["rate"] == got["fixed"]
    assert got["fixed"][0] is not None and got["fixed"][0] > 0.2


def test_compare_uses_the_effective_samples_of_uneven_weights(tmp_path: Path) -> None:
    # handle_io: half the weight on the base (100 samples of 70), 60% on the candidate,
    # where that rests on one sample of period 600 beside 100 of 4: 101 samples, but
    # about 5 effective ones a repetition. Counted as 101 equal samples the shift would
    # be a finding (p ~ 0.0006); with the weights it is within chance.
    base = _rate_stacks({PIO: [70] * 50, EMUL: [70] * 50}, 7000)
    cand = _rate_stacks({PIO: [600], EMUL: [4] * 100}, 7000)
    assert cand.path_estimates["handle_io"].share == pytest.approx(0.6)
    neff = cand.path_estimates["handle_io"].effective_samples
    assert neff == pytest.approx(24.752475247524753 / 6)
    report = compare(load_side("base", _side(tmp_path, "b", base)),
                     load_side("candidate", _side(tmp_path, "c", cand)))
    io = next(f for f in report.figures if f.figure == "path.kvm_emulate_insn.handle_io")
    assert io.test is not None and "sampling test" in io.test
    k, n = effective(6 * 600, 6 * 1000, 6 * 360000, 6 * (360000 + 1600))
    assert io.p == sampling_test(((300.0, 600.0, 42000, 6), (k, n, 42000, 6)))[0]
    assert io.p is not None and io.p > 0.2 and io.verdict == "no change"
    naive = sampling_test(((300, 600, 42000, 6), (6 * 101 * 0.6, 6 * 101, 42000, 6)))[0]
    assert naive < 0.001


# --- harness stacks and old files -----------------------------------------------------------


def test_harness_stacks_says_the_rate_and_the_mean_period() -> None:
    r = run_result("b", [1.0, 1.0])
    for run in r.runs:
        run.phases[0].trace = _trace(_rate_stacks({PIO: [500, 400, 3], EMUL: [1, 2, 2, 7]}, 1000))
    (item,) = callpaths.collect(r)
    st = item.stacks
    assert (st.rate_hz, st.stacked, st.events, st.weight) == (1000, 14, 2000, 1830)
    assert st.period == round(1830 / 14)
    tree = callpaths.render_tree([item])
    assert ("sampled at about 1000 stacks/s per CPU: 14 stacks of 2000 events, mean period "
            f"{round(1830 / 14)}; estimated events [95% interval]") in tree
    k, n = effective(1806, 1830, 2 * (500**2 + 400**2 + 9), st.weight_sq or 0)
    lo, hi = wilson(k, n)
    share = 1806 / 1830
    # Samples through the node, its share of the weights, the estimate and interval.
    assert (f"handle_io  6 ({100 * share:.1f}%)  ~{share * 2000:.0f} "
            f"[{lo * 2000:.0f}, {hi * 2000:.0f}]") in tree
    assert st.path_estimates["handle_io"].events == pytest.approx(share * 2000)
    # Folded stacks count the events the samples stand for; a node below 2% of the
    # weight is left out although it holds 8 of the 14 samples.
    folded = callpaths.render_folded([item])
    assert f";x86_emulate_instruction {2 * 903}\n" in folded
    assert f";x86_emulate_instruction {2 * 12}\n" in folded
    assert "handle_io" not in "".join(callpaths.tree_lines(
        _rate_stacks({PIO: [1, 1, 1, 1, 1, 1, 1, 1], EMUL: [400, 400]}, 808), min_share=0.02))


def test_result_files_without_the_rate_fields_still_load() -> None:
    old = ('{"events": 640, "stacked": 10, "period": 64, "truncated": 0, "depth": 8, '
           '"stacks": [{"frames": ["a"], "count": 10}], "paths": {"a": 10}, '
           '"path_estimates": {"a": {"share": 1, "share_low": 0.7, "share_high": 1, '
           '"events": 640, "low": 448, "high": 640}}}')
    st = ProbeStacks.model_validate_json(old)
    assert st.rate_hz is None and st.weight is None and st.effective_samples is None
    assert st.stacks[0].weight is None and st.path_estimates["a"].weight is None
    assert isinstance(st.path_estimates["a"], PathEstimate)
    rate = _rate_stacks({PIO: [500, 400, 3], EMUL: [1, 2]}, 1000)
    assert ProbeStacks.model_validate_json(rate.model_dump_json()) == rate
    assert path_estimates({"a": 10}, 10, 640)["a"].effective_samples is None


def test_the_html_report_says_the_rate_and_shows_the_estimates() -> None:
    r = run_result("b", [1.0])
    st = _rate_stacks({PIO: [500, 400, 3], EMUL: [1, 2, 2, 7]}, 1000)
    r.runs[0].phases[0].trace = _trace(st)
    page = html.build([(Path("r.json"), r)])
    text = "".join(page.parts)
    assert ("sampled at about 1000 stacks/s per CPU: 7 stacks of 1000 events, mean period "
            "131") in text
    io = st.path_estimates["handle_io"]
    assert f"~{io.events:.0f} [{io.low:.0f}, {io.high:.0f}]" in text
    # The icicle is as wide as the weights: handle_io's box 903 of 915, not 3 of 7 stacks.
    boxes, total = plots.icicle_boxes(st)
    assert (boxes[PIO[:3]], boxes[EMUL], total) == (903, 12, 915)
    fixed = _fixed(3, 4, 640)
    assert plots.icicle_boxes(fixed)[0][PIO[:3]] == 3 and plots.icicle("i", "paths", st).png
