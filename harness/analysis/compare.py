"""Kernel A/B comparison: matched phases, every figure tested, corrected, judged.

Pure: given the same result files and settings it returns the same report, so
a CI verdict can be reproduced on a laptop. Reads result files only, never
libvirt or the tracer.

Flow: two :class:`ResultSet` sides -> provenance differences -> phases matched
by (suite, workload, parameters, VM, phase), warm-up repetitions set aside ->
per figure: the values grouped by boot (the unit of independence), one
estimator for change, interval and test (stats.py) -> p-values corrected
across every tested figure twice: by ``--correction`` for the findings listed,
and by Holm for the exit status -> verdict by two gates (significant AND a
change at least the threshold) -> count x cost decomposition and offsets ->
phases that broke on the candidate.

**What the exit status guarantees.** Exit 1 needs a figure whose Holm-corrected
p is below alpha and whose change passes the threshold, or a phase that failed
on the candidate but never on the base. When nothing changed, the chance of
exit 1 is at most alpha for the whole comparison (family-wise), whatever the
number of figures: the gate a nightly CI acts on. The listed findings may use
Benjamini-Hochberg (more findings, a bounded share of them false); a listed
regression that does not pass Holm says so and does not fail the comparison.
Nothing tested (every figure short of boots) is exit 2: no verdict is possible,
never "no regression".
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from harness.analysis import stats
from harness.analysis.figures import (
    PhaseFigures,
    fill_zero_counts,
    is_count,
    is_whole_path,
    phase_figures,
)
from harness.analysis.provenance import FieldDiff, busy_warnings, differences
from harness.analysis.resultset import ResultSet
from harness.results import MetricInfo, RunResult, WorkloadRun
from harness.trace.stacks import effective

Verdict = Literal["regression", "improvement", "no change", "not enough data"]

#: Exit statuses of `harness compare`.
EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT = 0, 1, 2

GUARANTEE = (
    "exit 1 only for a regression that passes Holm's family-wise correction at alpha and "
    "the threshold, or a phase that failed on the candidate only: with nothing changed, "
    "P(exit 1) <= alpha for the whole comparison. Listed findings use {correction}. "
    "Exit 2: unfair, bad input, or nothing that could be tested"
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PhaseRef(_Model):
    """The identity phases are matched by."""

    suite: str
    workload: str
    params: dict[str, str | int | float]
    vm: str
    phase: str

    def label(self) -> str:
        """Short human label: ``workload[k=v] vm/phase``."""
        p = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.workload}{f'[{p}]' if p else ''} {self.vm}/{self.phase}"


class Decomposition(_Model):
    """Total time = events x time per event, as ratios of geometric means (exact product)."""

    events_ratio: float
    per_event_ratio: float
    total_ratio: float


class FigureResult(_Model):
    """One figure of one matched phase, both sides, and its verdict."""

    phase: PhaseRef
    figure: str
    unit: str
    higher_is_better: bool
    n_base: int = Field(description="measured repetitions (warm-ups excluded)")
    n_candidate: int
    boots_base: int = Field(default=0, description="boots: the independent samples")
    boots_candidate: int = 0
    centre_base: float | None = Field(
        default=None,
        description="the estimator's centre: geometric mean over boots of each boot's "
        "geometric mean (arithmetic where a value is <= 0)",
    )
    centre_candidate: float | None = None
    median_base: float | None = Field(default=None, description="plain median, for reading")
    median_candidate: float | None = None
    change: float | None = Field(
        default=None, description="centre_candidate / centre_base - 1; None from a base of 0"
    )
    ci_low: float | None = None
    ci_high: float | None = None
    p: float | None = None
    q: float | None = Field(default=None, description="p corrected by --correction (listing)")
    q_fwer: float | None = Field(default=None, description="p corrected by Holm (exit status)")
    gating: bool = Field(default=False, description="this regression decides the exit status")
    test: str | None = None
    why_no_test: str | None = None
    mde: float | None = Field(
        default=None,
        description="minimal detectable effect: the smallest change this comparison would "
        "have flagged with 80% power at its measured noise (Holm's strictest level)",
    )
    between_boot_sd: float | None = Field(
        default=None, description="boot-to-boot SD (log scale: ~relative)"
    )
    within_boot_sd: float | None = Field(
        default=None, description="repetition-to-repetition SD inside a boot"
    )
    add: Literal["boots", "repetitions"] | None = Field(
        default=None, description="what narrows the interval more: more boots or repetitions"
    )
    not_steady: str | None = Field(
        default=None,
        description="a drift across repetitions inside boots (not yet at steady state)",
    )
    verdict: Verdict
    offset_by: str | None = Field(
        default=None,
        description="a per-event latency regression outweighed by fewer events: the figure "
        "whose total-time improvement offsets it (it does not fail the comparison)",
    )
    decomposition: Decomposition | None = None
    only_in: Literal["base", "candidate"] | None = Field(
        default=None,
        description="measured on one side only (e.g. a function probe that does not attach "
        "on the other kernel): no verdict, listed apart",
    )


class PhaseFailure(_Model):
    """A phase that did not succeed on some repetitions of a side."""

    phase: PhaseRef
    base_failed: int
    base_total: int
    candidate_failed: int
    candidate_total: int
    how: list[str] = Field(description="the candidate's (or base's) failures, as recorded")
    verdict: Literal["broken", "fixed", "failing on both"]


class SideSummary(_Model):
    """What one side was made of."""

    label: str
    files: list[str]
    run_ids: list[str]
    excluded: list[dict[str, str]]
    boots: int = 0
    warmups_excluded: int = 0


class ProvenanceChange(_Model):
    """A provenance field that differs (see provenance.py)."""

    field: str
    base: list[str]
    candidate: list[str]
    meaning: str
    fair: bool


class Settings(_Model):
    """How the comparison was made."""

    alpha: float
    threshold: float
    test: stats.TestName
    test_description: str
    correction: stats.Correction
    correction_description: str
    unit: stats.Unit = "boot"
    ci_level: float = 0.95
    allow_mismatch: bool = False
    guarantee: str = ""


class ComparisonReport(_Model):
    """Everything `harness compare` says, as data; renderers only format it."""

    base: SideSummary
    candidate: SideSummary
    settings: Settings
    what_changed: list[ProvenanceChange]
    unfair: list[ProvenanceChange]
    warnings: list[str] = []
    figures: list[FigureResult]
    failures: list[PhaseFailure] = []
    unmatched_phases: list[str] = []
    tested: int = Field(description="figures in the corrected family")
    counts: dict[str, int]
    exit_status: int
    no_verdict: str | None = Field(default=None, description="why no verdict was possible")

    def by_verdict(self, verdict: Verdict) -> list[FigureResult]:
        """Figures with ``verdict``, largest change first."""
        chosen = [f for f in self.figures if f.verdict == verdict]
        return sorted(chosen, key=lambda f: -abs(f.change if f.change is not None else math.inf))

    def failing(self) -> list[FigureResult]:
        """Regressions that decide the exit status (family-wise significant, not offset)."""
        return [f for f in self.by_verdict("regression") if f.gating]

    def broken(self) -> list[PhaseFailure]:
        """Phases that failed on the candidate and never on the base."""
        return [f for f in self.failures if f.verdict == "broken"]


@dataclass
class _Samples:
    ref: PhaseRef
    #: (boot key, figures of one measured repetition), in repetition order within a boot
    base: list[tuple[str, PhaseFigures]]
    candidate: list[tuple[str, PhaseFigures]]


@dataclass
class _Side:
    phases: dict[str, tuple[PhaseRef, list[tuple[str, PhaseFigures]]]] = field(
        default_factory=dict
    )
    #: phase key -> (ref, [(failed?, how)]) over every measured repetition that reached it
    outcomes: dict[str, tuple[PhaseRef, list[str | None]]] = field(default_factory=dict)
    boots: set[str] = field(default_factory=set)
    warmups: int = 0


def _phase_key(ref: PhaseRef) -> str:
    return json.dumps(ref.model_dump(), sort_keys=True)


def _attached(result: RunResult, vm: str) -> frozenset[str] | None:
    """Probes attached for VM ``vm`` in ``result``; None when it was not traced."""
    sets = [
        set(r.trace.probes_attached)
        for r in result.vms
        if r.name == vm and r.trace is not None and r.trace.tracer_status != "disabled"
    ]
    return frozenset(set.union(*sets)) if sets else None


def boot_key(result: RunResult, run: WorkloadRun, unit: stats.Unit = "boot") -> str:
    """Which independent sample a repetition belongs to.

    Results from before boots were recorded: a VM with one record per
    repetition (micro guests boot per repetition) has one boot per repetition,
    otherwise all its repetitions shared one boot.
    """
    if run.boot is not None:
        boot = run.boot
    elif sum(1 for v in result.vms if v.name == run.vm) > 1:
        boot = f"{run.vm}#rep{run.repetition}"
    else:
        boot = run.vm
    key = f"{result.run_id}/{boot}"
    return f"{key}/{run.repetition}" if unit == "repetition" else key


def _collect(side: ResultSet, unit: stats.Unit) -> _Side:
    out = _Side()
    for _path, result in side.results:
        for run in result.runs:
            if run.warmup:
                out.warmups += 1
                continue
            info = _metric_info(result, run.workload)
            attached = _attached(result, run.vm)
            key_boot = boot_key(result, run, unit)
            base_ref = dict(suite=result.suite.name, workload=run.workload,
                            params=dict(sorted(run.params.items())), vm=run.vm)
            if run.status == "skipped" and not run.phases:
                ref = PhaseRef(**base_ref, phase="(all phases)")  # type: ignore[arg-type]
                out.outcomes.setdefault(_phase_key(ref), (ref, []))[1].append(
                    f"skipped: {run.reason}" if run.reason else "skipped"
                )
                continue
            for phase in run.phases:
                ref = PhaseRef(**base_ref, phase=phase.name)  # type: ignore[arg-type]
                key = _phase_key(ref)
                failed = None if phase.status == "ok" else (
                    f"{phase.status}: {phase.error}" if phase.error else phase.status
                )
                out.outcomes.setdefault(key, (ref, []))[1].append(failed)
                if failed is not None:
                    continue
                out.boots.add(key_boot)
                out.phases.setdefault(key, (ref, []))[1].append(
                    (key_boot, phase_figures(phase, info, attached))
                )
    return out


def _metric_info(result: RunResult, workload: str) -> dict[str, MetricInfo]:
    w = result.workloads.get(workload)
    return w.metrics if w is not None else {}


def compare(
    base: ResultSet,
    candidate: ResultSet,
    *,
    alpha: float = 0.05,
    threshold: float = 0.05,
    test: stats.TestName = "welch",
    correction: stats.Correction = "bh",
    allow_mismatch: bool = False,
    unit: stats.Unit = "boot",
) -> ComparisonReport:
    """Compare two sides; the report carries its own exit status."""
    b_results = [r for _, r in base.results]
    c_results = [r for _, r in candidate.results]
    diffs = differences(b_results, c_results)
    b_side, c_side = _collect(base, unit), _collect(candidate, unit)
    b_phases, c_phases = b_side.phases, c_side.phases
    matched = [
        _Samples(b_phases[k][0], b_phases[k][1], c_phases[k][1])
        for k in sorted(set(b_phases) & set(c_phases))
    ]
    unmatched = [
        f"{side}: {phases[k][0].label()} ({phases[k][0].suite})"
        for side, phases, other in (("base only", b_phases, c_phases),
                                    ("candidate only", c_phases, b_phases))
        for k in sorted(set(phases) - set(other))
    ]
    figures = [f for s in matched for f in _figures(s, test)]
    tested = [f for f in figures if f.p is not None]
    ps = [f.p for f in tested if f.p is not None]
    for f, q, q_fwer in zip(tested, stats.adjust(ps, correction), stats.holm(ps), strict=True):
        f.q, f.q_fwer = q, q_fwer
    for f in figures:
        f.verdict = _verdict(f, alpha, threshold)
        f.gating = f.verdict == "regression" and f.q_fwer is not None and f.q_fwer < alpha
    _offset_latency_regressions(figures)
    _minimal_effects(figures, matched, alpha / max(len(tested), 1), threshold)
    failures = _failures(b_side, c_side)

    unfair = [_change(d) for d in diffs if not d.fair]
    counts: dict[str, int] = defaultdict(int)
    for f in figures:
        counts[f.verdict] += 1
    counts["offset"] = sum(1 for f in figures if f.offset_by is not None)
    counts["gating"] = sum(1 for f in figures if f.gating and f.offset_by is None)
    counts["broken"] = sum(1 for f in failures if f.verdict == "broken")
    no_verdict = None
    if not matched:
        no_verdict = "no phase was measured on both sides"
    elif not any(f.p is not None or f.verdict == "no change" for f in figures):
        short = {f.why_no_test for f in figures if f.why_no_test}
        no_verdict = "no figure could be tested: " + ("; ".join(sorted(short)) or "no data")
    if unfair and not allow_mismatch:
        status = EXIT_BAD_INPUT
    elif counts["gating"] or counts["broken"]:
        status = EXIT_REGRESSION
    elif no_verdict is not None:
        status = EXIT_BAD_INPUT
    else:
        status = EXIT_OK
    return ComparisonReport(
        base=_side(base, b_side),
        candidate=_side(candidate, c_side),
        settings=Settings(
            alpha=alpha,
            threshold=threshold,
            test=test,
            test_description=stats.TESTS[test],
            correction=correction,
            correction_description=stats.CORRECTIONS[correction],
            unit=unit,
            allow_mismatch=allow_mismatch,
            guarantee=GUARANTEE.format(correction=stats.CORRECTIONS[correction]),
        ),
        what_changed=[_change(d) for d in diffs if d.fair],
        unfair=unfair,
        warnings=busy_warnings(b_results, c_results),
        figures=figures,
        failures=failures,
        unmatched_phases=unmatched,
        tested=len(tested),
        counts=dict(counts),
        exit_status=status,
        no_verdict=no_verdict,
    )


def _side(side: ResultSet, collected: _Side) -> SideSummary:
    return SideSummary(
        label=side.label,
        files=[str(p) for p, _ in side.results],
        run_ids=[r.run_id for _, r in side.results],
        excluded=[
            {"path": e.path, "run_id": e.run_id, "status": e.status, "reason": e.reason}
            for e in side.excluded
        ],
        boots=len(collected.boots),
        warmups_excluded=collected.warmups,
    )


def _change(d: FieldDiff) -> ProvenanceChange:
    return ProvenanceChange(
        field=d.field, base=list(d.base), candidate=list(d.candidate), meaning=d.meaning,
        fair=d.fair,
    )


def _by_boot(reps: list[tuple[str, PhaseFigures]], name: str) -> list[list[float]]:
    boots: dict[str, list[float]] = {}
    for boot, rep in reps:
        if name in rep.values:
            boots.setdefault(boot, []).append(rep.values[name])
    return list(boots.values())


def _sampled(
    reps: list[tuple[str, PhaseFigures]], name: str
) -> tuple[float, float, int, int] | None:
    """A sampled path's (effective) samples through it, samples, exact events, repetitions.

    The weights (and squared weights) are summed over the repetitions and turned into
    effective counts (stacks.effective): for a fixed period, the samples summed exactly.
    """
    have = [r.sampled[name] for _, r in reps if name in r.sampled]
    if not have:
        return None
    wf, w, wsq_f, wsq, events = (sum(col) for col in zip(*have, strict=True))
    k, n = effective(wf, w, wsq_f, wsq)
    return k, n, events, len(have)


def _judge(
    s: _Samples, name: str, unit: str, test: stats.TestName = "welch"
) -> stats.FigureStats:
    """One figure's statistics between the sides (sampled paths with their sampling noise)."""
    b, c = _by_boot(s.base, name), _by_boot(s.candidate, name)
    sb, sc = _sampled(s.base, name), _sampled(s.candidate, name)
    sampled = (sb, sc) if sb is not None and sc is not None else None
    count = is_count(name, unit) and sb is None and sc is None
    return stats.compare_figure(b, c, count=count, sampled=sampled, test=test)


