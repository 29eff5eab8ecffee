"""Overhead goals judged from paired rounds: a verdict that says when the noise decides.

A benchmark run on a shared host drifts: the same untraced guest took 955 ms in
one block of rounds and 816 ms in the next here, so ratios of per-mode medians
taken block after block move by more than the goals they judge (1.01x, 1.05x).
The rounds are therefore paired: every round runs every mode once (in a shuffled
order), each mode's time is divided by the untraced time of the same round, and
the goal is judged on the median of those per-round ratios with its
distribution-free interval (order statistics of the binomial, no normality). The
verdict is "met" when the whole interval is at or under the goal, "missed" when
the whole interval is over it, and otherwise "undecided at this noise", with the
interval's width saying how many rounds a decision would need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from scipy import stats as sps

Verdict = Literal["met", "missed", "undecided"]


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(median, low, high): the median and its order-statistic confidence interval.

    With n values, [x_(k), x_(n-k+1)] covers the true median with probability
    1 - 2 P(B <= k - 1) for B ~ Binomial(n, 1/2), whatever the distribution; k is
    the largest for which that is at least ``level``. Needs n >= 6 for 95%.
    """
    xs = sorted(values)
    n = len(xs)
    alpha = (1 - level) / 2
    k = 0
    while k + 1 <= n // 2 and sps.binom.cdf(k, n, 0.5) <= alpha:
        k += 1
    if k == 0:
        raise ValueError(f"{n} rounds are too few for a {level:.0%} interval of the median")
    mid = n // 2
    median = xs[mid] if n % 2 else (xs[mid - 1] + xs[mid]) / 2
    return median, xs[k - 1], xs[n - k]


@dataclass(frozen=True)
class GoalResult:
    """One goal judged: the per-round ratios, their median and interval, the verdict."""

    mode: str
    goal: float
    ratios: tuple[float, ...]
    median: float
    low: float
    high: float

    @property
    def verdict(self) -> Verdict:
        """met: the interval is at or under the goal; missed: over it; else undecided."""
        if self.high <= self.goal:
            return "met"
        if self.low > self.goal:
            return "missed"
        return "undecided"

    def line(self) -> str:
        """One line for the bench's output."""
        return (f"{self.mode:24s} {self.median:.3f}x  95% [{self.low:.3f}, {self.high:.3f}]  "
                f"goal <= {self.goal:.2f}x: {self.verdict}")


def judge(mode: str, goal: float, times: Sequence[float], base: Sequence[float]) -> GoalResult:
    """The goal ``time / base <= goal`` judged from paired rounds (same index, same round)."""
    if len(times) != len(base):
        raise ValueError(f"{mode}: {len(times)} rounds against {len(base)} untraced")
    if any(b <= 0 or not math.isfinite(b) for b in base):
        raise ValueError(f"{mode}: an untraced time is not positive: {list(base)}")
    ratios = tuple(t / b for t, b in zip(times, base, strict=True))
    median, low, high = median_interval(ratios)
    return GoalResult(mode, goal, ratios, median, low, high)
