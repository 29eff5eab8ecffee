"""What each part of the libbpf program costs per event: the tracer against its floor.

The loader's ``bench_stage N`` (kvmtrace.bpf.c) stops every event after part N of
the per-event work: 1 the tp_btf attach alone (the floor), 2 + the pid filter,
3 + the VM's phase lookup, 4 + the per-CPU counter; 0 is the whole program. The
micro KVM guest runs under each, its marker-to-marker work time taken as in
test_tracer_overhead.py (kvm_cpuid's markers work at every stage: the phase switch
comes before the staged part). Modes are interleaved round by round, so a change
of load on the host falls on all of them alike. Per mode: the slowdown against a
tracer that attaches only kvm_cpuid, and the added ns per event (events: the full
program's exact count of the same guest run).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import statistics
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from harness.image.micro import QEMU_EXIT_STATUS, MicroPhase, build_micro_image
from harness.spec import load_workload
from harness.trace import correlate, libbpf, probes
from harness.trace.probes import Probe
from harness.trace.program import TraceTarget
from harness.trace.runner import Tracer
from tests.bench.micro_run import StagedLibbpf
from tests.integration.conftest import vm_workdir
from tests.integration.micro_qemu import micro_vm

pytestmark = pytest.mark.integration

ROUNDS = 7
TOKEN = 0x0F10
PHASES = [
    MicroPhase(p.name, p.pages or 1, p.repeat)
    for p in load_workload(Path(__file__).parents[2] / "workloads" / "micro-touch.toml").phases
]
#: mode -> (probe groups, bench_stage); "markers" is the base the others are compared with.
MODES: dict[str, tuple[list[str], int]] = {
    "markers": (["markers"], 0),
    "attach": (["all"], 1),
    "pid-filter": (["all"], 2),
    "phase-lookup": (["all"], 3),
    "percpu-counter": (["all"], 4),
    "full": (["all"], 0),
}


#: bpf(2): its syscall number on x86-64, the BPF_ENABLE_STATS command, BPF_STATS_RUN_TIME.
SYS_BPF, BPF_ENABLE_STATS, BPF_STATS_RUN_TIME = 321, 32, 0
#: The hot program: nearly every event of the micro guest.
HOT_PROGRAM = "tp_kvm_emulate_insn"


@contextlib.contextmanager
def bpf_run_time_stats() -> Iterator[None]:
    """The kernel's per-program run time and count, on while the fd is open (bpf(2)).

    Through BPF_ENABLE_STATS rather than the kernel.bpf_stats_enabled sysctl: the fd
    closes with this process, so the shared host is never left with stats on.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.c_uint32(BPF_STATS_RUN_TIME)
    fd = libc.syscall(SYS_BPF, BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "bpf(BPF_ENABLE_STATS)")
    try:
        yield
    finally:
        os.close(fd)