def _figures(s: _Samples, test: stats.TestName) -> Iterable[FigureResult]:
    b_reps, c_reps = [r for _, r in s.base], [r for _, r in s.candidate]
    names = {n for rep in (*b_reps, *c_reps) for n in rep.values}
    fill_zero_counts(b_reps, names)
    fill_zero_counts(c_reps, names)
    names = {n for n in names if not is_whole_path(n, [*b_reps, *c_reps])}
    for name in sorted(names):
        b, c = _by_boot(s.base, name), _by_boot(s.candidate, name)
        meta = next(rep for rep in (*b_reps, *c_reps) if name in rep.values)
        unit = meta.units[name]
        st = _judge(s, name, unit, test=test)
        comp = stats.variance_components([b, c])
        fb, fc = stats.flat(b), stats.flat(c)
        fig = FigureResult(
            phase=s.ref,
            figure=name,
            unit=unit,
            higher_is_better=meta.higher_is_better[name],
            n_base=len(fb),
            n_candidate=len(fc),
            boots_base=st.boots_base,
            boots_candidate=st.boots_candidate,
            centre_base=st.centre_base,
            centre_candidate=st.centre_candidate,
            median_base=stats.median(fb) if fb else None,
            median_candidate=stats.median(fc) if fc else None,
            change=st.change,
            ci_low=st.ci[0] if st.ci else None,
            ci_high=st.ci[1] if st.ci else None,
            p=st.p,
            test=st.method,
            why_no_test=st.why_no_test,
            between_boot_sd=comp.between_sd,
            within_boot_sd=comp.within_sd,
            add=comp.advice() if (comp.between_sd or comp.within_sd) else None,
            not_steady=_steadiness(b, c),
            verdict="not enough data",
            only_in="base" if not c else "candidate" if not b else None,
        )
        if st.identical:
            # Constant and equal on both sides is no hypothesis: it stays out of the family.
            fig.ci_low = fig.ci_high = 0.0
            fig.verdict = "no change"
        if name.startswith("time."):
            fig.decomposition = _decompose(name, s)
        yield fig


