"""Statistics of one figure compared between two sides, and corrections across many figures.

**Boots are the unit of independence.** Repetitions inside one boot of a VM
share that boot's placement, page cache, host memory layout and caches, so
they vary less among themselves than boots do. Pooling them as if independent
overstates the evidence (with 5 runs x 2 repetitions, 3% noise between boots
and 1% within, a naive test flags 17% of A/A comparisons at alpha 5%). Each
side is therefore a list of boots, each a list of measured repetitions; the
test works on one summary per boot, the mean of its log values. That is the
"summary statistics" approach to a nested design: exact for balanced designs,
robust for the 2-10 boots a side a benchmark has. A mixed model
(statsmodels ``MixedLM``) fits the same quantity but its REML fit with so few
groups often lands on the boundary or fails to converge; it is used in the
tests as the reference for the variance components, not in the verdict.

**One estimator for test, interval and gate.** A figure's centre on a side is
the mean over boots of the boots' mean log value (a geometric mean of
geometric means, every boot weighted equally). The reported change is
``exp(centre_c - centre_b) - 1``; Welch's t-test on the boot summaries decides
significance; its own t interval, exponentiated, is the confidence interval;
and the threshold gate applies to that same change. Where a value is zero or
negative the same is done on raw values (change relative to the base centre).

**Counts are judged as counts.** Exits, faults, root lookups are event counts:
where neither side varies (the micro guests' exact counts) or the base saw no
event at all, a relative change is meaningless or infinite. For count figures
the conditional binomial test of two Poisson rates (candidate total given the
sum, split by the number of repetitions) is applied, and where Welch is also
defined the larger p-value of the two counts: a count change must stand out
from both its observed boot-to-boot noise and Poisson counting noise. 0 events
on every base repetition against 1 on every candidate one is then p = 0.25
with 3 a side, not an infinite regression.

``mann-whitney`` (Mann-Whitney U on the boot summaries) remains as a
distribution-free check for designs with many boots; change and interval stay
the log-mean estimator above.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy import stats as sps

TestName = Literal["welch", "mann-whitney"]
Correction = Literal["bh", "holm"]
Unit = Literal["boot", "repetition"]

TESTS: dict[TestName, str] = {
    "welch": "Welch's t-test on per-boot mean log values (raw values where any is <= 0)",
    "mann-whitney": "Mann-Whitney U on per-boot mean log values, two-sided",
}
CORRECTIONS: dict[Correction, str] = {
    "bh": "Benjamini-Hochberg false discovery rate",
    "holm": "Holm family-wise error",
}
#: Power at which the minimal detectable effect is stated.
POWER = 0.80
#: A figure is not steady when it moves at least this much per repetition within boots.
STEADY_TOLERANCE = 0.025

#: One side of one figure: a list of boots, each the values of its measured repetitions.
Boots = Sequence[Sequence[float]]


def _arr(values: Sequence[float]) -> NDArray[np.float64]:
    return np.asarray(values, dtype=np.float64)


def flat(boots: Boots) -> list[float]:
    """Every value of every boot."""
    return [v for b in boots for v in b]


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (NaN for none)."""
    return float(np.median(_arr(values))) if len(values) else math.nan


@dataclass(frozen=True)
class Components:
    """Variance components of a nested design (boots, repetitions in a boot), on the
    figure's scale (log: SDs are close to relative SDs, 0.03 = 3%)."""

    between_sd: float | None  # boot-to-boot, beyond what repetitions explain
    within_sd: float | None  # repetition-to-repetition inside a boot
    reps_per_boot: float  # the mean number of repetitions a boot has

    def advice(self) -> Literal["boots", "repetitions"]:
        """Whether more boots or more repetitions per boot would narrow the interval more."""
        if self.between_sd is None or self.within_sd is None:
            return "boots" if self.within_sd is None else "repetitions"
        # Var(boot summary) = between^2 + within^2 / r: add what dominates it.
        return (
            "boots"
            if self.between_sd**2 >= self.within_sd**2 / max(self.reps_per_boot, 1.0)
            else "repetitions"
        )


