"""The micro KVM guest through the real orchestrator and libvirt (domain type kvm):
real KVM events, exact guest-marker attribution, events proportional to work."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from harness.image.micro import MicroPhase, expected_emulated_insns
from harness.paths import RESULTS_DIR, SUITES_DIR
from harness.spec import load_suite
from tests.conftest import harness_domains, stray_tracers

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("backend", ["bpftrace", "libbpf"])
def test_micro_suite_attributes_every_event_to_its_phase(tmp_path: Path, backend: str) -> None:
    suite = load_suite(SUITES_DIR / "micro-kvm.toml")
    workload = suite.workloads["micro-touch"]
    results = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "run",
            str(suite.path),
            "--results-dir",
            str(results),
            "--quiet",
            "--tracer",
            backend,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = results.glob("*.json")
    data: dict[str, Any] = json.loads(path.read_text())
    jsonschema.validate(data, json.loads((RESULTS_DIR / "schema.json").read_text()))
    assert data["status"] == "complete"
    assert len(data["runs"]) == suite.spec.repetitions

    for vm in data["vms"]:
        assert vm["accelerator"] == "kvm"
        assert vm["trace"]["tracer_status"] == "ok"
        assert vm["trace"]["backend"] == backend
        assert vm["trace"]["backend_reason"] == f"{backend} was asked for"
        assert "kvm_emulate_insn" in vm["trace"]["probes_attached"]
        assert vm["trace"]["lost_events"] == 0

    for run in data["runs"]:
        phases = run["phases"]
        assert [p["name"] for p in phases] == [p.name for p in workload.phases]
        expected = expected_emulated_insns(
            [MicroPhase(s.name, s.pages or 0, s.repeat) for s in workload.phases]
        )
        for k, (p, spec) in enumerate(zip(phases, workload.phases, strict=True), start=1):
            tr = p["trace"]
            # Every marker the guest executed was seen exactly once, on the guest channel.
            assert tr["markers_seen"] == 1 and tr["attribution"] == "guest-marker"
            assert p["timing"] == "guest-marker" and p["duration_s"] > 0
            # Between marker k and k+1 the guest runs only phase k's code: exactly the
            # instructions micro.asm executes there.
            assert tr["emulated_insns"] == expected[k], (spec.name, expected[k], tr)
        first = phases[0]["trace"]["emulated_insns"]
        ratios = [p["trace"]["emulated_insns"] / first for p in phases]
        pages = [s.pages or 0 for s in workload.phases]
        for ratio, n in zip(ratios, pages, strict=True):
            assert ratio == pytest.approx(n / pages[0], rel=0.01)
        # Phases are ordered and back to back, as the guest ran them.
        for a, b in itertools.pairwise(phases):
            assert a["end_ns"] == b["start_ns"]

    run_id = data["run_id"]
    assert not [d for d in harness_domains() if run_id in d]
    assert not [t for t in stray_tracers() if run_id in t]


def test_auto_falls_back_to_bpftrace_where_libbpf_cannot_load(tmp_path: Path) -> None:
    """A host without kernel BTF (simulated: the BTF path points at a missing file)."""
    missing = tmp_path / "no-such-btf"
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(SUITES_DIR / "micro-kvm.toml"),
         "--results-dir", str(results), "--quiet"],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "HARNESS_LIBBPF_BTF": str(missing)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = results.glob("*.json")
    data: dict[str, Any] = json.loads(path.read_text())
    assert data["status"] == "complete"
    for vm in data["vms"]:
        trace = vm["trace"]
        assert trace["backend"] == "bpftrace" and trace["tracer_status"] == "ok"
        assert trace["backend_reason"].startswith("auto: libbpf unavailable")
        assert str(missing) in trace["backend_reason"]
    # The figures are still exact: the fallback traces the same events.
    for run in data["runs"]:
        assert all(p["trace"]["markers_seen"] == 1 for p in run["phases"])
