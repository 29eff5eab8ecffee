"""Result files built in memory, shared by the input-boundary tests and the fuzz suite."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.results import (
    MetricInfo,
    PhaseResult,
    RunResult,
    SuiteRef,
    VmRecord,
    WorkloadInfo,
    WorkloadRun,
    write_atomic,
)
from harness.trace.model import PhaseTrace, TraceSummary
from harness.trace.stacks import probe_stacks
from tests.unit.test_results import host


def stack_trace(paths: dict[tuple[str, ...], int], probe: str = "kvm_mmu_get_page") -> PhaseTrace:
    """A phase trace whose only content is ``probe``'s stacks (outermost frame first)."""
    from collections import Counter

    total = sum(paths.values())
    return PhaseTrace(
        attribution="guest-marker", markers_seen=1, marker_ns=1,
        events_by_probe={probe: total}, events_total=total,
        stacks=probe_stacks({probe: Counter(paths)}, {probe: total}, depth=32),
    )


def a_result(
    run_id: str,
    values: list[float],
    *,
    params: list[dict[str, str | int | float]] | None = None,
    workload: str = "touch",
    phase: str = "touch",
    trace: PhaseTrace | None = None,
    status: str = "complete",
) -> RunResult:
    """A complete run: one repetition of ``workload`` per value (metric ``mib_per_s``)."""
    runs = [
        WorkloadRun(
            workload=workload, vm="vm1", repetition=i + 1,
            params=(params[i] if params else {"mib": 64}), status="ok",
            phases=[PhaseResult(index=1, name=phase, status="ok", duration_s=1.0,
                                metrics={"mib_per_s": v}, trace=trace)],
        )
        for i, v in enumerate(values)
    ]
    return RunResult(
        run_id=run_id,
        status=status,  # type: ignore[arg-type]
        started_at=datetime(2026, 12, 1, tzinfo=UTC),
        harness_version="0.1.0",
        command_line=["harness", "run"],
        suite=SuiteRef(name="s", path="/s.toml", sha256="0" * 64),
        host=host(),
        vms=[VmRecord(
            name="vm1", domain="d", image="linux", image_digest="a" * 64, accelerator="kvm",
            accelerator_reason="r", vcpus=2, memory_mib=1024, marker_token=1,
            trace=TraceSummary(tracer_status="ok", probes_attached=["kvm_page_fault"],
                               program_template_sha256="t"),
        )],
        runs=runs,
        workloads={workload: WorkloadInfo(metrics={"mib_per_s": MetricInfo(unit="MiB/s")})},
    )


def save(directory: Path, result: RunResult) -> Path:
    """``result`` written as the harness writes it; its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{result.run_id}.json"
    write_atomic(result, path)
    return path


def document(result: RunResult) -> dict[str, Any]:
    """``result`` as the JSON document a file holds."""
    data: dict[str, Any] = json.loads(result.model_dump_json())
    return data
