"""The host tracer against real bpftrace and libbpf, real QEMU/KVM and the micro guest.

The micro guest (vm-images/micro) runs marked phases whose instruction counts
are known exactly; on a PVM host every guest instruction is emulated and
fires kvm:kvm_emulate_insn, so per-phase counts can be checked against it.
Every exactness test runs against both backends (the ``backend`` fixture).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from harness.image.micro import (
    QEMU_EXIT_STATUS,
    MicroPhase,
    build_micro_image,
    expected_emulated_insns,
)
from harness.trace import probes as P
from harness.trace.backend import Backend, Choice
from harness.trace.correlate import phase_traces, unphased_totals
from harness.trace.parse import TraceSnapshot
from harness.trace.program import TraceTarget
from harness.trace.runner import (
    BackendStartError,
    Tracer,
    TracerError,
    host_marker,
    start_backend,
)
from tests.integration.conftest import BACKENDS, make_backend
from tests.integration.micro_qemu import micro_vm

pytestmark = [
    pytest.mark.integration,
    pytest.mark.requires(
        root=True, tools=("bpftrace", "qemu-system-x86_64", "nasm"), kvm=True,
        tracepoints=("kvm/kvm_cpuid", "kvm/kvm_emulate_insn"),
    ),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each tracer backend in turn (libbpf built for this kernel on first use)."""
    return make_backend(request.param)


