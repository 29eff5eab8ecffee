"""Statistics of one figure compared between two sides, and corrections across many figures.

Each figure has a few repetitions per side (3 to 30). The test is chosen for
that size:

* ``welch`` (default): Welch's t-test on log values (on raw values where a
  value is zero or negative). Benchmark figures are positive and their noise
  is multiplicative, so logs make it symmetric and the test compares
  geometric means without assuming equal variances. A rank test cannot serve
  as the default at these sizes: with 3 repetitions per side the smallest
  two-sided p-value Mann-Whitney U can reach is 2/C(6,3) = 0.1, so it could
  never call anything significant, corrected or not.
* ``mann-whitney``: Mann-Whitney U (exact where there are no ties), free of
  any distributional assumption; sensible from about 8 repetitions per side.

Both share one rule first: where neither side varies at all (deterministic
counts, e.g. the micro guest's exact instruction counts) equal values are
"no change" (p = 1) and different values a certain change (p = 0); no test
is needed, and t or U would be undefined.

The change of a figure is the change of its median, relative to the base
median; its confidence interval is a percentile bootstrap of that same
quantity (``scipy.stats.bootstrap``, fixed seed per figure), so the number
shown and its interval always agree. A verdict needs both gates: a
corrected p-value (Benjamini-Hochberg or Holm across all figures of one
comparison) below alpha, and a change at least the threshold.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy import stats as sps

TestName = Literal["welch", "mann-whitney"]
Correction = Literal["bh", "holm"]

TESTS: dict[TestName, str] = {
    "welch": "Welch's t-test on log values (raw values where any is <= 0)",
    "mann-whitney": "Mann-Whitney U, two-sided (exact without ties)",
}
CORRECTIONS: dict[Correction, str] = {
    "bh": "Benjamini-Hochberg false discovery rate",
    "holm": "Holm family-wise error",
}
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class TestOutcome:
    """A two-sample test's p-value and the method that produced it."""

    p: float
    method: str


def _as_array(values: Sequence[float]) -> NDArray[np.float64]:
    return np.asarray(values, dtype=np.float64)


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (NaN for none)."""
    return float(np.median(_as_array(values))) if len(values) else math.nan


def relative_change(base: float, candidate: float) -> float | None:
    """(candidate - base) / |base|; None where base is 0 (there is no relative change)."""
    if base == 0:
        return 0.0 if candidate == 0 else None
    return (candidate - base) / abs(base)


def two_sample_test(
    base: Sequence[float], candidate: Sequence[float], test: TestName = "welch"
) -> TestOutcome | None:
    """p-value for "the two sides differ"; None with fewer than 2 values on a side."""
    b, c = _as_array(base), _as_array(candidate)
    if len(b) < 2 or len(c) < 2:
        return None
    if np.ptp(b) == 0 and np.ptp(c) == 0:
        same = bool(b[0] == c[0])
        return TestOutcome(1.0 if same else 0.0, "exact: no variation within either side")
    if test == "mann-whitney":
        mw = sps.mannwhitneyu(c, b, alternative="two-sided", method="auto")
        return TestOutcome(float(mw.pvalue), TESTS[test])
    log = bool(np.all(b > 0) and np.all(c > 0))
    x, y = (np.log(b), np.log(c)) if log else (b, c)
    with warnings.catch_warnings():
        # A constant side has variance exactly 0; SciPy warns about precision, needlessly.
        warnings.simplefilter("ignore", RuntimeWarning)
        res = sps.ttest_ind(y, x, equal_var=False)
    p = float(res.pvalue)
    if math.isnan(p):  # cannot happen with variation on a side; be explicit if it does
        p = 1.0
    return TestOutcome(p, "Welch's t-test on " + ("log values" if log else "raw values"))


def figure_seed(key: str, seed: int = 0) -> int:
    """A seed per figure from its name: results do not depend on which other figures exist."""
    return zlib.crc32(key.encode()) ^ seed


def bootstrap_change_ci(
    base: Sequence[float],
    candidate: Sequence[float],
    *,
    seed: int,
    level: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> tuple[float, float] | None:
    """Percentile bootstrap CI of (median(c) - median(b)) / |median(b)|.

    Both sides are resampled independently; the denominator is the observed
    base median, so the interval is of exactly the change that is reported.
    None with fewer than 2 values on a side or a base median of 0.
    """
    b, c = _as_array(base), _as_array(candidate)
    if len(b) < 2 or len(c) < 2:
        return None
    mb = float(np.median(b))
    if mb == 0:
        return None
    if np.ptp(b) == 0 and np.ptp(c) == 0:
        change = (float(c[0]) - mb) / abs(mb)
        return change, change

    def stat(x: NDArray[np.float64], y: NDArray[np.float64], axis: int) -> NDArray[np.float64]:
        return (np.median(y, axis=axis) - np.median(x, axis=axis)) / abs(mb)

    res = sps.bootstrap(
        (b, c),
        stat,
        n_resamples=resamples,
        confidence_level=level,
        method="percentile",
        vectorized=True,
        paired=False,
        random_state=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def adjust(pvalues: Sequence[float], method: Correction) -> list[float]:
    """p-values corrected for testing all of them at once (same order as given)."""
    if not len(pvalues):
        return []
    p = _as_array(pvalues)
    if method == "bh":
        return [float(x) for x in sps.false_discovery_control(p, method="bh")]
    return holm(pvalues)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values: max over the sorted prefix of (m - i) * p_(i)."""
    p = _as_array(pvalues)
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = (m - np.arange(m)) * p[order]
    adjusted_sorted = np.minimum(np.maximum.accumulate(scaled), 1.0)
    out = np.empty(m)
    out[order] = adjusted_sorted
    return [float(x) for x in out]