def variance_components(sides: Sequence[Boots]) -> Components:
    """One-way random-effects ANOVA (method of moments), pooled over the given sides.

    Each side keeps its own mean (the sides may differ); boots are groups. On
    log values where every value is positive (as the test), raw ones otherwise,
    then divided by the mean of all values: either way an SD reads as relative.
    ``between_sd`` is None where there are fewer than two boots on every side,
    ``within_sd`` None where no boot has two repetitions.
    """
    values = [v for boots in sides for v in flat(boots)]
    log = bool(values) and min(values) > 0
    ssb = ssw = 0.0
    df_b = df_w = 0
    n0_num = 0.0
    reps: list[int] = []
    for boots in sides:
        groups = [np.log(_arr(b)) if log else _arr(b) for b in boots if len(b)]
        if not groups:
            continue
        reps += [len(g) for g in groups]
        n = sum(len(g) for g in groups)
        grand = float(np.mean(np.concatenate(groups)))
        ssb += sum(len(g) * (float(g.mean()) - grand) ** 2 for g in groups)
        ssw += sum(float(((g - g.mean()) ** 2).sum()) for g in groups)
        df_b += len(groups) - 1
        df_w += n - len(groups)
        n0_num += n - sum(len(g) ** 2 for g in groups) / n
    msw = ssw / df_w if df_w > 0 else None
    between: float | None = None
    if df_b > 0:
        n0 = n0_num / df_b
        msb = ssb / df_b
        var_b = msb - (msw or 0.0) if msw is not None else msb
        between = math.sqrt(max(0.0, var_b / n0))
    within = math.sqrt(msw) if msw is not None else None
    if not log and values:
        # Raw values (some <= 0): relative to the mean, so they read like the log scale's.
        scale = abs(float(np.mean(values)))
        between = None if between is None else (between / scale if scale else math.inf)
        within = None if within is None else (within / scale if scale else math.inf)
    return Components(between, within, float(np.mean(reps)) if reps else 0.0)


@dataclass(frozen=True)
class FigureStats:
    """Everything the statistics say about one figure."""

    scale: Literal["log", "raw"]
    centre_base: float | None  # back-transformed: a geometric mean of boot geometric means
    centre_candidate: float | None
    change: float | None  # exp(diff) - 1 (log) or diff / |base| (raw); None from a base of 0
    ci: tuple[float, float] | None
    p: float | None
    method: str | None
    boots_base: int
    boots_candidate: int
    #: (df, standard error of the difference on the figure's scale) for the MDE; None:
    #: no noise estimate (fewer than two boots on a side)
    noise: tuple[float, float] | None
    count_totals: tuple[float, int, float, int] | None  # (base sum, base reps, cand sum, reps)
    why_no_test: str | None = None
    #: a sampled path's standard error of log(estimate ratio) from the sampling and the
    #: exact counts alone (:func:`sampling_test`); None: not a sampled figure
    sampling_se: float | None = None
    #: the same constant on every repetition of both sides: no hypothesis to test
    identical: bool = False


def _summaries(boots: Boots, log: bool) -> NDArray[np.float64]:
    return _arr([float(np.mean(np.log(_arr(b)) if log else _arr(b))) for b in boots if len(b)])


def poisson_rate_test(base_total: float, base_n: int, cand_total: float, cand_n: int) -> float:
    """Two-sided p of "equal Poisson rates": the conditional binomial (exact) test."""
    b, c = round(base_total), round(cand_total)
    if b + c == 0:
        return 1.0
    return float(sps.binomtest(c, b + c, cand_n / (base_n + cand_n)).pvalue)