@contextlib.contextmanager
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process that is not a KVM guest at all."""
    p = subprocess.Popen(["sleep", "300"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie that is not ours to reap would still answer; check its state.
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    return True


def run_traced(
    tmp_path: Path,
    phases: Sequence[MicroPhase],
    groups: Sequence[str],
    token: int,
    backend: Backend | None = None,
) -> tuple[Tracer, TraceSnapshot, TraceTarget, int, int]:
    """Run the micro guest under a tracer; return (tracer, final snapshot, target, cont, pid)."""
    image = build_micro_image(tmp_path / "img", phases, token)
    with (
        micro_vm(image, tmp_path) as vm,
        Tracer(
            P.select(groups), [TraceTarget("micro", vm.pid, token)], workdir=tmp_path / "trace",
            backend=backend,
        ) as tracer,
    ):
        target = tracer.program.targets[0]
        tracer.start()
        cont_ns = vm.cont()
        assert vm.wait() == QEMU_EXIT_STATUS
        final = tracer.stop()
        bpftrace_pid = tracer._proc.pid if tracer._proc else -1
    assert _process_gone(bpftrace_pid), "the tracer process survived the tracer"
    return tracer, final, target, cont_ns, bpftrace_pid


def test_micro_guest_phases_are_attributed_exactly(tmp_path: Path, backend: Backend) -> None:
    # repeat 13 in the last phase: its exact cost (loop + 4 x 13 + 15) lies beyond the
    # loop + 64 that a band once accepted.
    phases = [MicroPhase("small", 16, 2), MicroPhase("double", 32, 2), MicroPhase("many", 4, 13)]
    tracer, final, target, cont_ns, _ = run_traced(
        tmp_path, phases, ["all"], token=0x5A17, backend=backend
    )
    assert tracer.status == "ok" and tracer.error is None
    assert tracer.attached_ns is not None and tracer.attached_ns < cont_ns

    pt = phase_traces(final, target, [1, 2, 3], attached=P.GROUPS["all"])
    # Every marker executed is seen exactly once, by the guest-marker method.
    for k in (0, 1, 2, 3):
        assert pt[k].markers_seen == 1, k
        assert pt[k].attribution == "guest-marker"
    first_marker = min(t.marker_ns for t in pt.values() if t.marker_ns is not None)
    assert first_marker > (tracer.attached_ns or 0), "guest ran before the tracer attached"

    # Events between marker k and k+1 are phase k's: exactly the instructions the guest's
    # code executes there (derived from micro.asm), and nothing of a neighbour.
    expected = expected_emulated_insns(phases)
    for k in range(1, len(phases) + 1):
        assert pt[k].emulated_insns == expected[k], (k, pt[k].emulated_insns, expected[k])
        assert pt[k].events_by_probe.get("kvm_cpuid") == 1
        assert (pt[k].duration_ns or 0) > 0
    assert pt[0].emulated_insns == expected[0]  # the ROM's start and the final exit

    # Per-phase totals including phase 0 add up exactly to the unphased totals.
    totals = unphased_totals(final, target)
    for name, n in totals.items():
        assert sum(t.events_by_probe.get(name, 0) for t in pt.values()) == n, name
    assert sum(t.events_total for t in pt.values()) == sum(totals.values())
    assert tracer.summary(final).events_total == sum(totals.values())

    # Twice the pages, about twice the emulation work.
    ratio = pt[2].emulated_insns / pt[1].emulated_insns
    assert 1.95 < ratio < 2.05, ratio

    secs = sum(pt[k].duration_ns or 0 for k in (1, 2, 3)) / 1e9
    events = sum(pt[k].events_total for k in (1, 2, 3))
    print(
        f"\nmicro guest, {backend.name}, all probes: {events} events in phases 1-3 "
        f"over {secs:.3f} s "
        f"= {events / secs:,.0f} events/s; durations ms "
        f"{[round((pt[k].duration_ns or 0) / 1e6, 1) for k in (1, 2, 3)]}; "
        f"lost events {final.lost_events}"
    )


def test_snapshots_during_the_run_and_summary(tmp_path: Path, backend: Backend) -> None:
    with (
        sleeper() as p,
        Tracer(P.select(["default"]), [TraceTarget("idle", p.pid, 77)], workdir=tmp_path,
               backend=backend) as tracer,
    ):
        tracer.start()
        t = tracer.program.targets[0]
        first = tracer.snapshot()
        tracer.mark_phase(t, 1)
        second = tracer.snapshot()
        assert first.seq is not None and second.seq == first.seq + 1
        assert first.counter("hmarks") == {}
        assert second.counter("hmarks") == {(p.pid, 1): 1}
        summary = tracer.summary(second)
        assert summary.tracer_status == "ok"
        assert "kvm_cpuid" in summary.probes_attached
        assert len(summary.program_sha256 or "") == 64
        assert summary.backend == backend.name
        # Probes this host cannot offer are listed with their reasons.
        offered = {s.probe.name for s in backend.availability(P.select(["default"]))
                   if s.available}
        assert {x.probe for x in summary.probes_not_attached} == (
            {p.name for p in P.select(["default"])} - offered
        )
        assert all(x.reason for x in summary.probes_not_attached)
        assert (tmp_path / backend.program_file).read_text() == tracer.program.text
        tracer.stop()
    assert (tmp_path / "trace.jsonl").stat().st_size > 0


@pytest.mark.parametrize("n", [1, 2, 8, 16])
def test_program_for_n_targets_loads_and_keeps_vms_apart(
    tmp_path: Path, n: int, backend: Backend
) -> None:
    """The kernel loads the program for any number of targets (not only `bpftrace -d`).

    With two or more targets the marker filter once failed the verifier
    ("dereference of modified ctx ptr"). Sleeping processes serve as targets:
    loading needs live pids, not guests. Start() returns only once BEGIN ran
    (every probe attached) and a dump came back through the marker probe.
    """
    with contextlib.ExitStack() as stack:
        pids = [stack.enter_context(sleeper()).pid for _ in range(n)]
        targets = [TraceTarget(f"vm{i}", pid, 0x100 + i) for i, pid in enumerate(pids)]
        tracer = stack.enter_context(
            Tracer(P.select(["all"]), targets, workdir=tmp_path, backend=backend)
        )
        tracer.start()
        names = {s.probe.name for s in tracer.program.attached}
        assert {"kvm_cpuid", "kvm_emulate_insn"} <= names
        # Every probe plus the host-marker probe (bpftrace: and its BEGIN and END blocks).
        extra = 3 if backend.name == "bpftrace" else 1
        assert tracer.attached_probes == len(tracer.program.attached) + extra
        # Host markers reach the VM whose token they carry, and no other.
        for i, t in enumerate(tracer.program.targets):
            for phase in range(1, i + 2):
                tracer.mark_phase(t, phase)
        final = tracer.stop()
    hmarks = final.counter("hmarks")
    assert hmarks == {(pid, ph): 1 for i, pid in enumerate(pids) for ph in range(1, i + 2)}
    assert final.counter("hphase") == {(pid,): i + 1 for i, pid in enumerate(pids)}


def test_host_window_attribution_for_a_process_that_is_no_guest(
    tmp_path: Path, backend: Backend
) -> None:
    with (
        sleeper() as p,
        Tracer(
            P.select(["default"]), [TraceTarget("not-a-guest", p.pid, 4321)], workdir=tmp_path,
            backend=backend,
        ) as tracer,
    ):
        tracer.start()
        t = tracer.program.targets[0]
        before = time.monotonic_ns()
        at1 = tracer.mark_phase(t, 1)
        for _ in range(3):
            host_marker(0x4B564D00, (999 << 16) | 5)  # another run's token: ignored
        time.sleep(0.05)
        tracer.mark_phase(t, 2)
        tracer.mark_phase(t, 0)
        final = tracer.stop()
    pt = phase_traces(final, t, [1, 2])
    assert {k: v.attribution for k, v in pt.items()} == {
        0: "host-window",
        1: "host-window",
        2: "host-window",
    }
    assert pt[1].host_marks_seen == 1 and pt[2].host_marks_seen == 1
    assert pt[1].marker_ns is not None and before <= pt[1].marker_ns <= at1
    assert pt[1].duration_ns is not None and pt[1].duration_ns >= 50_000_000
    assert all(v.events_total == 0 for v in pt.values())


def test_host_window_attribution_with_a_real_guest(tmp_path: Path, backend: Backend) -> None:
    """Guest markers carry another token, so only the host windows can attribute."""
    image = build_micro_image(tmp_path / "img", [MicroPhase("p", 8, 1)], 0x0B0B)
    with (
        micro_vm(image, tmp_path) as vm,
        Tracer(
            P.select(["default"]), [TraceTarget("micro", vm.pid, 0x0C0C)], workdir=tmp_path / "t",
            backend=backend,
        ) as tracer,
    ):
        tracer.start()
        t = tracer.program.targets[0]
        tracer.mark_phase(t, 1)
        vm.cont()
        assert vm.wait() == QEMU_EXIT_STATUS
        tracer.mark_phase(t, 0)
        final = tracer.stop()
    pt = phase_traces(final, t, [1])
    assert pt[1].attribution == "host-window" and pt[1].markers_seen == 0
    totals = unphased_totals(final, t)
    assert pt[1].events_total == sum(totals.values()) > 0
    assert pt[1].pio > 0 and pt[1].events_by_probe["kvm_cpuid"] >= 2


def test_tracer_dying_mid_run_is_reported_with_stderr(tmp_path: Path, backend: Backend) -> None:
    with (
        sleeper() as p,
        Tracer(P.select(["default"]), [TraceTarget("x", p.pid, 9)], workdir=tmp_path,
               backend=backend) as tracer,
    ):
        tracer.start()
        assert tracer.alive()
        assert tracer._proc is not None
        os.kill(tracer._proc.pid, signal.SIGKILL)
        tracer._proc.wait(10)
        assert not tracer.alive()
        with pytest.raises(TracerError, match="killed by signal 9"):
            tracer.snapshot(timeout_s=2)
        summary = tracer.summary()
        assert summary.tracer_status == "died"
        assert summary.tracer_error is not None and "stderr" in summary.tracer_error
        final = tracer.stop()  # still returns, with whatever was printed
        assert final.final
        assert tracer.summary().tracer_status == "died"


def test_start_failure_raises_with_stderr_and_leaves_nothing(tmp_path: Path) -> None:
    with sleeper() as p:
        tracer = Tracer(
            P.select(["markers"]), [TraceTarget("x", p.pid, 9)], workdir=tmp_path, bpftrace="false"
        )
        with tracer, pytest.raises(TracerError, match="exited"):
            tracer.start(timeout_s=10)
        assert tracer.status == "died" and not tracer.alive()


def test_overhead_cpuid_only_vs_all_probes(tmp_path: Path) -> None:
    """Numbers for the report; the only assertions are on correctness, not speed."""
    phases = [MicroPhase("a", 16, 2), MicroPhase("b", 32, 2)]
    durations: dict[str, list[int]] = {}
    for i, groups in enumerate((["markers"], ["default"], ["all"])):
        _, final, target, _, _ = run_traced(tmp_path / str(i), phases, groups, 0x0D00 + i)
        pt = phase_traces(final, target, [1, 2])
        assert all(pt[k].markers_seen == 1 for k in (1, 2))
        durations[groups[0]] = [pt[k].duration_ns or 0 for k in (1, 2)]
    print(
        "\nphase durations ms (phase 1, phase 2): "
        + "; ".join(f"{g}: {[round(d / 1e6, 1) for d in v]}" for g, v in durations.items())
    )


def test_both_backends_tracing_one_guest_at_once_agree_exactly(tmp_path: Path) -> None:
    """bpftrace and libbpf attached to the same micro guest see the same events.

    Both react to the same guest markers (one token) and host markers, so every
    counter both keep must be equal, key by key, phase by phase and vCPU by
    vCPU; only timestamps (each program reads the clock itself) may differ.
    """
    phases = [MicroPhase("a", 24, 2), MicroPhase("b", 8, 3)]
    token = 0x5B17
    image = build_micro_image(tmp_path / "img", phases, token)
    with (
        micro_vm(image, tmp_path) as vm,
        Tracer(P.select(["all"]), [TraceTarget("micro", vm.pid, token)],
               workdir=tmp_path / "bt", backend=make_backend("bpftrace"),
               stacks=["kvm_cpuid", "kvm_mmu_get_page"]) as bt,
        Tracer(P.select(["all"]), [TraceTarget("micro", vm.pid, token)],
               workdir=tmp_path / "lb", backend=make_backend("libbpf"),
               stacks=["kvm_cpuid", "kvm_mmu_get_page"]) as lb,
    ):
        bt.start()
        lb.start()
        target = bt.program.targets[0]
        bt.mark_phase(target, 7)  # seen by both: the same token
        vm.cont()
        # Dumps while the guest runs: libbpf's counts come from per-CPU slots flushed
        # into a hash as phases change; no dump may count an event twice or lose one
        # it had, so every key's count only grows from dump to dump.
        dumps = []
        while vm.proc.poll() is None and len(dumps) < 400:
            dumps.append(lb.snapshot().counter("evt"))
        assert vm.wait() == QEMU_EXIT_STATUS
        bt.mark_phase(target, 0)
        mid_bt, mid_lb = bt.snapshot(), lb.snapshot()
        final_bt, final_lb = bt.stop(), lb.stop()
    assert {s.probe.name for s in bt.program.attached} == {
        s.probe.name for s in lb.program.attached
    }
    # Timestamps differ (each program reads the clock); @dump_done is each tracer's own.
    timestamps = {"marker_ns", "hmark_ns", "gdur", "hdur", "dump_done"}
    for a, b in ((mid_bt, mid_lb), (final_bt, final_lb)):
        names = (set(a.counters) | set(b.counters)) - timestamps
        assert {"evt", "markers", "hmarks", "getpage"} <= names
        for name in sorted(names):
            assert a.counter(name) == b.counter(name), name
        assert set(a.counter("marker_ns")) == set(b.counter("marker_ns"))
        assert set(a.counter("gdur")) == set(b.counter("gdur"))
        assert a.stack("stk") == b.stack("stk")
    evt = final_lb.counter("evt")
    # Every instruction the guest ran from reset to its exit, as micro.asm says.
    insn = P.probe_id("kvm_emulate_insn")
    emulated = sum(n for key, n in evt.items() if key[-1] == insn)
    assert emulated == sum(expected_emulated_insns(phases).values())
    assert len(dumps) >= 5, "the guest finished before dumps could be taken"
    for before, after in itertools.pairwise([*dumps, evt]):
        assert all(after.get(k, 0) >= n for k, n in before.items())
    # Each guest marker once, in both.
    assert final_lb.counter("markers") == {(vm.pid, k): 1 for k in (0, 1, 2)}
    # The phases' durations, timed by each program's own clock, agree to a few microseconds.
    for key, ns in final_bt.counter("gdur").items():
        assert abs(final_lb.counter("gdur")[key] - ns) < 200_000, key


def test_auto_uses_bpftrace_for_more_vms_than_libbpf_traces(tmp_path: Path) -> None:
    """auto: libbpf traces at most 16 VMs at once; a round with 17 gets bpftrace, and says so."""
    with contextlib.ExitStack() as stack:
        pids = [stack.enter_context(sleeper()).pid for _ in range(17)]
        targets = [TraceTarget(f"vm{i}", pid, 0x200 + i) for i, pid in enumerate(pids)]
        made: list[str] = []

        def make(choice: Choice) -> Tracer:
            made.append(choice.backend.name)
            return Tracer(P.select(["markers"]), targets, workdir=tmp_path / choice.backend.name,
                          backend=choice.backend, backend_reason=choice.reason)

        tracer = start_backend("auto", make, stack.enter_context)
        assert made == ["libbpf", "bpftrace"]
        summary = tracer.summary()
        assert summary.backend == "bpftrace" and summary.tracer_status == "ok"
        assert summary.backend_reason is not None and "at most 16" in summary.backend_reason
        tracer.stop()
        # Asked for by name, libbpf is not replaced: the error says why.
        with pytest.raises(BackendStartError, match="at most 16") as err:
            start_backend("libbpf", make, stack.enter_context)
        assert err.value.backend == "libbpf"


def test_host_markers_of_another_process_do_not_count(tmp_path: Path, backend: Backend) -> None:
    """Another harness that drew the same token (or session) cannot move our phases."""
    with (
        sleeper() as p,
        Tracer(P.select(["markers"]), [TraceTarget("x", p.pid, 0x4321)], workdir=tmp_path,
               backend=backend) as tracer,
    ):
        tracer.start()
        t = tracer.program.targets[0]
        session = tracer.program.session
        code = (
            "import os\n"
            "def m(w, who):\n"
            "    try: os.getpriority(w, who - (1 << 32) if who >= (1 << 31) else who)\n"
            "    except OSError: pass\n"
            f"m(0x4B564D00, (0x4321 << 16) | 9)\n"
            f"m(0x4B564D01, ({session} << 16) | 999)\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
        tracer.mark_phase(t, 1)
        final = tracer.stop()
    assert final.counter("hmarks") == {(p.pid, 1): 1}
    # No dump answered the stranger's request (the tracer's raw output has no seq 999).
    assert '"@dump_done": 999' not in tracer.output_path.read_text()
