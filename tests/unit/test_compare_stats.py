"""The statistics of `harness compare`, checked against SciPy, statsmodels and worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from harness.analysis import stats

# Fixed data (no randomness): a throughput-like figure, ~3% noise.
BASE = [1012.0, 987.0, 1003.0, 995.0, 1021.0]
SLOWER = [902.0, 915.0, 889.0, 921.0, 897.0]


def test_welch_is_scipys_welch_on_logs() -> None:
    got = stats.two_sample_test(BASE, SLOWER, "welch")
    assert got is not None
    want = sps.ttest_ind(np.log(SLOWER), np.log(BASE), equal_var=False).pvalue
    assert got.p == pytest.approx(want, rel=1e-12)
    assert "log" in got.method


def test_welch_worked_example_by_hand() -> None:
    """Welch's t from its textbook formula, Welch-Satterthwaite degrees of freedom."""
    x, y = np.log(BASE), np.log(SLOWER)
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    t = (y.mean() - x.mean()) / math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    p = 2 * sps.t.sf(abs(t), df)
    got = stats.two_sample_test(BASE, SLOWER)
    assert got is not None and got.p == pytest.approx(p, rel=1e-10)


def test_welch_falls_back_to_raw_values_with_zeros() -> None:
    b, c = [0.0, 2.0, 1.0], [5.0, 6.0, 7.0]
    got = stats.two_sample_test(b, c)
    assert got is not None and "raw" in got.method
    assert got.p == pytest.approx(sps.ttest_ind(c, b, equal_var=False).pvalue)


def test_mann_whitney_is_scipys_including_ties() -> None:
    b, c = [3.0, 4.0, 4.0, 5.0, 6.0, 6.0, 7.0], [5.0, 6.0, 6.0, 8.0, 9.0, 9.0, 10.0, 11.0]
    got = stats.two_sample_test(b, c, "mann-whitney")
    assert got is not None
    assert got.p == pytest.approx(sps.mannwhitneyu(c, b, alternative="two-sided").pvalue)


def test_mann_whitney_cannot_reach_significance_with_three_per_side() -> None:
    """Why Welch is the default: completely separated samples of 3 give p = 2/C(6,3) = 0.1."""
    got = stats.two_sample_test([1.0, 2.0, 3.0], [10.0, 11.0, 12.0], "mann-whitney")
    assert got is not None and got.p == pytest.approx(0.1)
    welch = stats.two_sample_test([100.0, 101.0, 102.0], [110.0, 111.0, 112.0], "welch")
    assert welch is not None and welch.p < 0.001


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")
def test_zero_variance_sides() -> None:
    same = stats.two_sample_test([7.0, 7.0, 7.0], [7.0, 7.0])
    assert same is not None and same.p == 1.0 and same.method.startswith("exact")
    differ = stats.two_sample_test([7.0, 7.0, 7.0], [8.0, 8.0, 8.0], "mann-whitney")
    assert differ is not None and differ.p == 0.0
    # One side constant, the other not: Welch uses the varying side's variance.
    one = stats.two_sample_test([7.0, 7.0, 7.0], [7.5, 8.0, 8.5])
    want = sps.ttest_ind(np.log([7.5, 8.0, 8.5]), np.log([7.0] * 3), equal_var=False).pvalue
    assert one is not None and one.p == pytest.approx(want)


def test_one_repetition_per_side_is_not_tested() -> None:
    assert stats.two_sample_test([1.0], [2.0]) is None
    assert stats.bootstrap_change_ci([1.0], [2.0], seed=0) is None
    assert stats.two_sample_test([1.0, 2.0], [2.0]) is None


def test_very_unequal_sizes() -> None:
    rng = np.random.default_rng(7)
    big = list(rng.normal(100, 3, 30))
    small = [90.0, 93.0, 91.0]
    got = stats.two_sample_test(big, small)
    want = sps.ttest_ind(np.log(small), np.log(big), equal_var=False).pvalue
    assert got is not None and got.p == pytest.approx(want)
    ci = stats.bootstrap_change_ci(big, small, seed=1)
    assert ci is not None and ci[0] <= ci[1] < 0


def test_bootstrap_ci_is_reproducible_and_covers_the_change() -> None:
    a = stats.bootstrap_change_ci(BASE, SLOWER, seed=42)
    b = stats.bootstrap_change_ci(BASE, SLOWER, seed=42)
    assert a == b
    assert a is not None
    change = (stats.median(SLOWER) - stats.median(BASE)) / stats.median(BASE)
    assert a[0] <= change <= a[1]
    assert a[1] < 0  # every resample is slower


def test_bootstrap_matches_scipy_percentile_bootstrap() -> None:
    mb = float(np.median(BASE))

    def stat(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
        return (np.median(y, axis=axis) - np.median(x, axis=axis)) / mb

    want = sps.bootstrap(
        (np.array(BASE), np.array(SLOWER)), stat, n_resamples=stats.BOOTSTRAP_RESAMPLES,
        method="percentile", vectorized=True, paired=False, random_state=np.random.default_rng(3),
    ).confidence_interval
    got = stats.bootstrap_change_ci(BASE, SLOWER, seed=3)
    assert got == (pytest.approx(want.low), pytest.approx(want.high))


def test_relative_change_from_zero() -> None:
    assert stats.relative_change(0.0, 0.0) == 0.0
    assert stats.relative_change(0.0, 5.0) is None
    assert stats.relative_change(200.0, 150.0) == pytest.approx(-0.25)


P_VALUES = [0.01, 0.04, 0.03, 0.005, 0.5, 0.2, 0.04, 0.0001, 0.9, 0.049]


def test_bh_matches_scipy_and_statsmodels() -> None:
    got = stats.adjust(P_VALUES, "bh")
    assert got == pytest.approx(list(sps.false_discovery_control(P_VALUES, method="bh")))
    assert got == pytest.approx(list(multipletests(P_VALUES, method="fdr_bh")[1]))


def test_holm_matches_statsmodels() -> None:
    got = stats.adjust(P_VALUES, "holm")
    assert got == pytest.approx(list(multipletests(P_VALUES, method="holm")[1]))
    # with ties and p-values that saturate at 1
    tied = [0.02, 0.02, 0.5, 0.5, 0.9]
    assert stats.holm(tied) == pytest.approx(list(multipletests(tied, method="holm")[1]))


def test_false_alarms_200_null_figures() -> None:
    """200 figures drawn from one distribution on both sides (seeded), 20 such comparisons:
    after correction at most the expected number of false regressions; without, many."""
    rng = np.random.default_rng(20261128)
    uncorrected, corrected = [], []
    for _ in range(20):
        raw = []
        for _ in range(200):
            b = rng.lognormal(mean=6.0, sigma=0.05, size=5)
            c = rng.lognormal(mean=6.0, sigma=0.05, size=5)
            out = stats.two_sample_test(list(b), list(c))
            assert out is not None
            raw.append(out.p)
        uncorrected.append(sum(p < 0.05 for p in raw))
        corrected.append(sum(q < 0.05 for q in stats.adjust(raw, "bh")))
    print(f"\n200 null figures x 20 comparisons: p < 0.05 uncorrected per comparison "
          f"{uncorrected}; q < 0.05 after Benjamini-Hochberg {corrected}")
    # Uncorrected, a 5% test flags 10 of 200 in expectation. Under the global null BH
    # bounds the chance of any false discovery by alpha: about 1 comparison in 20.
    assert 7 <= float(np.mean(uncorrected)) <= 13
    assert sum(1 for c in corrected if c > 0) <= 3
    assert sum(corrected) <= 4
