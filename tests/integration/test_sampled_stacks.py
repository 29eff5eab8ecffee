"""Sampled kernel stacks on the real micro KVM guest, both backends, against known answers.

Every emulated instruction of the micro guest passes through x86_emulate_instruction,
and micro.asm fixes how many there are per phase (harness/image/micro.py). A stack on
every Nth event per CPU makes, in a phase of n events, floor or ceil of n_c/N samples
on each CPU c the vCPU ran on (the per-CPU counter carries over between phases). The
sampled runs pin the vCPU to one CPU, so that is floor or ceil of n/N exactly.

A rate target (``name@Rhz``) picks the period from the event rate: its stacks are
weighted by their period, and the weights stand for the phase's events (test below).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.image.micro import MicroPhase, expected_emulated_insns
from harness.paths import SUITES_DIR
from harness.results import RunResult, load
from harness.spec import load_suite
from harness.trace.probes import MAX_STACK_PERIOD
from harness.trace.stacks import wilson

pytestmark = pytest.mark.integration

#: Prime, so that no loop of the guest's has a period that divides it.
PERIOD = 61
PROBE = "kvm_emulate_insn"


def _run(out: Path, stacks: str, tracer: str, pin: int | None = None) -> tuple[Path, RunResult]:
    suite = SUITES_DIR / "micro-kvm.toml"
    if pin is not None:  # the same suite, its vCPU pinned to host CPU ``pin``
        text = suite.read_text().replace("vcpus = 1\n", f"vcpus = 1\npin_vcpus = [{pin}]\n")
        assert "pin_vcpus" in text
        suite = out / "micro-kvm-pinned.toml"
        suite.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(suite),
         "--stacks", stacks, "--tracer", tracer, "--results-dir", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("*.json")
    return path, load(path)


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    return _run(tmp_path_factory.mktemp("exact"), PROBE, "libbpf")[1]


@pytest.fixture(scope="module", params=["libbpf", "bpftrace"])
def sampled_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, RunResult]:
    return _pinned_run(tmp_path_factory.mktemp(f"sampled-{request.param}"),
                       f"{PROBE}/{PERIOD},kvm_cpuid", str(request.param))


def _pinned_run(out: Path, stacks: str, tracer: str) -> tuple[Path, RunResult]:
    """A sampled run with the vCPU pinned to the last CPU: the one least likely to be
    CPU 0's interrupt work."""
    return _run(out, stacks, tracer, pin=(os.cpu_count() or 1) - 1)


def _expected() -> dict[str, int]:
    workload = load_suite(SUITES_DIR / "micro-kvm.toml").workloads["micro-touch"]
    costs = expected_emulated_insns(
        [MicroPhase(s.name, s.pages or 0, s.repeat) for s in workload.phases]
    )
    return {s.name: costs[k] for k, s in enumerate(workload.phases, start=1)}