def _steadiness(base: list[list[float]], candidate: list[list[float]]) -> str | None:
    notes = []
    for label, boots in (("base", base), ("candidate", candidate)):
        t = stats.trend(boots)
        if t is not None and not t.steady():
            notes.append(f"{label} drifts {t.per_repetition * 100:+.1f}% per repetition "
                         f"(p {t.p:.2g})")
    return "; ".join(notes) or None


def _verdict(f: FigureResult, alpha: float, threshold: float) -> Verdict:
    if f.p is None and f.verdict == "no change":
        return "no change"  # identical constants: nothing to test
    if f.p is None or f.q is None:
        return "not enough data"
    if f.q >= alpha:
        return "no change"
    # A change from a base of 0 (None) is judged on counts alone: the Poisson test decided.
    beyond = f.change is None or abs(f.change) >= threshold
    if not beyond or f.centre_base is None or f.centre_candidate is None:
        return "no change"
    if f.centre_candidate == f.centre_base:
        return "no change"
    worse = (f.centre_candidate < f.centre_base) == f.higher_is_better
    return "regression" if worse else "improvement"


def _minimal_effects(
    figures: list[FigureResult], matched: list[_Samples], level: float, threshold: float
) -> None:
    """Each tested figure's minimal detectable effect at Holm's strictest level (alpha / m)."""
    samples = {_phase_key(s.ref): s for s in matched}
    for f in figures:
        if f.p is None:
            continue
        s = samples[_phase_key(f.phase)]
        st = _judge(s, f.figure, f.unit)
        f.mde = stats.minimal_detectable_effect(st, alpha=level, threshold=threshold)