def _poisson_ci(
    base_total: float, base_n: int, cand_total: float, cand_n: int, level: float
) -> tuple[float, float] | None:
    """Clopper-Pearson interval of the candidate's share, as a change of the rate."""
    b, c = round(base_total), round(cand_total)
    if b == 0 or b + c == 0:
        return None
    ci = sps.binomtest(c, b + c).proportion_ci(confidence_level=level, method="exact")
    scale = base_n / cand_n

    def ratio(share: float) -> float:
        return math.inf if share >= 1 else share / (1 - share) * scale

    return ratio(ci.low) - 1, ratio(ci.high) - 1


#: Summed over a side's repetitions: (samples through the function, samples of the probe,
#: the probe's exact events, repetitions); base first, then the candidate. Weighted samples
#: (rate targets) give their effective counts (harness.trace.stacks.effective), fractional.
Sampled = tuple[tuple[float, float, int, int], tuple[float, float, int, int]]


def sampling_test(sampled: Sampled) -> tuple[float, float | None]:
    """p of "the same estimated events per repetition", and its log-ratio SE, from sampling.

    A sampled path's estimate is share x events: the share p = k/n is binomial
    in the n stacks sampled (the Wilson interval in the result), the event count
    is exact and read as Poisson. By the delta method, var(log estimate) is
    (1 - p)/k + 1/events on each side, and the log ratio of the per-repetition
    estimates is tested with a normal z. A side with no sample through the
    function has no log: then only the shares are tested (Fisher's exact test).
    Weighted samples enter as their effective (k, n): (1 - p)/k_eff is then the ratio
    estimator's var(log share) (docs/STATISTICS.md); Fisher gets them rounded.
    """
    (kb, nb, eb, rb), (kc, nc, ec, rc) = sampled
    if kb == 0 or kc == 0 or eb == 0 or ec == 0:
        if kb + kc == 0:
            return 1.0, None
        table = np.array([[round(kb), round(nb) - round(kb)], [round(kc), round(nc) - round(kc)]])
        return float(sps.fisher_exact(table).pvalue), None
    pb, pc = kb / nb, kc / nc
    se = math.sqrt((1 - pb) / kb + (1 - pc) / kc + 1 / eb + 1 / ec)
    diff = math.log(pc * ec / rc) - math.log(pb * eb / rb)
    return float(2 * sps.norm.sf(abs(diff) / se)) if se > 0 else float(diff != 0), se


