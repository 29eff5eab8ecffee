"""The figures of one measured phase: workload metrics and per-phase trace aggregates.

A figure is one number per repetition, with the direction in which it is
better. ``path.<probe>.<function>`` counts the probe's events whose kernel
stack passed through the function (recorded with ``--stacks``): "root lookups
via kvm_mmu_load" against "via kvm_mmu_reset_context". Workload metrics take
their direction from the workload (recorded in the result); trace figures
count work KVM did, so fewer is better.

Count families (exits by reason, faults by kind, events by probe, CR writes)
are sparse: a reason that did not occur is absent, not 0. Within a phase that
was traced, an absent key is a count of 0, so it is filled in wherever the
key appears in any repetition of either side (see :func:`fill_zero_counts`).

Where the trace has both a count and a latency histogram for one kind of
event (``exit_to_entry`` for exits, ``page_fault_to_entry`` for MMU faults),
``time.<name>`` is the total time spent (count x mean latency) and the
decomposition of its change into "more events" and "each event slower" is
carried alongside (see compare.py). The mean comes from the log2 buckets'
midpoints: exact sums are not kept in the kernel, and the same estimator on
both sides makes the ratio meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.results import MetricInfo, PhaseResult
from harness.trace.model import HistBucketModel, PhaseTrace
from harness.trace.stacks import sample_sums

PERCENTILES = (50, 90, 99)


@dataclass
class PhaseFigures:
    """Every figure of one phase repetition, and the families whose absent keys mean 0."""

    values: dict[str, float] = field(default_factory=dict)
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    #: figure-name prefixes of sparse counts whose absent keys are 0 here: families whose
    #: probe was attached (``events.<probe>`` counts only for attached probes, below)
    count_families: set[str] = field(default_factory=set)
    #: probes attached when this repetition ran (None: unknown, every probe counts)
    attached: frozenset[str] | None = None
    #: latency name -> (events counted by its histogram, estimated total ns)
    latency_totals: dict[str, tuple[int, float]] = field(default_factory=dict)
    #: sampled ``path.*`` figures -> (weights of the samples through the function, of all
    #: the probe's samples, the same for squared weights, the probe's exact events): what
    #: the estimate's sampling noise is derived from (stacks.sample_sums; a fixed period N
    #: weighs each sample N)
    sampled: dict[str, tuple[int, int, int, int, int]] = field(default_factory=dict)


#: Sparse count families and the probe that must be attached for an absent key to mean 0.
COUNT_FAMILIES: dict[str, str | None] = {
    "exits.": "kvm_exit",
    "mmu_faults.": "kvm_page_fault",
    "pf_error.": "kvm_page_fault",
    "cr_writes.": "kvm_cr",
    "events.": None,  # per key: events.<probe> needs <probe>
}


def phase_figures(
    phase: PhaseResult,
    metric_info: dict[str, MetricInfo],
    attached: frozenset[str] | None = None,
) -> PhaseFigures:
    """The figures of one finished phase; ``attached``: the probes its tracer attached.

    A probe missing from ``attached`` leaves its figures absent rather than 0, so
    a function that vanished in a kernel reads as "not measured", never as -100%.
    """
    out = PhaseFigures(attached=attached)
    for name, value in phase.metrics.items():
        info = metric_info.get(name, MetricInfo())
        _put(out, f"metric.{name}", value, info.higher_is_better, info.unit)
    if phase.duration_s is not None:
        _put(out, "duration_s", phase.duration_s, False, "s")
    if phase.trace is not None:
        _trace_figures(out, phase.trace)
    return out


def _put(out: PhaseFigures, name: str, value: float, higher: bool, unit: str) -> None:
    out.values[name] = float(value)
    out.higher_is_better[name] = higher
    out.units[name] = unit


def _trace_figures(out: PhaseFigures, t: PhaseTrace) -> None:
    out.count_families.update(
        prefix
        for prefix, probe in COUNT_FAMILIES.items()
        if probe is None or out.attached is None or probe in out.attached
    )
    counts: list[tuple[str, dict[str, int]]] = [
        ("exits.", t.exits),
        ("mmu_faults.", t.mmu_faults),
        ("pf_error.", t.page_faults_by_error),
        ("events.", t.events_by_probe),
        ("cr_writes.", {f"cr{k}": v for k, v in t.cr_writes.items()}),
    ]
    for prefix, family in counts:
        for key, n in family.items():
            _put(out, prefix + key, n, False, "events")
    _put(out, "trace.events_total", t.events_total, False, "events")
    for probe, st in t.stacks.items():
        # Events of `probe` whose kernel stack passed through a function; absent = 0 here.
        out.count_families.add(f"path.{probe}.")
        for fn, n in st.paths.items():
            # Sampled stacks: the estimate (share of samples x exact events), not samples.
            est = st.path_estimates.get(fn)
            _put(out, f"path.{probe}.{fn}", est.events if est else n, False, "events")
            sums = sample_sums(st, fn) if est is not None else None
            if sums is not None:
                out.sampled[f"path.{probe}.{fn}"] = (*sums, st.events)
    if t.root_loads is not None:
        _put(out, "trace.root_loads", t.root_loads, False, "loads")
    for name, buckets in t.latency_ns.items():
        n = sum(b.count for b in buckets)
        if n == 0:
            continue
        total = sum(b.count * _midpoint(b) for b in buckets)
        out.latency_totals[name] = (n, total)
        _put(out, f"time.{name}_ns", total, False, "ns")
        _put(out, f"latency.{name}.mean_ns", total / n, False, "ns")
        for q in PERCENTILES:
            _put(out, f"latency.{name}.p{q}_ns", hist_percentile(buckets, q), False, "ns")


def _midpoint(b: HistBucketModel) -> float:
    low = 0 if b.low is None or b.low < 0 else b.low
    return (low + b.high) / 2


def hist_percentile(buckets: list[HistBucketModel], q: float) -> float:
    """The q-th percentile of a log2 histogram, interpolated linearly inside its bucket."""
    ordered = sorted(buckets, key=lambda b: b.high)
    n = sum(b.count for b in ordered)
    if n == 0:
        return float("nan")
    rank = q / 100 * n
    seen = 0
    for b in ordered:
        if b.count and seen + b.count >= rank:
            low = 0 if b.low is None or b.low < 0 else b.low
            return low + (b.high - low) * (rank - seen) / b.count
        seen += b.count
    return float(ordered[-1].high)


#: Units of figures that count events: judged as counts (stats.compare_figure).
COUNT_UNITS = frozenset({"events", "loads"})


def is_count(name: str, unit: str) -> bool:
    """Whether figure ``name`` counts events (exits, faults, root lookups, path counts).

    A sampled path's estimate is not a count: its noise is the sampling's (see
    :func:`harness.analysis.stats.sampling_test`), far above a Poisson count's.
    """
    return unit in COUNT_UNITS and not name.startswith(("metric.", "time.", "latency."))


def is_whole_path(name: str, reps: list[PhaseFigures]) -> bool:
    """Whether ``path.<probe>.<fn>`` covers all of the probe's events in every repetition.

    Such a function is on every stack (the syscall entry, the ioctl, the vCPU
    loop): it repeats ``events.<probe>`` and tells no path from another.
    """
    if not name.startswith("path."):
        return False
    probe = name.split(".")[1]
    have = [r for r in reps if name in r.values]
    return bool(have) and all(r.values[name] == r.values.get(f"events.{probe}") for r in have)


def fill_zero_counts(reps: list[PhaseFigures], names: set[str]) -> None:
    """Give every traced repetition a 0 for each sparse count key it lacks and could see."""
    for rep in reps:
        for name in names:
            if name in rep.values or not any(name.startswith(f) for f in rep.count_families):
                continue
            probe = name.removeprefix("events.") if name.startswith("events.") else None
            if probe is not None and rep.attached is not None and probe not in rep.attached:
                continue  # not attached: unknown, not 0
            _put(rep, name, 0.0, False, "events")
