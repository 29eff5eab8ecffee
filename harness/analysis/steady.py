"""Steady state: does a figure still drift across the repetitions of a boot?

A first repetition that pays for a cold TCG translation cache, or for the
guest's first touch of its memory (EPT violations / NPF that later ones do
not take), is a warm-up, not a sample. Workloads declare warm-up repetitions
(``warmup``); this check tells whether they declared enough: the slope of each
figure against its repetition's place in the boot, boots held fixed
(stats.trend). A drift of at least ``STEADY_TOLERANCE`` per repetition that
is also significant is written into the result and shown by compare.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.results import RunResult


def _figures(phase_metrics: dict[str, float], duration: float | None,
             events: int | None) -> dict[str, float]:
    """The figures checked: the workload's own numbers, the phase's duration, its events."""
    out = {f"metric.{k}": v for k, v in phase_metrics.items()}
    if duration is not None:
        out["duration_s"] = duration
    if events is not None:
        out["trace.events_total"] = float(events)
    return out


def steady_state_notes(result: RunResult) -> list[str]:
    """One line per (VM, workload, parameters, phase, figure) that has not reached steady
    state over the measured repetitions of its boots.

    A figure measured once has nothing to drift: a run with one measured repetition
    per figure (most short runs) is answered without loading the statistics (scipy,
    about a second of every `harness run`).
    """
    measured: Counter[tuple[str, str, str, str]] = Counter()
    for run in result.runs:
        if not run.warmup:
            for ph in run.phases:
                if ph.status == "ok":
                    measured[(run.vm, run.workload, str(sorted(run.params.items())), ph.name)] += 1
    if all(n < 2 for n in measured.values()):
        return []
    from harness.analysis import stats
    from harness.analysis.compare import boot_key

    series: dict[tuple[str, str, str, str, str], dict[str, list[float]]] = {}
    for run in result.runs:
        if run.warmup:
            continue
        params = ",".join(f"{k}={v}" for k, v in sorted(run.params.items()))
        boot = boot_key(result, run)
        for ph in run.phases:
            if ph.status != "ok":
                continue
            events = ph.trace.events_total if ph.trace is not None else None
            for name, value in _figures(ph.metrics, ph.duration_s, events).items():
                key = (run.vm, run.workload, params, ph.name, name)
                series.setdefault(key, {}).setdefault(boot, []).append(value)
    notes = []
    for (vm, workload, params, phase, name), boots in sorted(series.items()):
        t = stats.trend(list(boots.values()))
        if t is None or t.steady():
            continue
        label = f"{workload}[{params}]" if params else workload
        notes.append(
            f"{label} {vm}/{phase} {name}: drifts {t.per_repetition * 100:+.1f}% per "
            f"repetition within boots (p {t.p:.2g}); not at steady state: raise the "
            "workload's warmup or the run's"
        )
    return notes
