"""Figures of a phase: names, directions, sparse counts, latency percentiles and totals."""

from __future__ import annotations

import numpy as np
import pytest

from harness.analysis.figures import fill_zero_counts, hist_percentile, phase_figures
from harness.results import MetricInfo, PhaseResult
from harness.trace.model import HistBucketModel, PhaseTrace


def test_percentile_of_a_log2_histogram_interpolates_inside_its_bucket() -> None:
    buckets = [
        HistBucketModel(low=0, high=0, count=0),
        HistBucketModel(low=1024, high=2047, count=50),
        HistBucketModel(low=2048, high=4095, count=50),
    ]
    # Rank 50 of 100 ends the first bucket; rank 75 is halfway into the second.
    assert hist_percentile(buckets, 50) == pytest.approx(2047)
    assert hist_percentile(buckets, 75) == pytest.approx(2048 + 2047 * 0.5)
    # The same answer as numpy on values spread evenly through each bucket.
    values = np.concatenate([np.linspace(1024, 2047, 50), np.linspace(2048, 4095, 50)])
    assert hist_percentile(buckets, 90) == pytest.approx(np.percentile(values, 90), rel=0.02)


def test_phase_figures_names_and_directions() -> None:
    trace = PhaseTrace(
        attribution="guest-marker",
        markers_seen=1,
        marker_ns=5,
        exits={"EPT_VIOLATION": 10},
        mmu_faults={"ept_violation": 10},
        cr_writes={"3": 4},
        cr3_writes=4,
        root_loads=2,
        events_by_probe={"kvm_exit": 10},
        events_total=10,
        latency_ns={"exit_to_entry": [HistBucketModel(low=512, high=1023, count=10)]},
    )
    phase = PhaseResult(index=1, name="p", status="ok", duration_s=2.0,
                        metrics={"ops": 5.0, "lat_ms": 3.0}, trace=trace)
    figs = phase_figures(phase, {"lat_ms": MetricInfo(unit="ms", higher_is_better=False)})
    assert figs.values["metric.ops"] == 5.0 and figs.higher_is_better["metric.ops"]
    assert not figs.higher_is_better["metric.lat_ms"] and figs.units["metric.lat_ms"] == "ms"
    assert figs.values["exits.EPT_VIOLATION"] == 10
    assert figs.values["cr_writes.cr3"] == 4 and figs.values["trace.root_loads"] == 2
    assert not figs.higher_is_better["duration_s"]
    # count x mean latency (bucket midpoint 767.5 ns)
    assert figs.values["time.exit_to_entry_ns"] == pytest.approx(10 * 767.5)
    assert figs.latency_totals["exit_to_entry"] == (10, pytest.approx(7675.0))


def test_absent_counts_are_zero_only_where_the_phase_was_traced() -> None:
    traced = phase_figures(
        PhaseResult(index=1, name="p", status="ok",
                    trace=PhaseTrace(attribution="host-window", markers_seen=0, marker_ns=None)),
        {},
    )
    untraced = phase_figures(PhaseResult(index=1, name="p", status="ok"), {})
    fill_zero_counts([traced, untraced], {"exits.HLT", "metric.ops"})
    assert traced.values["exits.HLT"] == 0.0
    assert "metric.ops" not in traced.values  # a missing metric is missing, not 0
    assert "exits.HLT" not in untraced.values
