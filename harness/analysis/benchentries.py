"""A run's phases as pytest-benchmark entries, for users of ``pytest-benchmark compare``.

One entry per (workload, parameters, VM, phase): the rounds are the phase's
durations over the repetitions, exactly as the harness measured them (the
benchmark replays them through a clock; see tests/bench/test_suite_phases.py),
and ``extra_info`` carries the workload metrics and trace aggregates
(medians over the repetitions). `harness compare` remains the tool with
statistics; this is the familiar view.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness.results import PhaseResult, RunResult, load


@dataclass(frozen=True)
class BenchEntry:
    """One phase of a suite run as a benchmark: an id, its durations and its figures."""

    id: str
    group: str
    durations_s: tuple[float, ...]
    extra_info: dict[str, object] = field(default_factory=dict)


def _median_dict(dicts: list[dict[str, int]] | list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for d in dicts for k in d})
    return {k: statistics.median(d.get(k, 0) for d in dicts) for k in keys}


def entries(result: RunResult) -> list[BenchEntry]:
    """One entry per phase identity, in the order the suite ran them; warm-up repetitions
    are left out, as compare leaves them out."""
    grouped: dict[str, list[PhaseResult]] = {}  # insertion order = run order
    for run in result.runs:
        if run.warmup:
            continue
        params = ",".join(f"{k}={v}" for k, v in sorted(run.params.items()))
        for phase in run.phases:
            if phase.status == "ok" and phase.duration_s is not None:
                ident = f"{run.workload}[{params}]:{run.vm}:{phase.name}"
                grouped.setdefault(ident, []).append(phase)
    return [
        BenchEntry(
            id=ident,
            group=f"suite {result.suite.name}",
            durations_s=tuple(p.duration_s or 0.0 for p in phases),
            extra_info=_extra(result, phases),
        )
        for ident, phases in grouped.items()
    ]


def _extra(result: RunResult, phases: list[PhaseResult]) -> dict[str, object]:
    info: dict[str, object] = {
        "run_id": result.run_id,
        "repetitions": len(phases),
        "timing": phases[0].timing,
        "metrics": _median_dict([dict(p.metrics) for p in phases]),
    }
    traces = [p.trace for p in phases if p.trace is not None]
    if traces:
        info["trace"] = {
            "attribution": traces[0].attribution,
            "events_total": statistics.median(t.events_total for t in traces),
            "exits": _median_dict([t.exits for t in traces]),
            "mmu_faults": _median_dict([t.mmu_faults for t in traces]),
            "events_by_probe": _median_dict([t.events_by_probe for t in traces]),
            "cr_writes": _median_dict([t.cr_writes for t in traces]),
        }
    return info


def newest_complete(results_dir: Path) -> Path | None:
    """The newest complete result file in ``results_dir`` (by its start time), if any."""
    best: tuple[str, Path] | None = None
    for path in _candidates(results_dir):
        try:
            r = load(path)
        except Exception:  # other JSON, or an old schema: not this run's result
            continue
        if r.status == "complete" and (best is None or r.started_at.isoformat() > best[0]):
            best = (r.started_at.isoformat(), path)
    return best[1] if best else None


def _candidates(results_dir: Path) -> Iterator[Path]:
    if results_dir.is_dir():
        yield from (p for p in results_dir.glob("*.json") if p.name != "schema.json")
