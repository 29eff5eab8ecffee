"""The paired-rounds goal verdict of the tracer benchmarks (tests/bench/goals.py)."""

from __future__ import annotations

import random

import pytest
from scipy import stats as sps

from tests.bench.goals import judge, median_interval


def test_nine_rounds_give_the_second_and_eighth_values() -> None:
    # P(B <= 1) = 10/512 <= 0.025 < P(B <= 2) for B ~ Binomial(9, 1/2): k = 2.
    median, low, high = median_interval([9, 1, 8, 2, 7, 3, 6, 4, 5])
    assert (median, low, high) == (5, 2, 8)


def test_even_rounds_take_the_mean_of_the_middle_pair() -> None:
    assert median_interval([1, 2, 3, 4, 5, 6, 7, 8])[0] == 4.5


def test_too_few_rounds_are_refused() -> None:
    with pytest.raises(ValueError, match="too few"):
        median_interval([1.0, 1.1, 1.2, 1.3, 1.4])


def test_the_interval_covers_the_true_median_at_its_level() -> None:
    # 4000 draws of 9 skewed ratios whose median is 1.0 exactly (a lognormal's).
    rng = random.Random(21)
    hits = 0
    trials = 4000
    for _ in range(trials):
        _, low, high = median_interval([rng.lognormvariate(0.0, 0.1) for _ in range(9)])
        hits += low <= 1.0 <= high
    nominal = 1 - 2 * 10 / 512  # the exact coverage of [x_(2), x_(8)] for n = 9
    band = sps.binom.interval(0.99, trials, nominal)
    assert band[0] <= hits <= band[1], (hits, band)


def test_verdicts() -> None:
    base = [1.0] * 9
    assert judge("a", 1.05, [1.01, 1.02, 1.0, 1.03, 1.02, 1.01, 1.02, 1.0, 1.04], base).verdict \
        == "met"
    assert judge("b", 1.05, [1.2, 1.1, 1.3, 1.2, 1.15, 1.1, 1.2, 1.25, 1.3], base).verdict \
        == "missed"
    undecided = judge("c", 1.05, [0.9, 1.2, 1.0, 1.1, 0.95, 1.3, 1.05, 0.98, 1.12], base)
    assert undecided.verdict == "undecided"
    assert "undecided" in undecided.line()


def test_rounds_are_paired_by_index() -> None:
    # A drift that doubles both times cancels within each round.
    result = judge("d", 1.05, [1.0, 2.0] * 4 + [1.0], [1.0, 2.0] * 4 + [1.0])
    assert result.ratios == (1.0,) * 9
    with pytest.raises(ValueError, match="9 rounds against 8"):
        judge("e", 1.05, [1.0] * 9, [1.0] * 8)
