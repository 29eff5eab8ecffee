"""The tracer's overhead goals (issue 21), judged from interleaved, paired rounds.

Every round runs every mode below once, in a shuffled order, on the micro KVM
guest (about 1.4 M kvm_emulate_insn events a run); a mode's work time is divided
by the untraced time of the same round and pinning, and each goal is judged on
the median of those ratios with its order-statistic 95% interval
(tests/bench/goals.py): met, missed, or undecided at this host's noise.

The time judged is QEMU's CPU time (every thread, user + system): the tracer's
cost is CPU work on the vCPU thread, and CPU time leaves out the waits for a
CPU that a shared host hands out unevenly. The guest's own work time (marker to
marker) is shown and stored beside it. Seen here on a loaded host: per-round
work-time ratios of one mode spread over +-20%, CPU-time ratios less.

Goals:
- every probe on, no stacks (libbpf): at most 1.05x, QEMU unpinned and pinned to
  each CPU;
- the default probes (libbpf, bpftrace): at most 1.01x;
- sampled stacks on kvm_emulate_insn (every 61st event, and a rate target of
  1000 stacks/s per CPU): at most 1.15x.

The floor: on this host the tp_btf attach alone, an empty program on every probe
(``bench_stage 1``, tests/bench/micro_run.py), costs about 40-50 ns an event,
1.06-1.10x at this event rate: above the 1.05x goal before the tracer does
anything. So every mode with every probe on is also judged against the floor
run in the same round and pinning ("own": the tracer's part, which this project
controls), and the floor itself against the untraced guest.

The bench fails only on a goal missed beyond doubt (the whole interval above it)
both against the untraced guest and, where a floor applies, against the floor;
or on a wrong event count. An undecided goal is printed and stored as such
(extra_info), never passed off as met.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from harness.image.micro import expected_emulated_insns
from tests.bench.goals import GoalResult, judge
from tests.bench.micro_run import PHASES, Mode, run_micro_once
from tests.conftest import host_mmu_mode
from tests.integration.conftest import vm_workdir

pytestmark = pytest.mark.integration

#: Nine paired rounds: the median's 95% interval is the 2nd to the 8th ratio.
ROUNDS = 9
TOKEN = 0x0C0C
SEED = 21
UNTRACED = Mode("bpftrace", ("markers",))
ALL = Mode("libbpf", ("all",))
FLOOR = Mode("libbpf", ("all",), stage=1)
#: mode -> (how it is traced, the goal as a ratio to untraced).
GOALS: dict[str, tuple[Mode, float]] = {
    "libbpf-default": (Mode("libbpf", ("default",)), 1.01),
    "bpftrace-default": (Mode("bpftrace", ("default",)), 1.01),
    "libbpf-all": (ALL, 1.05),
    "libbpf-stacks-hot-61": (Mode("libbpf", ("all",), ("kvm_emulate_insn/61",)), 1.15),
    "libbpf-stacks-hot-1000hz": (Mode("libbpf", ("all",), ("kvm_emulate_insn@1000hz",)), 1.15),
}
#: Pinned: the untraced guest and every probe on, QEMU on one CPU.
PINNED_GOAL = 1.05
CPUS = (0, 1)


def cases() -> list[tuple[str, Mode, int | None]]:
    """(name, mode, pinned CPU) of every run a round makes."""
    out: list[tuple[str, Mode, int | None]] = [("untraced", UNTRACED, None),
                                               ("floor", FLOOR, None)]
    out += [(name, mode, None) for name, (mode, _) in GOALS.items()]
    for cpu in CPUS:
        out += [(f"untraced-cpu{cpu}", UNTRACED, cpu), (f"floor-cpu{cpu}", FLOOR, cpu),
                (f"libbpf-all-cpu{cpu}", ALL, cpu)]
    return out


def suffix(cpu: int | None) -> str:
    return "" if cpu is None else f"-cpu{cpu}"


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with vm_workdir("bench-goals-") as path:
        yield path


@pytest.mark.benchmark(group="tracer-goals")
def test_tracer_goals(benchmark: BenchmarkFixture, workdir: Path) -> None:
    """The overhead goals, judged round by round against the untraced guest."""
    runs = cases()
    work: dict[str, list[int]] = {name: [] for name, _, _ in runs}
    cpu_ns: dict[str, list[int]] = {name: [] for name, _, _ in runs}
    emulated: dict[str, list[int]] = {}
    order = random.Random(SEED)

    def rounds() -> None:
        for n in range(ROUNDS):
            for name, mode, cpu in order.sample(runs, len(runs)):
                run = run_micro_once(workdir, f"{name}-{n}", mode, TOKEN, cpu)
                work[name].append(run.work_ns)
                cpu_ns[name].append(run.cpu_ns)
                if run.emulated is not None and not mode.stage:  # stage 1 counts nothing
                    emulated.setdefault(name, []).append(run.emulated)

    benchmark.pedantic(rounds, rounds=1, iterations=1)
    results: list[GoalResult] = []
    own: dict[str, GoalResult] = {}
    lines = [f"\n{ROUNDS} paired rounds; QEMU's CPU time against untraced in the same round "
             "(the guest's work time beside), and against the floor (attach alone) where "
             "every probe is on:"]
    for name, mode, cpu in runs:
        if name.startswith("untraced"):
            continue
        base = f"untraced{suffix(cpu)}"
        goal = GOALS[name][1] if name in GOALS else PINNED_GOAL
        result = judge(name, goal, cpu_ns[name], cpu_ns[base])
        wall = judge(name, goal, work[name], work[base])
        results.append(result)
        info: dict[str, object] = {
            "goal": goal, "verdict": result.verdict, "median": result.median,
            "interval": [result.low, result.high], "ratios": result.ratios,
            "work_median": wall.median, "work_interval": [wall.low, wall.high],
            "work_verdict": wall.verdict,
        }
        lines.append(f"  {result.line()}  (work {wall.median:.3f}x [{wall.low:.3f}, "
                     f"{wall.high:.3f}])")
        if "all" in mode.wanted and not name.startswith("floor"):
            mine = own[name] = judge(name, goal, cpu_ns[name], cpu_ns[f"floor{suffix(cpu)}"])
            info |= {"own_verdict": mine.verdict, "own_median": mine.median,
                     "own_interval": [mine.low, mine.high]}
            lines.append(f"    own, over the floor: {mine.line().split(None, 1)[1]}")
        benchmark.extra_info[name] = info
    print("\n".join(lines))
    if host_mmu_mode() == "pvm":
        # Every instruction the guest ran, from reset to its exit, in every round.
        whole_run = sum(expected_emulated_insns(PHASES).values())
        for name, counts in emulated.items():
            assert counts == [whole_run] * ROUNDS, (name, counts)
    missed = [r.line() for r in results if r.verdict == "missed"
              and not r.mode.startswith("floor")
              and (r.mode not in own or own[r.mode].verdict == "missed")]
    assert not missed, "goals missed beyond this host's noise:\n" + "\n".join(missed)
