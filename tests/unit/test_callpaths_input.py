"""`harness stacks` on input from elsewhere: deep stacks, escape sequences, parameter sets.

Issue 17 items 6 and 10, issue 22 item 8.
"""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from harness.analysis import callpaths
from harness.cli import main
from harness.textsafe import printable
from tests.fuzz.builders import a_result, save, stack_trace


def test_a_3000_frame_stack_prints_as_tree_and_folded(tmp_path: Path) -> None:
    frames = tuple(f"f{i}" for i in range(3000))
    path = save(tmp_path, a_result("deep", [1.0], trace=stack_trace({frames: 5})))
    tree = CliRunner().invoke(main, ["stacks", str(path)])
    assert tree.exit_code == 0, tree.output
    lines = tree.output.splitlines()
    assert lines[1].strip() == "f0  5 (100.0%)" and "[depth 2999] f2999  5" in lines[-1]
    folded = CliRunner().invoke(main, ["stacks", str(path), "--folded"])
    assert folded.exit_code == 0
    assert folded.output.count(";") == 3001 and folded.output.endswith(";f2999 5\n")


def test_escape_sequences_from_a_result_file_are_shown_not_obeyed(tmp_path: Path) -> None:
    evil = "\x1b]0;owned\x07kvm_mmu_load\x1b[2J\x9b31m"
    result = a_result("esc", [1.0], trace=stack_trace({("entry", evil, "get_page"): 3}))
    result.runs[0].phases[0].name = "touch\x1b[1A"
    path = save(tmp_path, result)
    for args in ([], ["--folded"]):
        out = CliRunner().invoke(main, ["stacks", str(path), *args]).output
        assert not any(c in out for c in "\x1b\x07\x9b"), repr(out)
        assert "\\x1b]0_owned\\x07kvm_mmu_load" in out or "\\x1b]0;owned" in out
    assert printable("a\x1bb\nc", multiline=True) == "a\\x1bb\nc"
    assert printable("\u202eevil\t") == "\\u202eevil\\x09"


def test_runs_that_differ_only_in_parameters_are_not_added_together() -> None:
    trace = stack_trace({("entry", "kvm_mmu_load", "get_page"): 2})
    ks = [2, 3, 4, 5, 8]
    result = a_result("k", [1.0] * 5, workload="paging-cr3", phase="visit", trace=trace,
                      params=[{"address_spaces": k, "switches": 100} for k in ks])
    items = callpaths.collect(result)
    assert [it.repetitions for it in items] == [1] * 5
    assert [it.label for it in items] == [
        f"vm1/paging-cr3[address_spaces={k}]/visit" for k in ks]
    tree = callpaths.render_tree(items)
    assert "5 repetition(s)" not in tree and tree.count("(1 repetition(s);") == 5
    # Repetitions of one parameter set still add up, labelled as before.
    same = a_result("r", [1.0, 1.0], trace=trace)
    (item,) = callpaths.collect(same)
    assert item.repetitions == 2 and item.label == "vm1/touch/touch"