def program_stats(loader_pid: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of the hot program the loader ``loader_pid`` holds.

    Its programs are found by the ids in its fds' fdinfo: other tracers may run on
    the host at the same time, and Debian's bpftool does not list holders' pids.
    """
    ids: set[int] = set()
    for fdinfo in Path(f"/proc/{loader_pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            for line in fdinfo.read_text().splitlines():
                if line.startswith("prog_id:"):
                    ids.add(int(line.split()[1]))
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    for prog in json.loads(out):
        if prog.get("name") == HOT_PROGRAM and prog.get("id") in ids:
            return int(prog.get("run_time_ns", 0)), int(prog.get("run_cnt", 0))
    raise AssertionError(f"no {HOT_PROGRAM} program held by loader {loader_pid}")


def run_once(
    workdir: Path, built: libbpf.LibbpfBuild, mode: str, n: int
) -> tuple[int, int, int, float | None]:
    """One micro guest run under ``mode``: work ns, QEMU CPU ns, events counted, and
    the kernel's run time per run of the hot program (None where it is not attached)."""
    wanted, stage = MODES[mode]
    selected: list[Probe] = probes.select(wanted)
    image = build_micro_image(workdir / f"{mode}-{n}", PHASES, TOKEN)
    with ExitStack() as stack:
        vm = stack.enter_context(micro_vm(image, workdir))
        target = TraceTarget(vm="micro", pid=vm.pid, token=TOKEN)
        tracer = stack.enter_context(
            Tracer(selected, [target], workdir=workdir / f"trace-{mode}-{n}",
                   backend=StagedLibbpf(built, stage))
        )
        tracer.start()
        vm.cont()
        _, status, usage = os.wait4(vm.pid, 0)
        vm.proc.returncode = os.waitstatus_to_exitcode(status)
        assert vm.proc.returncode == QEMU_EXIT_STATUS, "micro guest did not finish"
        per_run = None
        if "kvm_emulate_insn" in {s.probe.name for s in tracer.program.attached}:
            assert tracer._proc is not None  # the loader, started above
            run_ns, runs = program_stats(tracer._proc.pid)
            per_run = run_ns / runs if runs else None
        snapshot = tracer.stop()
    traces = correlate.phase_traces(snapshot, target, list(range(1, len(PHASES) + 1)))
    first, last = traces[1].marker_ns, traces[0].marker_ns
    assert first is not None and last is not None, f"{mode}: markers missing"
    cpu_ns = int((usage.ru_utime + usage.ru_stime) * 1e9)
    return last - first, cpu_ns, sum(t.events_total for t in traces.values()), per_run


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with vm_workdir("bench-floor-") as path:
        yield path


@pytest.mark.benchmark(group="tracer-floor")
def test_tracer_floor(benchmark: BenchmarkFixture, workdir: Path) -> None:
    """Each part of the libbpf program's per-event work, rounds interleaved over the modes."""
    built = libbpf.build()
    work: dict[str, list[int]] = {m: [] for m in MODES}
    cpu: dict[str, list[int]] = {m: [] for m in MODES}
    prog_ns: dict[str, list[float]] = {m: [] for m in MODES}
    events: list[int] = []

    def rounds() -> None:
        for n in range(ROUNDS):
            for mode in MODES:
                ns, cpu_ns, ev, per_run = run_once(workdir, built, mode, n)
                if per_run is not None:
                    prog_ns[mode].append(per_run)
                work[mode].append(ns)
                cpu[mode].append(cpu_ns)
                if mode == "full":
                    events.append(ev)

    with bpf_run_time_stats():
        benchmark.pedantic(rounds, rounds=1, iterations=1)
    n_events = statistics.median(events)
    base, base_min = statistics.median(work["markers"]), min(work["markers"])
    base_cpu = statistics.median(cpu["markers"])
    lines = [f"\n{n_events:,.0f} events a run; markers only: {base / 1e6:.1f} ms; "
             "per mode: median work, slowdown, ns/event; the same from the least "
             "disturbed round (min); from QEMU's CPU time (median)"]
    for mode in MODES:
        med, low, c = statistics.median(work[mode]), min(work[mode]), statistics.median(cpu[mode])
        info = {"work_s": [w / 1e9 for w in work[mode]], "work_s_median": med / 1e9,
                "qemu_cpu_s": [x / 1e9 for x in cpu[mode]],
                "slowdown": med / base, "ns_per_event": (med - base) / n_events,
                "slowdown_min": low / base_min, "ns_per_event_min": (low - base_min) / n_events,
                "cpu_slowdown": c / base_cpu, "cpu_ns_per_event": (c - base_cpu) / n_events,
                "program_ns_per_run": (statistics.median(prog_ns[mode])
                                       if prog_ns[mode] else None)}
        benchmark.extra_info[mode] = info
        lines.append(f"  {mode:15s} {med / 1e6:7.1f} ms {med / base:.3f}x "
                     f"{(med - base) / n_events:+6.1f} | min {low / base_min:.3f}x "
                     f"{(low - base_min) / n_events:+6.1f} | CPU {c / base_cpu:.3f}x "
                     f"{(c - base_cpu) / n_events:+6.1f} | in the program "
                     f"{info['program_ns_per_run'] or 0:5.1f} ns/run")
    print("\n".join(lines))
    # Stages 1-4 count nothing: the full program counts every event, exactly once.
    assert len(set(events)) == 1, events
