"""Kernel A/B comparison: matched phases, every figure tested, corrected, judged.

Pure: given the same result files and settings it returns the same report
(bootstrap seeds are fixed per figure), so a CI verdict can be reproduced on
a laptop. Reads result files only, never libvirt or the tracer.

Flow: two :class:`ResultSet` sides -> provenance differences -> phases matched
by (suite, workload, parameters, VM, phase) -> per figure: medians, change,
bootstrap CI, test -> p-values corrected across all tested figures of the
comparison -> verdict by two gates (significant after correction AND change
at least the threshold) -> count x cost decomposition and offsets.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from harness.analysis import stats
from harness.analysis.figures import (
    PhaseFigures,
    fill_zero_counts,
    is_whole_path,
    phase_figures,
)
from harness.analysis.provenance import FieldDiff, differences
from harness.analysis.resultset import ResultSet
from harness.results import MetricInfo, RunResult

Verdict = Literal["regression", "improvement", "no change", "not enough data"]

#: Exit statuses of `harness compare`.
EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT = 0, 1, 2


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
    n_base: int
    n_candidate: int
    median_base: float | None
    median_candidate: float | None
    change: float | None = Field(description="relative change of the median; None from 0")
    ci_low: float | None = None
    ci_high: float | None = None
    p: float | None = None
    q: float | None = Field(default=None, description="p corrected across the comparison")
    test: str | None = None
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


class SideSummary(_Model):
    """What one side was made of."""

    label: str
    files: list[str]
    run_ids: list[str]
    excluded: list[dict[str, str]]


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
    ci_level: float = 0.95
    bootstrap_resamples: int = stats.BOOTSTRAP_RESAMPLES
    allow_mismatch: bool = False


class ComparisonReport(_Model):
    """Everything `harness compare` says, as data; renderers only format it."""

    base: SideSummary
    candidate: SideSummary
    settings: Settings
    what_changed: list[ProvenanceChange]
    unfair: list[ProvenanceChange]
    figures: list[FigureResult]
    unmatched_phases: list[str] = []
    tested: int = Field(description="figures in the corrected family")
    counts: dict[str, int]
    exit_status: int

    def by_verdict(self, verdict: Verdict) -> list[FigureResult]:
        """Figures with ``verdict``, largest change first."""
        chosen = [f for f in self.figures if f.verdict == verdict]
        return sorted(chosen, key=lambda f: -abs(f.change if f.change is not None else math.inf))

    def failing(self) -> list[FigureResult]:
        """Regressions that decide the exit status (offset ones excluded)."""
        return [f for f in self.by_verdict("regression") if f.offset_by is None]


@dataclass
class _Samples:
    ref: PhaseRef
    base: list[PhaseFigures]
    candidate: list[PhaseFigures]


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


def _collect(side: ResultSet) -> dict[str, tuple[PhaseRef, list[PhaseFigures]]]:
    out: dict[str, tuple[PhaseRef, list[PhaseFigures]]] = {}
    for _path, result in side.results:
        for run in result.runs:
            info = _metric_info(result, run.workload)
            attached = _attached(result, run.vm)
            for phase in run.phases:
                if phase.status != "ok":
                    continue
                ref = PhaseRef(
                    suite=result.suite.name,
                    workload=run.workload,
                    params=dict(sorted(run.params.items())),
                    vm=run.vm,
                    phase=phase.name,
                )
                key = _phase_key(ref)
                out.setdefault(key, (ref, []))[1].append(phase_figures(phase, info, attached))
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
) -> ComparisonReport:
    """Compare two sides; the report carries its own exit status."""
    diffs = differences([r for _, r in base.results], [r for _, r in candidate.results])
    b_phases, c_phases = _collect(base), _collect(candidate)
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
    _correct(figures, correction)
    for f in figures:
        f.verdict = _verdict(f, alpha, threshold)
    _offset_latency_regressions(figures)

    unfair = [_change(d) for d in diffs if not d.fair]
    counts: dict[str, int] = defaultdict(int)
    for f in figures:
        counts[f.verdict] += 1
    counts["offset"] = sum(1 for f in figures if f.offset_by is not None)
    if not matched or (unfair and not allow_mismatch):
        status = EXIT_BAD_INPUT
    elif any(f.verdict == "regression" and f.offset_by is None for f in figures):
        status = EXIT_REGRESSION
    else:
        status = EXIT_OK
    return ComparisonReport(
        base=_side(base),
        candidate=_side(candidate),
        settings=Settings(
            alpha=alpha,
            threshold=threshold,
            test=test,
            test_description=stats.TESTS[test],
            correction=correction,
            correction_description=stats.CORRECTIONS[correction],
            allow_mismatch=allow_mismatch,
        ),
        what_changed=[_change(d) for d in diffs if d.fair],
        unfair=unfair,
        figures=figures,
        unmatched_phases=unmatched,
        tested=sum(1 for f in figures if f.q is not None),
        counts=dict(counts),
        exit_status=status,
    )


def _side(side: ResultSet) -> SideSummary:
    return SideSummary(
        label=side.label,
        files=[str(p) for p, _ in side.results],
        run_ids=[r.run_id for _, r in side.results],
        excluded=[
            {"path": e.path, "run_id": e.run_id, "status": e.status, "reason": e.reason}
            for e in side.excluded
        ],
    )


def _change(d: FieldDiff) -> ProvenanceChange:
    return ProvenanceChange(
        field=d.field, base=list(d.base), candidate=list(d.candidate), meaning=d.meaning,
        fair=d.fair,
    )


def _figures(s: _Samples, test: stats.TestName) -> Iterable[FigureResult]:
    names = {n for rep in (*s.base, *s.candidate) for n in rep.values}
    fill_zero_counts(s.base, names)
    fill_zero_counts(s.candidate, names)
    names = {n for n in names if not is_whole_path(n, [*s.base, *s.candidate])}
    for name in sorted(names):
        b = [rep.values[name] for rep in s.base if name in rep.values]
        c = [rep.values[name] for rep in s.candidate if name in rep.values]
        meta = next(rep for rep in (*s.base, *s.candidate) if name in rep.values)
        mb = stats.median(b) if b else None
        mc = stats.median(c) if c else None
        fig = FigureResult(
            phase=s.ref,
            figure=name,
            unit=meta.units[name],
            higher_is_better=meta.higher_is_better[name],
            n_base=len(b),
            n_candidate=len(c),
            median_base=mb,
            median_candidate=mc,
            change=stats.relative_change(mb, mc) if mb is not None and mc is not None else None,
            verdict="not enough data",
            only_in="base" if not c else "candidate" if not b else None,
        )
        outcome = stats.two_sample_test(b, c, test)
        identical = outcome is not None and outcome.method.startswith("exact") and mb == mc
        if outcome is not None and not identical:
            # Constant and equal on both sides is no hypothesis: it stays out of the family.
            fig.p, fig.test = outcome.p, outcome.method
            seed = stats.figure_seed(_phase_key(s.ref) + name)
            ci = stats.bootstrap_change_ci(b, c, seed=seed)
            if ci is not None:
                fig.ci_low, fig.ci_high = ci
        elif identical:
            fig.test = outcome.method if outcome else None
            fig.ci_low = fig.ci_high = 0.0
        if name.startswith("time."):
            fig.decomposition = _decompose(name, s)
        yield fig


def _correct(figures: list[FigureResult], correction: stats.Correction) -> None:
    tested = [f for f in figures if f.p is not None]
    for f, q in zip(tested, stats.adjust([f.p for f in tested if f.p is not None], correction),
                    strict=True):
        f.q = q


def _verdict(f: FigureResult, alpha: float, threshold: float) -> Verdict:
    if f.n_base < 2 or f.n_candidate < 2:
        return "not enough data"
    if f.q is None or f.q >= alpha:
        return "no change"
    beyond = f.change is None or abs(f.change) >= threshold  # None: from zero, unbounded
    if not beyond or f.median_base is None or f.median_candidate is None:
        return "no change"
    if f.median_candidate == f.median_base:
        return "no change"
    worse = (f.median_candidate < f.median_base) == f.higher_is_better
    return "regression" if worse else "improvement"


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
        totals = [rep.latency_totals[lat] for rep in reps if lat in rep.latency_totals]
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

