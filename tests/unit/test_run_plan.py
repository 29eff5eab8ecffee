"""The orchestrator's plan (rounds of boots that run together) and its shared run state."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from harness.paths import SUITES_DIR
from harness.progress import QuietReporter
from harness.results import RunResult, SuiteRef
from harness.run import plan_rounds
from harness.runstate import Cancelled, RunState, Teardown
from harness.spec import load_suite
from tests.unit.test_spec import WORKLOAD, write

MIXED = """\
name = "mixed"
repetitions = 2
workload_dirs = [".."]
[[vms]]
name = "alone"
[[vms]]
name = "lin"
[[vms]]
name = "mic"
image = "micro"
[[runs]]
workload = "touch"
vm = "alone"
[[runs]]
workload = "touch"
vm = "lin"
[[runs]]
workload = "micro-touch"
vm = "mic"
[[groups]]
name = "g"
vms = ["mic", "lin"]
"""


def test_shipped_micro_trio_runs_as_one_round_per_repetition() -> None:
    suite = load_suite(SUITES_DIR / "micro-neighbours.toml")
    rounds = plan_rounds(suite)
    assert len(rounds) == suite.spec.repetitions
    for i, plans in enumerate(rounds, start=1):
        assert [p.vm.name for p in plans] == ["rising", "falling", "mixed"]
        assert [p.name for p in plans] == [f"{n}-{i}" for n in ("rising", "falling", "mixed")]
        assert {p.group for p in plans} == {"trio"}
        assert all(len(p.items) == 1 and p.items[0].repetition == i for p in plans)


def test_vms_alone_make_rounds_of_one_and_groups_zip_their_boots(tmp_path: Path) -> None:
    write(tmp_path, "touch.toml", WORKLOAD)
    suite = load_suite(write(tmp_path, "suites/mixed.toml", MIXED))
    rounds = plan_rounds(suite)
    # "alone": one Linux boot for both repetitions. The group: the Linux VM boots once for
    # both repetitions, the micro guest once per repetition, side by side where it can.
    assert [[p.name for p in r] for r in rounds] == [["alone"], ["mic-1", "lin"], ["mic-2"]]
    assert [p.group for p in rounds[1]] == ["g", "g"] and rounds[0][0].group is None
    assert [i.repetition for i in rounds[1][1].items] == [1, 2]


def make_state(tmp_path: Path) -> RunState:
    result = RunResult.model_construct(
        run_id="r", status="running", started_at=datetime.now(UTC), harness_version="0",
        command_line=[], suite=SuiteRef(name="s", path="p", sha256="0"), host=None,
        vms=[], runs=[], errors=[], notes=[],
    )
    return RunState(result, tmp_path / "r.json", tmp_path, QuietReporter(), True, ["default"])


def test_tokens_are_unique_within_a_run_and_phases_count_per_boot(tmp_path: Path) -> None:
    state = make_state(tmp_path)
    tokens = [state.new_token() for _ in range(2000)]
    assert len(set(tokens)) == len(tokens) and all(1 <= t <= 0xFFFF for t in tokens)
    assert [state.next_phase("a"), state.next_phase("b"), state.next_phase("a")] == [1, 1, 2]


def test_saves_after_close_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[str] = []
    monkeypatch.setattr("harness.runstate.write_atomic", lambda r, p: writes.append(r.status))
    state = make_state(tmp_path)
    state.save()
    state.result.status = "complete"
    state.close()
    state.result.status = "failed"  # a straggling VM thread after the end
    state.save()
    assert writes == ["running", "complete"]
    state.cancel.set()
    with pytest.raises(Cancelled):
        state.check_cancel()


def test_teardown_runs_newest_first_and_late_additions_at_once() -> None:
    done: list[str] = []
    td = Teardown()
    td.callback(done.append, "first")
    td.callback(lambda: 1 / 0)
    td.callback(done.append, "last")
    errors = td.close()
    assert done == ["last", "first"] and len(errors) == 1
    assert isinstance(errors[0], ZeroDivisionError)
    td.callback(done.append, "late")  # e.g. a VM thread that started a domain after SIGINT
    assert done[-1] == "late"
    assert td.close() == []  # idempotent: nothing runs twice



def test_teardown_finishes_before_an_interrupt_propagates() -> None:
    class Interrupt(BaseException):
        pass

    def interrupted() -> None:
        raise Interrupt

    done: list[str] = []
    td = Teardown()
    td.callback(done.append, "domain destroyed")
    td.callback(interrupted)  # SIGINT arrives while the tracer is being stopped
    with pytest.raises(Interrupt):
        td.close()
    assert done == ["domain destroyed"]