def compare_figure(
    base: Boots,
    candidate: Boots,
    *,
    count: bool = False,
    sampled: Sampled | None = None,
    test: TestName = "welch",
    level: float = 0.95,
) -> FigureStats:
    """The change of one figure between two sides of boots, its interval and p-value.

    ``sampled``: the figure is a sampled path's estimate; besides the boots'
    noise it must pass :func:`sampling_test` (the larger p counts), so a change
    the samples cannot tell from chance is never a finding.
    """
    base = [b for b in base if len(b)]
    candidate = [b for b in candidate if len(b)]
    nb, nc = len(base), len(candidate)
    fb, fc = flat(base), flat(candidate)
    log = bool(fb and fc and min(fb) > 0 and min(fc) > 0)
    scale: Literal["log", "raw"] = "log" if log else "raw"
    if not nb or not nc:
        return FigureStats(scale, None, None, None, None, None, None, nb, nc, None, None,
                           why_no_test="measured on one side only")
    xb, xc = _summaries(base, log), _summaries(candidate, log)
    mb, mc = float(xb.mean()), float(xc.mean())
    back: Callable[[float], float] = math.exp if log else float
    change = _change(mb, mc, log)
    totals = (sum(fb), len(fb), sum(fc), len(fc)) if count else None
    p_samp, se_samp = sampling_test(sampled) if sampled is not None else (None, None)
    out = FigureStats(scale, back(mb), back(mc), change, None, None, None, nb, nc, None, totals,
                      sampling_se=se_samp)
    if nb < 2 or nc < 2:
        return replace(out, why_no_test=f"{nb} boot(s) against {nc}: a side needs 2 or more "
                       "(repetitions inside one boot share its noise)")
    vb, vc = float(xb.var(ddof=1)) / nb, float(xc.var(ddof=1)) / nc
    se = math.sqrt(vb + vc)
    diff = mc - mb
    if se == 0:
        df = float(nb + nc - 2)
        if diff == 0 and max(fb) == min(fb) == max(fc) == min(fc):
            return replace(out, identical=True, ci=(0.0, 0.0), noise=(df, 0.0),
                           method="exact: identical on every repetition of both sides")
        if totals is not None:
            return replace(out, p=poisson_rate_test(*totals), ci=_poisson_ci(*totals, level),
                           method="exact Poisson rate test (no variation within either side)",
                           noise=(df, 0.0))
        if p_samp is not None:
            return replace(out, p=p_samp, noise=(df, 0.0),
                           method="sampling test (no variation within either side)")
        ci = (change, change) if change is not None else None
        return replace(out, p=1.0 if diff == 0 else 0.0, ci=ci, noise=(df, 0.0),
                       method="exact: no variation within either side")
    if vb and vc:
        df = (vb + vc) ** 2 / (vb**2 / (nb - 1) + vc**2 / (nc - 1))
    else:  # one side constant: all the variance, and its degrees of freedom, are the other's
        df = float((nb if vb else nc) - 1)
    if test == "mann-whitney":
        p = float(sps.mannwhitneyu(xc, xb, alternative="two-sided", method="auto").pvalue)
    else:
        p = float(2 * sps.t.sf(abs(diff / se), df))
    half = float(sps.t.ppf(0.5 + level / 2, df)) * se
    method = TESTS[test] if log else TESTS[test].split(" (")[0].replace("log", "raw")
    if totals is not None:
        p_pois = poisson_rate_test(*totals)
        if p_pois > p:
            p, method = p_pois, method + "; Poisson rate test (the larger p)"
    if p_samp is not None and p_samp > p:
        p, method = p_samp, method + "; sampling test (the larger p)"
    return replace(out, p=p, method=method, noise=(df, se),
                   ci=_interval(mb, diff - half, diff + half, log))


def _change(mb: float, mc: float, log: bool) -> float | None:
    if log:
        return math.expm1(mc - mb)
    if mb == 0:
        return 0.0 if mc == 0 else None
    return (mc - mb) / abs(mb)


def _interval(mb: float, low: float, high: float, log: bool) -> tuple[float, float] | None:
    if log:
        return math.expm1(low), math.expm1(high)
    if mb == 0:
        return None
    return low / abs(mb), high / abs(mb)


def minimal_detectable_effect(
    s: FigureStats, *, alpha: float, threshold: float, power: float = POWER
) -> float | None:
    """The smallest relative change this comparison would flag with ``power``.

    Two-sided at ``alpha`` (pass the per-figure level the exit code uses, e.g.
    alpha / m under Holm's first step), from the measured standard error of the
    boot summaries; never below the threshold, since the gate needs both. For
    counts, also Poisson counting noise at the observed totals.
    """
    if s.noise is None:
        return None
    df, se = s.noise
    d = 0.0
    if se > 0 and df > 0:
        d = (float(sps.t.ppf(1 - alpha / 2, df)) + float(sps.t.ppf(power, df))) * se
    effect = _rel(d, s)
    if s.count_totals is not None:
        bt, bn, _ct, cn = s.count_totals
        if bt <= 0:
            return None
        z = float(sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power))
        # log rate ratio's SE at the base rate on both sides: sqrt(1/B + 1/B').
        pois = math.expm1(z * math.sqrt(1 / bt + 1 / max(bt * cn / bn, 1e-9)))
        effect = max(effect, pois) if effect is not None else pois
    if s.sampling_se is not None:
        z = float(sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power))
        samp = math.expm1(z * s.sampling_se)
        effect = max(effect, samp) if effect is not None else samp
    return None if effect is None else max(effect, threshold)