def _failures(base: _Side, candidate: _Side) -> list[PhaseFailure]:
    out = []
    for key in sorted(set(base.outcomes) | set(candidate.outcomes)):
        ref = (base.outcomes.get(key) or candidate.outcomes[key])[0]
        b = base.outcomes.get(key, (ref, []))[1]
        c = candidate.outcomes.get(key, (ref, []))[1]
        bf, cf = [x for x in b if x is not None], [x for x in c if x is not None]
        if not bf and not cf:
            continue
        if cf and not bf and b:
            verdict: Literal["broken", "fixed", "failing on both"] = "broken"
        elif bf and not cf and c:
            verdict = "fixed"
        elif bf and cf:
            verdict = "failing on both"
        else:
            continue  # failures on a side whose other side never ran the phase: unmatched
        how = sorted({x[:200] for x in (cf or bf)})
        out.append(PhaseFailure(phase=ref, base_failed=len(bf), base_total=len(b),
                                candidate_failed=len(cf), candidate_total=len(c),
                                how=how, verdict=verdict))
    return out


def _gmean(values: list[float]) -> float | None:
    if not values or any(v <= 0 for v in values):
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _decompose(name: str, s: _Samples) -> Decomposition | None:
    """time = events x per-event time per repetition, so the ratios of geometric means
    multiply exactly: total = events x per-event."""
    lat = name.removeprefix("time.").removesuffix("_ns")
    sides = []
    for reps in (s.base, s.candidate):
        totals = [rep.latency_totals[lat] for _, rep in reps if lat in rep.latency_totals]
        n = _gmean([float(k) for k, _ in totals])
        per = _gmean([t / k for k, t in totals])
        if n is None or per is None:
            return None
        sides.append((n, per))
    (nb, pb), (nc, pc) = sides
    return Decomposition(
        events_ratio=nc / nb, per_event_ratio=pc / pb, total_ratio=(nc * pc) / (nb * pb)
    )


def _offset_latency_regressions(figures: list[FigureResult]) -> None:
    """A slower event that now happens far less often is not a regression overall."""
    improved = {
        (_phase_key(f.phase), f.figure.removeprefix("time.").removesuffix("_ns"))
        for f in figures
        if f.figure.startswith("time.") and f.verdict == "improvement"
    }
    for f in figures:
        if f.verdict != "regression" or not f.figure.startswith("latency."):
            continue
        lat = f.figure.split(".")[1]
        if (_phase_key(f.phase), lat) in improved:
            f.offset_by = f"time.{lat}_ns"
            f.gating = False
