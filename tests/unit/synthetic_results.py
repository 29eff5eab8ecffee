"""Tiny result files for CLI tests: one workload phase, one metric, no trace.

Built through the real result model and written with the real writer, so
`harness compare` and `harness stacks` read them as they read a run's.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

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
from tests.unit.test_results import host


def result(run_id: str, throughput: float, accelerator: str = "kvm") -> RunResult:
    """One complete run of workload "touch": one repetition, one phase, one metric."""
    phase = PhaseResult(index=1, name="touch", status="ok", duration_s=1.0,
                        metrics={"mib_per_s": throughput})
    return RunResult(
        run_id=run_id,
        status="complete",
        started_at=datetime.now(UTC),
        harness_version="0.1.0",
        command_line=["harness", "run"],
        suite=SuiteRef(name="s", path="/s.toml", sha256="0" * 64),
        host=host(),
        vms=[VmRecord(name="vm1", domain="d", image="linux", image_digest="a" * 64,
                      accelerator=accelerator,  # type: ignore[arg-type]
                      accelerator_reason="r", vcpus=1, memory_mib=512, marker_token=1)],
        runs=[WorkloadRun(workload="touch", vm="vm1", repetition=1, params={"mib": 64},
                          status="ok", phases=[phase])],
        workloads={"touch": WorkloadInfo(metrics={"mib_per_s": MetricInfo(unit="MiB/s")})},
    )


def side(folder: Path, throughputs: list[float]) -> Path:
    """A folder of one result file per value (each its own run and boot): a compare side."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, value in enumerate(throughputs):
        write_atomic(result(f"{folder.name}-{i}", value), folder / f"{folder.name}-{i}.json")
    return folder


#: Five runs a side, 1% apart: enough for a verdict on a 20% change.
STEADY = [1000.0, 1010.0, 990.0, 1005.0, 995.0]