def test_counts_stay_exact_and_samples_are_every_nth_event(
    sampled_run: tuple[Path, RunResult],
) -> None:
    _, result = sampled_run
    expected = _expected()
    for run in result.runs:
        for phase in run.phases:
            assert phase.trace is not None
            st = phase.trace.stacks[PROBE]
            n = expected[phase.name]
            assert st.events == phase.trace.events_by_probe[PROBE] == n, phase.name
            assert st.period == PERIOD
            # One CPU: floor or ceil of n / N, as the counter carried from earlier phases.
            assert st.stacked in (n // PERIOD, -(-n // PERIOD)), (phase.name, st.stacked)
            # Conservation holds exactly for the samples themselves.
            assert sum(s.count for s in st.stacks) == st.stacked
            assert st.paths["kvm_arch_vcpu_ioctl_run"] == st.stacked
            # All through the emulator: the estimate is the phase's known work, exactly.
            est = st.path_estimates["x86_emulate_instruction"]
            assert est.events == n and est.low < n == est.high
            # The unsampled probe still has every event's stack.
            cpuid = phase.trace.stacks["kvm_cpuid"]
            assert cpuid.period == 1 and cpuid.stacked == cpuid.events == 1
            assert cpuid.path_estimates == {}


def test_every_path_share_is_within_its_interval_of_the_exact_share(
    sampled_run: tuple[Path, RunResult], exact_run: RunResult
) -> None:
    _, result = sampled_run
    exact = {
        (r.repetition, p.name): p.trace.stacks[PROBE]
        for r in exact_run.runs for p in r.phases if p.trace is not None
    }
    checked = 0
    for run in result.runs:
        for phase in run.phases:
            assert phase.trace is not None
            st = phase.trace.stacks[PROBE]
            ex = exact[(run.repetition, phase.name)]
            assert ex.period == 1 and ex.stacked == ex.events
            for fn in set(ex.paths) | set(st.paths):
                truth = ex.paths.get(fn, 0) / ex.events
                lo, hi = wilson(st.paths.get(fn, 0), st.stacked)
                assert lo <= truth <= hi, (phase.name, fn, truth, lo, hi)
                checked += 1
    assert checked > 20


def test_harness_stacks_shows_the_estimates(sampled_run: tuple[Path, RunResult]) -> None:
    path, _ = sampled_run
    tree = subprocess.run(
        [sys.executable, "-m", "harness.cli", "stacks", str(path), "--phase", "touch-16",
         "--probe", PROBE],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    n = 2 * _expected()["touch-16"]  # two repetitions, summed
    assert f"sampled, a stack every {PERIOD} events per CPU" in tree
    assert "x86_emulate_instruction  " in tree and f"(100.0%)  ~{n} [" in tree


# --- the rate target (name@Rhz) ------------------------------------------------------

#: Stacks a second per CPU asked for.
RATE = 2000


@pytest.fixture(scope="module", params=["libbpf", "bpftrace"])
def rate_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, RunResult]:
    return _pinned_run(tmp_path_factory.mktemp(f"rate-{request.param}"),
                       f"{PROBE}@{RATE}hz,kvm_cpuid", str(request.param))


def test_a_rate_target_keeps_counts_exact_and_weights_within_the_events(
    rate_run: tuple[Path, RunResult],
) -> None:
    """Counts exact; the weights stand for the events; about RATE stacks a second.

    Each stack weighs the period in force (the events since the CPU's last stack in
    that phase pair), so per phase 0 <= events - sum of weights, and the difference is
    the events after each CPU's last stack: less than the period then in force, at most
    MAX_STACK_PERIOD, on the one CPU the pinned vCPU runs on, per phase pair it ran in.
    """
    _, result = rate_run
    expected = _expected()
    for run in result.runs:
        for phase in run.phases:
            assert phase.trace is not None and phase.duration_s is not None
            st = phase.trace.stacks[PROBE]
            n = expected[phase.name]
            where = (run.repetition, phase.name)
            assert st.events == phase.trace.events_by_probe[PROBE] == n, where
            assert st.rate_hz == RATE and st.weight is not None and st.weight_sq is not None
            assert 0 < st.stacked < n / 50, (where, st.stacked)
            assert sum(s.count for s in st.stacks) == st.stacked
            assert sum(s.weight or 0 for s in st.stacks) == st.weight
            # The design's exact bound (one CPU, a phase pair or two per phase) ...
            assert 0 <= n - st.weight < 2 * MAX_STACK_PERIOD, (where, n, st.weight)
            # ... and what it comes to here: the period in force at the end is near the
            # mean period (seen: tails of 0.05-0.95 of it), not MAX_STACK_PERIOD.
            assert n - st.weight <= 4 * st.period, (where, n, st.weight, st.period)
            assert st.period == round(st.weight / st.stacked)
            # All through the emulator: share 1 of the weight, the estimate the known work.
            est = st.path_estimates["x86_emulate_instruction"]
            assert est.share == 1 and est.events == n and est.low < n == est.high, where
            assert est.effective_samples == st.effective_samples
            # Generous: the adaptation starts at period 1 in each phase (its first few
            # stacks come faster), and TCG/PVM timing jitters; seen here 1990-2030 a second.
            per_s = st.stacked / phase.duration_s
            assert RATE / 3 < per_s < RATE * 3, (where, per_s)
            # The unsampled probe is untouched by the rate target.
            cpuid = phase.trace.stacks["kvm_cpuid"]
            assert cpuid.rate_hz is None and cpuid.stacked == cpuid.events == 1


def test_harness_stacks_shows_the_rate_and_the_mean_period(
    rate_run: tuple[Path, RunResult],
) -> None:
    path, result = rate_run
    tree = subprocess.run(
        [sys.executable, "-m", "harness.cli", "stacks", str(path), "--phase", "touch-16",
         "--probe", PROBE],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    n = 2 * _expected()["touch-16"]  # two repetitions, summed
    stacked = sum(p.trace.stacks[PROBE].stacked for r in result.runs for p in r.phases
                  if p.name == "touch-16" and p.trace is not None)
    assert f"sampled at about {RATE} stacks/s per CPU: {stacked} stacks of {n} events" in tree
    assert "x86_emulate_instruction  " in tree and f"(100.0%)  ~{n} [" in tree
