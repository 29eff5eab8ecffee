"""The tracer process (whichever backend the run chose) is SIGKILLed mid-phase.

tests/integration/test_run_linux.py::test_tracer_death_is_reported_and_the_workload_goes_on
covers the result file; this adds the other two checks of the fault suite: no
QEMU, run directory or tracer of the run is left, and the next run succeeds.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from harness.image.linux import LinuxImage
from tests.conftest import stray_tracers
from tests.faults.helpers_b import (  # noqa: F401 (an autouse fixture)
    assert_before_kept,
    assert_next_run_succeeds,
    assert_nothing_left,
    by_workload,
    fault_workload,
    finish,
    nothing_left_behind_by_fault,
    only_result,
    start_run,
    wait_for_phase,
    write_fault_suite,
)


@pytest.mark.timeout(150)
def test_tracer_killed_mid_phase(tmp_path: Path, guest_image: LinuxImage) -> None:
    suite = write_fault_suite(
        tmp_path, {"fault-tracer": fault_workload("fault-tracer", "sleep 4", 60)},
        [("fault-tracer", "a")],
    )
    results = tmp_path / "results"
    proc = start_run(suite, results)
    try:
        data = wait_for_phase(proc, results, "fault-tracer", "fault")
        (tracer,) = [t for t in stray_tracers() if data["run_id"] in t]
        os.kill(int(tracer.split()[0]), signal.SIGKILL)
        code, err = finish(proc, 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code == 1, err[-3000:]  # measured, but not everything that was asked for
    data = only_result(results)
    assert data["status"] == "failed"
    assert data["vms"][0]["trace"]["tracer_status"] == "died"
    assert any("tracer of VM a died during phase 2 (fault)" in e for e in data["errors"])
    run = by_workload(data)[("fault-tracer", "a")]
    assert_before_kept(run)
    assert run["phases"][0]["trace"] is not None  # traced before the tracer died
    # The workload itself went on: its phases are measured, only untraced.
    assert [p["status"] for p in run["phases"]] == ["ok", "ok", "ok"]
    assert run["phases"][1]["trace"] is None and run["phases"][2]["trace"] is None
    assert data["vms"][0]["ended_early"] is None
    assert_nothing_left(data["run_id"])
    assert_next_run_succeeds(tmp_path)
