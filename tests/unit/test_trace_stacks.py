"""Kernel stacks per phase: generation, parsing, attribution, coverage, paths, folded output."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from harness.analysis import callpaths
from harness.analysis.compare import compare
from harness.analysis.resultset import load_side
from harness.spec import SpecError, load_suite
from harness.trace import probes as P
from harness.trace.model import PhaseTrace, ProbeStacks, StackCount
from harness.trace.parse import StackMapOutput, TraceSnapshot, parse_line, parse_stack_key
from harness.trace.program import ProgramError, check_program, generate, probe_id
from harness.trace.stacks import fold, phase_stacks, probe_stacks
from tests.unit.test_compare import run_result, save
from tests.unit.test_trace_program import T1, T2, fake_status, needs_bpftrace

#: A kstack as bpftrace 0.17 prints it (seen here on kvmmmu:kvm_mmu_get_page).
ROOT_LOOKUP = (
    "\n    __kvm_mmu_get_shadow_page+120\n    mmu_alloc_root+77\n    kvm_mmu_load+230\n"
    "    kvm_arch_vcpu_ioctl_run+1200\n    kvm_vcpu_ioctl+400\n    __x64_sys_ioctl+150\n"
)
FOLDED = re.compile(r"^[^; ]+(;[^; ]+)* \d+$")


def test_stack_keys_parse_into_ints_and_frames() -> None:
    key, frames = parse_stack_key("4242,1,0,8," + ROOT_LOOKUP)
    assert key == (4242, 1, 0, 8)
    assert frames[0] == "__kvm_mmu_get_shadow_page+120" and frames[-1] == "__x64_sys_ioctl+150"
    assert parse_stack_key("4242,1,0,8,") == ((4242, 1, 0, 8), ())
    out = parse_line('{"type": "map", "data": {"@stk": {"1,2,0,8,\\n    f+1\\n": 3}}}')
    assert out == StackMapOutput("stk", {((1, 2, 0, 8), ("f+1",)): 3})


def test_program_counts_stacks_only_for_the_probes_asked() -> None:
    sts = [fake_status("kvm_cpuid"), fake_status("kvm_mmu_get_page"), fake_status("kvm_exit")]
    prog = generate(sts, [T1, T2], stacks=["kvm_mmu_get_page"], stack_depth=20)
    lines = [ln.strip() for ln in prog.text.splitlines() if "@stk[" in ln]
    ident = probe_id("kvm_mmu_get_page")
    assert lines == [f"@stk[pid, $g, $h, {ident}, kstack(24)] = count();"]
    assert "stk" in prog.maps and "print(@stk);" in prog.text
    plain = generate(sts, [T1])
    assert "@stk" not in plain.text and "stk" not in plain.maps
    with pytest.raises(ProgramError, match="not one of the selected probes"):
        generate(sts, [T1], stacks=["kvm_pio"])
    with pytest.raises(ProgramError, match="stack_depth"):
        generate(sts, [T1], stacks=["kvm_exit"], stack_depth=128)


@needs_bpftrace
def test_bpftrace_compiles_a_stacking_program() -> None:
    sts = [fake_status("kvm_cpuid"), fake_status("kvm_mmu_get_page"), fake_status("kvm_page_fault")]
    check_program(generate(sts, [T1, T2], stacks=["kvm_mmu_get_page", "kvm_page_fault"]).text)


def test_stacks_are_attributed_folded_and_counted() -> None:
    snap = TraceSnapshot()
    ident = probe_id("kvm_mmu_get_page")
    other_path = "\n    __kvm_mmu_get_shadow_page+120\n    kvm_mmu_reset_context+9\n"
    snap.stacks["stk"] = {
        ((77, 1, 0, ident), parse_stack_key("0," + ROOT_LOOKUP)[1]): 5,
        ((77, 1, 0, ident), parse_stack_key("0," + other_path)[1]): 2,
        ((77, 2, 0, ident), parse_stack_key("0," + ROOT_LOOKUP)[1]): 1,
        ((99, 1, 0, ident), parse_stack_key("0," + ROOT_LOOKUP)[1]): 1000,  # another VM
    }
    per_phase = phase_stacks(snap, 77, lambda g, h: g, lambda i: P.CATALOGUE[i].name)
    assert set(per_phase) == {1, 2}
    got = probe_stacks(per_phase[1], {"kvm_mmu_get_page": 7}, depth=6)
    st = got["kvm_mmu_get_page"]
    assert (st.events, st.stacked) == (7, 7)
    assert st.truncated == 5  # the 6-frame root-lookup stack reached depth 6
    assert st.stacks[0].frames[0] == "__x64_sys_ioctl" and st.stacks[0].count == 5
    assert st.paths["kvm_mmu_load"] == 5 and st.paths["kvm_mmu_reset_context"] == 2
    assert st.paths["__kvm_mmu_get_shadow_page"] == 7
    assert fold(("f+1", "g+2"), offsets=True) == ("g+2", "f+1")


def test_recursion_counts_an_event_once_per_function() -> None:
    counts = Counter({("a", "b", "a", "c"): 3})
    assert probe_stacks({"p": counts}, {"p": 3}, depth=32)["p"].paths["a"] == 3


def trace_with_stacks(paths: dict[tuple[str, ...], int]) -> PhaseTrace:
    total = sum(paths.values())
    return PhaseTrace(
        attribution="guest-marker", markers_seen=1, marker_ns=1,
        events_by_probe={"kvm_mmu_get_page": total}, events_total=total,
        stacks=probe_stacks({"kvm_mmu_get_page": Counter(paths)},
                            {"kvm_mmu_get_page": total}, depth=32),
    )


def test_folded_output_follows_the_format_and_sums_repetitions(tmp_path: Path) -> None:
    r = run_result("b", [1.0, 1.0])
    for run in r.runs:
        run.phases[0].trace = trace_with_stacks(
            {("entry", "kvm_mmu_load", "get_page"): 3, ("entry", "reset", "get_page"): 1}
        )
    items = callpaths.collect(r)
    text = callpaths.render_folded(items)
    lines = text.splitlines()
    assert all(FOLDED.match(line) for line in lines), lines
    assert lines[0] == "vm1/touch/touch;kvm_mmu_get_page;entry;kvm_mmu_load;get_page 6"
    assert sum(int(line.rsplit(" ", 1)[1]) for line in lines) == 8
    tree = callpaths.render_tree(items)
    assert "8 of 8 events stacked" in tree and "kvm_mmu_load  6 (75.0%)" in tree


def test_compare_diffs_branching_paths_not_whole_ones(tmp_path: Path) -> None:
    """Root lookups via kvm_mmu_load up, via reset unchanged: only branch points are figures."""
    base = run_result("b", [1.0] * 3)
    cand = run_result("c", [1.0] * 3)
    for r, loads in ((base, 100), (cand, 140)):
        for run in r.runs:
            run.phases[0].trace = trace_with_stacks(
                {("entry", "kvm_mmu_load", "get_page"): loads, ("entry", "reset", "get_page"): 50}
            )
    report = compare(load_side("b", save(tmp_path, base)), load_side("c", save(tmp_path, cand)))
    by = {f.figure: f for f in report.figures}
    assert "path.kvm_mmu_get_page.entry" not in by  # on every stack: says nothing new
    assert by["path.kvm_mmu_get_page.kvm_mmu_load"].verdict == "regression"
    assert by["path.kvm_mmu_get_page.kvm_mmu_load"].change == pytest.approx(0.4)
    assert by["path.kvm_mmu_get_page.reset"].verdict == "no change"


def test_suite_stacks_must_be_traced(tmp_path: Path) -> None:
    suite = tmp_path / "s.toml"
    suite.write_text(
        'name = "s"\n[[vms]]\nname = "m"\nimage = "micro"\n'
        '[[runs]]\nworkload = "micro-touch"\nvm = "m"\n'
        '[trace]\nprobes = ["markers"]\nstacks = ["kvm_mmu_get_page"]\n'
    )
    with pytest.raises(SpecError, match="kvm_mmu_get_page not traced; add them to probes"):
        load_suite(suite)
    suite.write_text(suite.read_text().replace('stacks = ["kvm_mmu_get_page"]',
                                               'stacks = ["stacks"]'))
    assert load_suite(suite).spec.trace.stacks == ["stacks"]  # the group fits any selection


def test_stack_models_round_trip() -> None:
    st = ProbeStacks(events=1, stacked=1, truncated=0, depth=8,
                     stacks=[StackCount(frames=["a"], count=1)], paths={"a": 1})
    assert ProbeStacks.model_validate_json(st.model_dump_json()) == st
