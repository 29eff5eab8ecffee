"""Sampled kernel stacks: the ``name/N`` entries, both backends' programs, and the estimates."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from harness.analysis import callpaths
from harness.analysis.compare import compare
from harness.analysis.figures import phase_figures
from harness.analysis.resultset import load_side
from harness.analysis.stats import sampling_test
from harness.spec import SpecError, load_suite
from harness.trace import libbpf as L
from harness.trace import probes as P
from harness.trace.model import PhaseTrace, ProbeStacks
from harness.trace.parse import StackMapOutput, parse_line
from harness.trace.program import ProgramError, check_program, generate, probe_id
from harness.trace.stacks import path_estimates, probe_stacks, wilson
from tests.unit.test_compare import run_result, save
from tests.unit.test_trace_libbpf import BUILT, lb_status
from tests.unit.test_trace_program import T1, T2, fake_status, needs_bpftrace

EMUL = ("entry", "kvm_arch_vcpu_ioctl_run", "x86_emulate_instruction")
PIO = ("entry", "kvm_arch_vcpu_ioctl_run", "handle_io", "x86_emulate_instruction")


def test_entries_split_into_probe_and_period() -> None:
    assert P.split_stack_entry("kvm_emulate_insn/64") == ("kvm_emulate_insn", 64, None)
    assert P.split_stack_entry("kvm_emulate_insn") == ("kvm_emulate_insn", 1, None)
    for bad in ("kvm_emulate_insn/0", "kvm_emulate_insn/", "kvm_emulate_insn/x",
                "kvm_emulate_insn/-3", f"kvm_emulate_insn/{P.MAX_STACK_PERIOD + 1}"):
        with pytest.raises(ValueError, match=r"must be a whole number in 1\.\.1048576.*"
                           r"kvm_emulate_insn/64"):
            P.split_stack_entry(bad)


def test_periods_resolve_groups_and_a_name_overrides_its_group() -> None:
    traced = P.select(["all"])
    got = P.stack_periods(["stacks/8", "kvm_mmu_get_page/2", "kvm_emulate_insn"], traced)
    assert got["kvm_mmu_get_page"] == 2 and got["kvm_emulate_insn"] == 1
    assert got["kvm_mmu_load"] == 8
    assert P.stack_entries(["kvm_emulate_insn/64", "kvm_cpuid"]) == [
        "kvm_cpuid", "kvm_emulate_insn/64"]
    with pytest.raises(ValueError, match="kvm_emulate_insn is listed with periods 64 and 8"):
        P.stack_periods(["kvm_emulate_insn/64", "kvm_emulate_insn/8"])


def _suite(tmp_path: Path, stacks: str) -> Path:
    suite = tmp_path / "s.toml"
    suite.write_text(
        'name = "s"\n[[vms]]\nname = "m"\nimage = "micro"\n'
        '[[runs]]\nworkload = "micro-touch"\nvm = "m"\n'
        f'[trace]\nprobes = ["all"]\nstacks = {stacks}\n'
    )
    return suite


def test_suite_names_a_bad_period_and_the_fix(tmp_path: Path) -> None:
    assert load_suite(_suite(tmp_path, '["kvm_emulate_insn/64"]')).spec.trace.stacks == [
        "kvm_emulate_insn/64"]
    with pytest.raises(SpecError, match=r"stacks.*'kvm_emulate_insn/0'.*kvm_emulate_insn/64"):
        load_suite(_suite(tmp_path, '["kvm_emulate_insn/0"]'))
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "validate",
         str(_suite(tmp_path, '["kvm_emulate_insn/zero"]'))],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2 and "kvm_emulate_insn/zero" in proc.stderr, proc.stderr


def test_bpftrace_program_samples_with_a_per_cpu_counter() -> None:
    sts = [fake_status("kvm_cpuid"), fake_status("kvm_emulate_insn"), fake_status("kvm_exit")]
    prog = generate(sts, [T1, T2], stacks=["kvm_emulate_insn/64", "kvm_cpuid"])
    ident = probe_id("kvm_emulate_insn")
    body = [ln.strip() for ln in prog.text.splitlines()]
    at = body.index(f"$n = @scnt[pid, cpu, {ident}] + 1;")
    # The exact count comes before the sampling, unconditionally.
    assert body[at - 1] == f"@evt[pid, tid, $g, $h, {ident}] = count();"
    assert body[at + 1:at + 6] == [
        "if ($n >= 64) {", "$n = 0;",
        f"@stk[pid, $g, $h, {ident}, kstack(36)] = count();", "}",
        f"@scnt[pid, cpu, {ident}] = $n;",
    ]
    # The unsampled probe stacks every event; the counters are not a result.
    assert f"@stk[pid, $g, $h, {probe_id('kvm_cpuid')}, kstack(36)] = count();" in body
    assert "clear(@scnt);" in prog.text
    assert prog.stack_periods == (("kvm_emulate_insn", 64),)
    with pytest.raises(ProgramError, match="listed with periods 64 and 8"):
        generate(sts, [T1], stacks=["kvm_emulate_insn/64", "kvm_emulate_insn/8"])
    with pytest.raises(ProgramError, match="whole number"):
        generate(sts, [T1], stacks=["kvm_emulate_insn/0"])


@needs_bpftrace
def test_bpftrace_compiles_a_sampling_program() -> None:
    sts = [fake_status("kvm_cpuid"), fake_status("kvm_emulate_insn"), fake_status("kvm_exit")]
    check_program(generate(sts, [T1, T2], stacks=["kvm_emulate_insn/7", "kvm_exit/3"]).text)


def test_libbpf_configuration_carries_the_period() -> None:
    prog = L.generate(lb_status(), [T1], BUILT, stacks=["kvm_emulate_insn/64", "kvm_cpuid"])
    lines = prog.text.splitlines()
    assert "stack kvm_emulate_insn 64" in lines and "stack kvm_cpuid" in lines
    assert prog.stack_periods == (("kvm_emulate_insn", 64),)
    # Unsampled stacks configure as before: the same program template digest.
    a = L.generate(lb_status(), [T1], BUILT, stacks=["kvm_cpuid"])
    b = L.generate(lb_status(), [T1], BUILT, stacks=["kvm_cpuid/1"])
    assert a.template_sha256 == b.template_sha256


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (3, 1000), (997, 1000)])
def test_wilson_interval_matches_scipy(k: int, n: int) -> None:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(ci.low, abs=1e-9) and hi == pytest.approx(ci.high, abs=1e-9)
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match=r"k=11 must be in 0\.\.n=10"):
        wilson(11, 10)


def test_sampled_paths_are_sample_counts_with_scaled_estimates() -> None:
    # 640 events, period 64: 10 samples, 7 of them through handle_io.
    got = probe_stacks({"kvm_emulate_insn": Counter({PIO: 7, EMUL: 3})},
                       {"kvm_emulate_insn": 640}, depth=32,
                       periods={"kvm_emulate_insn": 64})["kvm_emulate_insn"]
    # Conservation holds exactly for the samples themselves.
    assert (got.period, got.stacked, sum(s.count for s in got.stacks)) == (64, 10, 10)
    assert got.paths["x86_emulate_instruction"] == 10 and got.paths["handle_io"] == 7
    io = got.path_estimates["handle_io"]
    lo, hi = wilson(7, 10)
    assert (io.share, io.share_low, io.share_high) == (0.7, lo, hi)
    assert (io.events, io.low, io.high) == pytest.approx((448, lo * 640, hi * 640))
    whole = got.path_estimates["x86_emulate_instruction"]
    assert whole.events == 640 and whole.high == 640 and whole.low < 640
    exact = probe_stacks({"p": Counter({EMUL: 3})}, {"p": 3}, depth=32)["p"]
    assert exact.period == 1 and exact.path_estimates == {}


def _sampled_trace(pio: int, emul: int, events: int) -> PhaseTrace:
    return PhaseTrace(
        attribution="guest-marker", markers_seen=1, marker_ns=1,
        events_by_probe={"kvm_emulate_insn": events}, events_total=events,
        stacks=probe_stacks({"kvm_emulate_insn": Counter({PIO: pio, EMUL: emul})},
                            {"kvm_emulate_insn": events}, depth=32,
                            periods={"kvm_emulate_insn": 64}),
    )


def test_path_figures_of_sampled_stacks_are_estimates() -> None:
    r = run_result("b", [1.0])
    phase = r.runs[0].phases[0]
    phase.trace = _sampled_trace(7, 3, 640)
    fig = phase_figures(phase, {})
    assert fig.values["path.kvm_emulate_insn.handle_io"] == pytest.approx(448)
    assert fig.values["path.kvm_emulate_insn.x86_emulate_instruction"] == 640


def test_harness_stacks_sums_samples_and_shows_the_interval() -> None:
    r = run_result("b", [1.0, 1.0])
    for run in r.runs:
        run.phases[0].trace = _sampled_trace(7, 3, 640)
    (item,) = callpaths.collect(r)
    st = item.stacks
    assert (st.period, st.stacked, st.events) == (64, 20, 1280)
    assert st.path_estimates == path_estimates(st.paths, 20, 1280)
    tree = callpaths.render_tree([item])
    assert "sampled, a stack every 64 events per CPU: 20 stacks of 1280 events" in tree
    lo, hi = wilson(14, 20)
    assert f"handle_io  14 (70.0%)  ~896 [{lo * 1280:.0f}, {hi * 1280:.0f}]" in tree


def test_result_files_without_a_period_still_load() -> None:
    old = '{"events": 2, "stacked": 2, "truncated": 0, "depth": 8, "paths": {"a": 2}}'
    st = ProbeStacks.model_validate_json(old)
    assert st.period == 1 and st.path_estimates == {}
    sampled = _sampled_trace(1, 1, 128).stacks["kvm_emulate_insn"]
    assert ProbeStacks.model_validate_json(sampled.model_dump_json()) == sampled


def test_stacks_differing_only_in_tracer_frames_are_summed() -> None:
    """The tracer's own frames are dropped when parsing: two raw stacks become one.

    They were a dict comprehension's two writes to one key, and the first count was
    lost (seen: 206,502 of a phase's 787,479 emulated instructions without a stack).
    """
    tail = "\\n    x86_emulate_instruction+10\\n    kvm_arch_vcpu_ioctl_run+20\\n"
    line = ('{"type": "map", "data": {"@stk": {'
            f'"1,2,0,8,\\n    bpf_prog_abc_tp_kvm_emulate_insn+1{tail}": 5, '
            f'"1,2,0,8,\\n    bpf_prog_abc_tp_kvm_emulate_insn+9{tail}": 7, '
            '"1,2,0,8,": 1}}}')
    out = parse_line(line)
    assert out == StackMapOutput("stk", {
        ((1, 2, 0, 8), ("x86_emulate_instruction+10", "kvm_arch_vcpu_ioctl_run+20")): 12,
        ((1, 2, 0, 8), ()): 1,
    })


def test_run_refuses_a_bad_period_before_booting(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(_suite(tmp_path, "[]")),
         "--stacks", "kvm_emulate_insn/64,kvm_cpuid/0", "--results-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--stacks" in proc.stderr and "'kvm_cpuid/0'" in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("*.json"))


def _sampled_side(tmp: Path, run_id: str, pio: int, emul: int, events: int) -> list[Path]:
    # 3 boots x 2 repetitions, every repetition with the same sampled stacks.
    r = run_result(run_id, [1000.0] * 6, reps_per_boot=2)
    for run in r.runs:
        run.phases[0].trace = _sampled_trace(pio, emul, events)
    return save(tmp, r)


def test_compare_judges_a_sampled_path_by_its_sampling_noise(tmp_path: Path) -> None:
    # 7 of 10 samples through handle_io on every base repetition, 6 of 10 on the
    # candidate's: 42/60 against 36/60 samples, a difference chance gives often
    # (Fisher p ~ 0.4). The estimates (448 vs 384 events a repetition, constant
    # within each side) would be a certain change to a Poisson test of counts.
    base = _sampled_side(tmp_path, "b", 7, 3, 640)
    cand = _sampled_side(tmp_path, "c", 6, 4, 640)
    report = compare(load_side("base", base), load_side("candidate", cand))
    io = next(f for f in report.figures if f.figure == "path.kvm_emulate_insn.handle_io")
    assert io.p is not None and io.p > 0.2
    assert io.test is not None and "sampling test" in io.test
    assert io.verdict == "no change" and report.exit_status == 0
    assert io.mde is not None and io.mde > 0.3  # 60 samples a side cannot see 30%


def test_compare_finds_a_path_shift_that_the_samples_resolve(tmp_path: Path) -> None:
    # 700 of 1000 against 600 of 1000 samples a repetition, of 64,000 events each:
    # share 0.70 -> 0.60 over 6,000 samples a side is far beyond sampling noise.
    base = _sampled_side(tmp_path, "b", 700, 300, 64000)
    cand = _sampled_side(tmp_path, "c", 600, 400, 64000)
    report = compare(load_side("base", base), load_side("candidate", cand))
    io = next(f for f in report.figures if f.figure == "path.kvm_emulate_insn.handle_io")
    assert io.p is not None and io.p < 1e-6
    assert io.change == pytest.approx(600 / 700 - 1)
    assert io.verdict == "improvement"


def test_the_sampling_test_is_calibrated_under_the_null() -> None:
    # A/A: share 0.3 sampled 1 in 61 of ~20,000 Poisson events a repetition, 4 repetitions
    # a side. The rate of p < 0.05 must be 5% within its binomial noise; a 15% shift of
    # the share must be found most of the time.
    rng = np.random.default_rng(7)

    def side(share: float) -> tuple[int, int, int, int]:
        events = rng.poisson(20000, 4)
        n = events // 61
        k = rng.binomial(n, share)
        return int(k.sum()), int(n.sum()), int(events.sum()), 4

    trials = 3000
    null = sum(sampling_test((side(0.3), side(0.3)))[0] < 0.05 for _ in range(trials))
    ci = binomtest(null, trials).proportion_ci(0.99)
    assert ci.low <= 0.05 <= ci.high, null / trials
    found = sum(sampling_test((side(0.3), side(0.345)))[0] < 0.05 for _ in range(500))
    assert found / 500 > 0.6
