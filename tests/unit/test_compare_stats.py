"""The statistics of `harness compare`, checked against SciPy, statsmodels and worked examples."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower

from harness.analysis import stats

# Fixed data (no randomness): a throughput-like figure, 3 boots x 2 repetitions a side.
BASE = [[1012.0, 1003.0], [987.0, 995.0], [1021.0, 1015.0]]
SLOWER = [[902.0, 897.0], [915.0, 921.0], [889.0, 893.0]]


def boot_means(boots: list[list[float]]) -> np.ndarray:
    return np.array([np.mean(np.log(b)) for b in boots])


def test_welch_is_scipys_welch_on_per_boot_mean_logs() -> None:
    got = stats.compare_figure(BASE, SLOWER)
    want = sps.ttest_ind(boot_means(SLOWER), boot_means(BASE), equal_var=False)
    assert got.p == pytest.approx(want.pvalue, rel=1e-12)
    assert "per-boot mean log" in (got.method or "")


def test_change_interval_and_test_are_one_estimator() -> None:
    """The change is exp(diff of boot-mean logs) - 1 and the CI is Welch's own interval
    around that diff (SciPy's confidence_interval), exponentiated."""
    got = stats.compare_figure(BASE, SLOWER)
    xb, xc = boot_means(BASE), boot_means(SLOWER)
    assert got.change == pytest.approx(math.expm1(xc.mean() - xb.mean()))
    ci = sps.ttest_ind(xc, xb, equal_var=False).confidence_interval(0.95)
    assert got.ci == (pytest.approx(math.expm1(ci.low)), pytest.approx(math.expm1(ci.high)))


def test_interval_excludes_zero_exactly_when_p_is_below_alpha() -> None:
    rng = np.random.default_rng(16)
    for _ in range(300):
        b = [list(rng.lognormal(6.0, 0.03, 2)) for _ in range(4)]
        c = [list(rng.lognormal(6.0 + rng.normal(0, 0.03), 0.03, 2)) for _ in range(4)]
        s = stats.compare_figure(b, c)
        assert s.p is not None and s.ci is not None
        excludes = s.ci[0] > 0 or s.ci[1] < 0
        if abs(s.p - 0.05) > 1e-9:
            assert excludes == (s.p < 0.05)


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")
def test_raw_values_where_a_value_is_zero() -> None:
    b, c = [[0.0, 2.0], [1.0, 1.0]], [[5.0, 6.0], [7.0, 6.0]]
    got = stats.compare_figure(b, c)
    assert got.scale == "raw" and "raw values" in (got.method or "")
    want = sps.ttest_ind([6.5, 5.5], [1.0, 1.0], equal_var=False).pvalue
    assert got.p == pytest.approx(want)


def test_one_boot_a_side_is_not_tested_however_many_repetitions() -> None:
    got = stats.compare_figure([[1.0, 1.1, 0.9, 1.0]], [[2.0, 2.1, 1.9, 2.0]])
    assert got.p is None and got.why_no_test and "boot" in got.why_no_test
    assert got.change == pytest.approx(1.0, rel=0.01)


def test_identical_constants_are_no_hypothesis() -> None:
    got = stats.compare_figure([[7.0, 7.0], [7.0]], [[7.0], [7.0, 7.0]])
    assert got.identical and got.p is None and got.change == 0.0


def test_base_of_zero_counts_is_judged_on_counts() -> None:
    """Issue 16: 0 events on every base repetition against 1 on every candidate one was an
    infinite change and exit 1. As counts: 0 against 3 in equal exposure is p = 0.25."""
    zeros = [[0.0], [0.0], [0.0]]
    ones = [[1.0], [1.0], [1.0]]
    got = stats.compare_figure(zeros, ones, count=True)
    assert got.change is None
    assert got.p == pytest.approx(sps.binomtest(3, 3, 0.5).pvalue) == pytest.approx(0.25)
    hundreds = [[100.0], [97.0], [103.0]]
    many = stats.compare_figure(zeros, hundreds, count=True)
    assert many.p is not None and many.p < 0.001  # Welch on the raw boot means: the larger p


def test_counts_take_the_larger_of_welch_and_poisson() -> None:
    # Large, nearly constant counts: Welch alone would call a 0.01% shift certain.
    b = [[1_000_000.0], [1_000_010.0], [1_000_005.0]]
    c = [[1_000_100.0], [1_000_108.0], [1_000_104.0]]
    plain = stats.compare_figure(b, c)
    counted = stats.compare_figure(b, c, count=True)
    assert plain.p is not None and plain.p < 0.001
    poisson = sps.binomtest(3_000_312, 6_000_327, 0.5).pvalue
    assert counted.p == pytest.approx(poisson)


def test_deterministic_counts_that_differ_use_the_poisson_test() -> None:
    got = stats.compare_figure([[1000.0], [1000.0]], [[1100.0], [1100.0]], count=True)
    assert got.p == pytest.approx(sps.binomtest(2200, 4200, 0.5).pvalue)
    assert got.ci is not None and got.ci[0] < 0.1 < got.ci[1]


def test_variance_components_match_statsmodels_mixedlm() -> None:
    """The method-of-moments components equal REML's on a balanced design (where the
    between-boot component is well away from 0)."""
    rng = np.random.default_rng(5)
    boots = [list(np.exp(6.0 + rng.normal(0, 0.05) + rng.normal(0, 0.01, 3))) for _ in range(8)]
    comp = stats.variance_components([boots])
    df = pd.DataFrame(
        [(math.log(v), i) for i, b in enumerate(boots) for v in b], columns=["y", "boot"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = smf.mixedlm("y ~ 1", df, groups=df["boot"]).fit(reml=True)
    assert comp.between_sd == pytest.approx(math.sqrt(float(fit.cov_re.iloc[0, 0])), rel=1e-3)
    assert comp.within_sd == pytest.approx(math.sqrt(float(fit.scale)), rel=1e-3)
    assert comp.advice() == "boots"


def test_advice_follows_the_larger_component() -> None:
    rng = np.random.default_rng(6)
    noisy_reps = [list(np.exp(6.0 + rng.normal(0, 0.001) + rng.normal(0, 0.08, 2)))
                  for _ in range(6)]
    assert stats.variance_components([noisy_reps]).advice() == "repetitions"


def test_boots_keep_the_false_alarm_rate_where_pooled_repetitions_do_not() -> None:
    """Issue 16: 5 runs x 2 repetitions a side, 3% noise between boots and 1% within:
    pooling repetitions flagged 16.8% of A/A comparisons at alpha 5%."""
    rng = np.random.default_rng(20261204)
    trials, alarms_boot, alarms_rep = 600, 0, 0
    for _ in range(trials):
        sides = [
            [list(np.exp(6.0 + rng.normal(0, 0.03) + rng.normal(0, 0.01, 2))) for _ in range(5)]
            for _ in range(2)
        ]
        by_boot = stats.compare_figure(sides[0], sides[1])
        by_rep = stats.compare_figure([[v] for b in sides[0] for v in b],
                                      [[v] for b in sides[1] for v in b])
        alarms_boot += by_boot.p is not None and by_boot.p < 0.05
        alarms_rep += by_rep.p is not None and by_rep.p < 0.05
    boot_rate, rep_rate = alarms_boot / trials, alarms_rep / trials
    print(f"\nA/A false alarms at alpha 0.05: boots {boot_rate:.3f}, pooled reps {rep_rate:.3f}")
    assert sps.binomtest(alarms_boot, trials, 0.05).pvalue > 0.01  # consistent with 5%
    assert rep_rate > 0.10


def test_minimal_detectable_effect_is_the_power_analysis() -> None:
    """With noise known, the MDE is (t_crit + t_power) x SE, exponentiated; a comparison
    with 4x the boots sees about half the change."""
    rng = np.random.default_rng(8)
    few = [[[float(np.exp(6 + rng.normal(0, 0.03)))] for _ in range(3)] for _ in range(2)]
    s = stats.compare_figure(*few)
    assert s.noise is not None
    df, se = s.noise
    want = math.expm1((sps.t.ppf(0.975, df) + sps.t.ppf(0.8, df)) * se)
    assert stats.minimal_detectable_effect(s, alpha=0.05, threshold=0.0) == pytest.approx(want)
    assert stats.minimal_detectable_effect(s, alpha=0.05, threshold=0.5) == 0.5  # the gate
    many = [[[float(np.exp(6 + rng.normal(0, 0.03)))] for _ in range(12)] for _ in range(2)]
    m_few = stats.minimal_detectable_effect(s, alpha=0.05, threshold=0.0)
    m_many = stats.minimal_detectable_effect(stats.compare_figure(*many), alpha=0.05,
                                             threshold=0.0)
    assert m_few is not None and m_many is not None and m_many < m_few / 1.8


def test_plan_matches_statsmodels_power_for_one_repetition() -> None:
    """Boots needed for a 5% shift at 3% boot noise: statsmodels' two-sample t power."""
    rows = stats.plan_design(0.03, 0.0, 0.05, alpha=0.05, reps=(1,))
    d = math.log1p(0.05) / 0.03
    n = TTestIndPower().solve_power(effect_size=d, alpha=0.05, power=0.8)
    assert rows[0].boots_per_side == math.ceil(n)


def test_plan_more_repetitions_help_only_within_boot_noise() -> None:
    within = stats.plan_design(0.0, 0.06, 0.05, alpha=0.05)
    between = stats.plan_design(0.06, 0.0, 0.05, alpha=0.05)
    assert [r.boots_per_side for r in within] == sorted(
        [r.boots_per_side for r in within], reverse=True)  # type: ignore[type-var]
    assert within[0].boots_per_side != within[-1].boots_per_side
    assert len({r.boots_per_side for r in between}) == 1


def test_trend_finds_a_warm_up_drift_and_ignores_boot_offsets() -> None:
    warming = [[300.0, 400.0, 420.0], [250.0, 390.0, 410.0], [280.0, 405.0, 415.0]]
    t = stats.trend(warming)
    assert t is not None and not t.steady() and t.per_repetition > 0.1
    # Boots at different levels but flat inside: steady.
    flat = [[100.0, 101.0, 100.0], [200.0, 199.0, 201.0], [150.0, 151.0, 150.0]]
    t2 = stats.trend(flat)
    assert t2 is not None and t2.steady()
    assert stats.trend([[1.0], [2.0]]) is None  # one repetition a boot: nothing to fit


P_VALUES = [0.01, 0.04, 0.03, 0.005, 0.5, 0.2, 0.04, 0.0001, 0.9, 0.049]


def test_bh_matches_scipy_and_statsmodels() -> None:
    got = stats.adjust(P_VALUES, "bh")
    assert got == pytest.approx(list(sps.false_discovery_control(P_VALUES, method="bh")))
    assert got == pytest.approx(list(multipletests(P_VALUES, method="fdr_bh")[1]))


def test_holm_matches_statsmodels() -> None:
    got = stats.adjust(P_VALUES, "holm")
    assert got == pytest.approx(list(multipletests(P_VALUES, method="holm")[1]))
    tied = [0.02, 0.02, 0.5, 0.5, 0.9]
    assert stats.holm(tied) == pytest.approx(list(multipletests(tied, method="holm")[1]))


def test_holm_keeps_the_family_wise_rate_when_other_figures_really_moved() -> None:
    """Issue 16: with real changes among the figures, BH's chance of a false finding among
    the unchanged ones rose to 1.6%; Holm's stays at or below alpha."""
    rng = np.random.default_rng(1204)
    trials, false_bh, false_holm = 400, 0, 0
    for _ in range(trials):
        ps = []
        for k in range(20):
            shift = 0.08 if k < 10 else 0.0  # ten figures really moved
            b = [[float(np.exp(6 + rng.normal(0, 0.03)))] for _ in range(5)]
            c = [[float(np.exp(6 + shift + rng.normal(0, 0.03)))] for _ in range(5)]
            p = stats.compare_figure(b, c).p
            assert p is not None
            ps.append(p)
        false_bh += any(q < 0.05 for q in stats.adjust(ps, "bh")[10:])
        false_holm += any(q < 0.05 for q in stats.holm(ps)[10:])
    print(f"\nfalse findings among unchanged figures: BH {false_bh / trials:.3f}, "
          f"Holm {false_holm / trials:.3f}")
    assert false_holm / trials <= 0.05
    assert false_bh > false_holm


def test_components_of_raw_values_are_relative_to_the_mean() -> None:
    """A figure with a 0 (raw scale) still reports its noise as a share, not in its unit."""
    boots = [[0.0, 100.0], [100.0, 100.0], [110.0, 90.0]]
    comp = stats.variance_components([boots])
    raw = stats.variance_components([[[v + 1e6 for v in b] for b in boots]])  # same spread
    mean = float(np.mean([v for b in boots for v in b]))
    assert comp.within_sd is not None and raw.within_sd is not None
    assert comp.within_sd == pytest.approx(raw.within_sd * (1e6 + mean) / mean, rel=1e-3)
    assert comp.within_sd < 1.0