def _rel(d: float, s: FigureStats) -> float | None:
    if s.scale == "log":
        return math.expm1(d)
    if not s.centre_base:
        return None
    return d / abs(s.centre_base)


def adjust(pvalues: Sequence[float], method: Correction) -> list[float]:
    """p-values corrected for testing all of them at once (same order as given)."""
    if not len(pvalues):
        return []
    p = _arr(pvalues)
    if method == "bh":
        return [float(x) for x in sps.false_discovery_control(p, method="bh")]
    return holm(pvalues)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values: max over the sorted prefix of (m - i) * p_(i)."""
    p = _arr(pvalues)
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = (m - np.arange(m)) * p[order]
    adjusted_sorted = np.minimum(np.maximum.accumulate(scaled), 1.0)
    out = np.empty(m)
    out[order] = adjusted_sorted
    return [float(x) for x in out]


@dataclass(frozen=True)
class Trend:
    """The drift of a figure over repetitions inside boots."""

    per_repetition: float  # relative change per repetition (log scale), or per raw unit
    p: float

    def steady(self, tolerance: float = STEADY_TOLERANCE, alpha: float = 0.05) -> bool:
        """False when the drift is both significant and at least ``tolerance`` a repetition."""
        return not (self.p < alpha and abs(self.per_repetition) >= tolerance)


def trend(boots: Boots) -> Trend | None:
    """Slope of the figure against the repetition's place in its boot, boots held fixed.

    Each boot's values are in repetition order; the slope is the pooled
    within-boot regression (a fixed effect per boot), so a boot that is simply
    faster than another is not a trend. None where there is too little to fit.
    """
    groups = [_arr(b) for b in boots if len(b) >= 2]
    log = all(float(g.min()) > 0 for g in groups)
    xs, ys = [], []
    for g in groups:
        y = np.log(g) if log else g
        x = np.arange(len(g), dtype=np.float64)
        xs.append(x - x.mean())
        ys.append(y - y.mean())
    if not xs:
        return None
    x, y = np.concatenate(xs), np.concatenate(ys)
    sxx = float((x * x).sum())
    df = len(x) - len(groups) - 1
    if sxx == 0 or df < 1:
        return None
    slope = float((x * y).sum()) / sxx
    resid = y - slope * x
    s2 = float((resid * resid).sum()) / df
    if s2 == 0:
        p = 0.0 if slope != 0 else 1.0
    else:
        p = float(2 * sps.t.sf(abs(slope) / math.sqrt(s2 / sxx), df))
    return Trend(math.expm1(slope) if log else slope, p)


@dataclass(frozen=True)
class PlanRow:
    """A design that reaches the wanted power for one figure."""

    reps_per_boot: int
    boots_per_side: int | None  # None: not within the search limit


def plan_design(
    between_sd: float,
    within_sd: float,
    effect: float,
    *,
    alpha: float,
    power: float = POWER,
    reps: Sequence[int] = (1, 2, 3, 5),
    max_boots: int = 100,
) -> list[PlanRow]:
    """Boots a side needed, for each repetitions-per-boot choice, to detect ``effect``.

    The summary of a boot of r repetitions has variance between^2 + within^2 / r;
    with b boots a side the difference has SE sqrt(2 v / b) and df 2b - 2, and
    power is that of the two-sided t-test (noncentral t).
    """
    delta = math.log1p(abs(effect))
    rows = []
    for r in reps:
        v = between_sd**2 + within_sd**2 / r
        need: int | None = None
        for b in range(2, max_boots + 1):
            df = 2 * b - 2
            se = math.sqrt(2 * v / b)
            if se == 0:
                need = b
                break
            crit = float(sps.t.ppf(1 - alpha / 2, df))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                got = float(sps.nct.sf(crit, df, delta / se) + sps.nct.cdf(-crit, df, delta / se))
            if got >= power:
                need = b
                break
        rows.append(PlanRow(r, need))
    return rows
