"""What `harness run` prints after its table: warm-ups, drifting figures, a busy host."""

from __future__ import annotations

import pytest

from harness.cli import _print_table
from harness.host.load import HostLoad
from tests.unit.test_compare_verdicts import booted


def test_the_summary_names_warm_ups_drift_and_a_busy_host(
    capsys: pytest.CaptureFixture[str],
) -> None:
    r = booted("r", [[300.0, 400.0, 440.0], [280.0, 390.0, 430.0]], warm=[100.0, 90.0])
    r.steady_state = ["touch[mib=64] vm1/touch metric.mib_per_s: drifts +20.0% per repetition"]
    r.host_load = HostLoad(cpus=2, loadavg_start=[1, 1, 1], other_cpu_share=0.48, busy=True)
    _print_table(r)
    out = capsys.readouterr().out
    assert "1 (warm-up)" in out
    assert "2 warm-up repetition(s) recorded, never compared" in out
    assert "not steady: touch[mib=64] vm1/touch metric.mib_per_s" in out
    assert "busy host: processes outside this run used 48%" in out


def test_a_quiet_run_says_nothing_more(capsys: pytest.CaptureFixture[str]) -> None:
    r = booted("q", [[1.0, 1.0]])
    r.host_load = HostLoad(cpus=2, loadavg_start=[0, 0, 0], other_cpu_share=0.01)
    _print_table(r)
    out = capsys.readouterr().out
    assert "warm-up" not in out and "not steady" not in out and "busy host" not in out
