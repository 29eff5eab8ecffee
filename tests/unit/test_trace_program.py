"""Generated bpftrace programs: structure, validation of inputs, and bpftrace acceptance."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from harness.trace import probes as P
from harness.trace.program import (
    HOST_DUMP_WHICH,
    ProgramError,
    TraceTarget,
    check_program,
    generate,
    stderr_filter,
)
from tests.conftest import prerequisite_missing

T1 = TraceTarget("vm-a", 1111, 7)
T2 = TraceTarget("vm-b", 2222, 0xFFFF)


def fake_status(name: str, attach: str | None = None, available: bool = True) -> P.ProbeStatus:
    """A status as availability() would give it on a host that offers ``name``."""
    p = P.get(name)
    spec = attach or (f"tracepoint:{p.target}" if p.kind == "tracepoint" else f"kfunc:{p.target}")
    return P.ProbeStatus(p, available, "test host" if available else "not here",
                         spec if available else None)


def test_every_probe_filtered_to_target_pids_and_keyed_by_phase() -> None:
    sts = [fake_status(p.name) for p in P.CATALOGUE]
    prog = generate(sts, [T1, T2], session=5)
    text = prog.text
    for p in P.CATALOGUE:
        spec = f"tracepoint:{p.target}" if p.kind == "tracepoint" else f"kfunc:{p.target}"
        block = text.split(f"\n{spec}\n", 1)[1].split("\n}\n", 1)[0]
        assert block.startswith("/pid == 1111 || pid == 2222/"), p.name
        # One counter update per event: totals and per-vCPU views are derived in Python.
        assert f"@evt[pid, tid, $g, $h, {P.probe_id(p.name)}] = count();" in block
        assert block.count("= count();") == (2 if p.name == "kvm_cpuid" else 1) + sum(
            m in block for m in ("@exits[", "@pf[", "@crw[", "@getpage["))
    # Guest markers are accepted only with the token of the VM that runs them.
    assert "(pid == 1111 && ($index >> 16) == 7)" in text
    assert "(pid == 2222 && ($index >> 16) == 65535)" in text
    # Each tracepoint field is loaded once per block, before any branch: a field read in
    # several arms of the per-target disjunction is what the verifier rejected.
    for block in text.split("\n}\n"):
        body = block.split("\n{\n", 1)[-1]
        fields = re.findall(r"args->(\w+)", body)
        assert len(fields) == len(set(fields)), block
        if fields and "if (" in body:
            assert body.rindex("args->") < body.index("if ("), block
    assert "$index = args->index;" in text and "$which = args->which;" in text
    # Host markers map tokens to pids (the syscall comes from the harness).
    assert "if (($who >> 16) == 7) {  // vm-a" in text
    assert "@hphase[(uint64)1111] = $ph;" in text
    # Marker or dump, and only from the harness that generated the program.
    assert f"/pid == {os.getpid()} && (args->which | 1) == {HOST_DUMP_WHICH:#x}/" in text
    other = generate(sts, [T1, T2], session=5, owner=4242).text
    assert f"/pid == 4242 && (args->which | 1) == {HOST_DUMP_WHICH:#x}/" in other
    assert "} else if (($who >> 16) == 5) {" in text
    assert text.index("print(@lat);") < text.index("print(@dump_done);")
    assert prog.latencies == (0, 1)
    assert prog.probe_names[P.probe_id("kvm_exit")] == "kvm_exit"
    assert prog.target(2222) is T2
    assert len(prog.sha256) == 64


def test_unavailable_probes_are_left_out_and_listed() -> None:
    sts = [fake_status("kvm_cpuid"), fake_status("kvm_exit"),
           fake_status("kvm_entry", available=False)]
    prog = generate(sts, [T1], session=1)
    assert [s.probe.name for s in prog.not_attached] == ["kvm_entry"]
    assert "tracepoint:kvm:kvm_entry" not in prog.text
    # Latency needs both ends; page-fault naming needs kvm_exit and kvm_page_fault.
    assert prog.latencies == ()
    assert "@lat" not in prog.text and "@lx" not in prog.text
    assert "lat" not in prog.maps and "exits" in prog.maps and "pf" not in prog.maps


def test_without_marker_probe_phases_come_from_host_windows_only() -> None:
    prog = generate([fake_status("kvm_pio")], [T1], session=1)
    assert "@gphase" not in prog.text
    assert "$g = (uint64)0;" in prog.text
    assert "gphase" not in prog.maps and "hphase" in prog.maps


def test_kprobe_fallback_spec_is_used() -> None:
    prog = generate([fake_status("kvm_mmu_load", "kprobe:kvm_mmu_load")], [T1], session=1)
    assert "\nkprobe:kvm_mmu_load\n" in prog.text


@pytest.mark.parametrize(
    ("targets", "needle"),
    [
        ([], "at least one TraceTarget"),
        ([TraceTarget("x", 0, 1)], r"targets\[0\] \('x'\)\.pid"),
        ([TraceTarget("x", 5, 0)], r"\.token: 0 is not in 1\.\.65535"),
        ([TraceTarget("x", 5, 70000)], r"\.token: 70000"),
        ([TraceTarget("x", 5, 1), TraceTarget("y", 5, 2)], "listed twice"),
        ([TraceTarget("x", 5, 1), TraceTarget("y", 6, 1)], "used twice"),
    ],
)
def test_bad_targets_are_named(targets: list[TraceTarget], needle: str) -> None:
    with pytest.raises(ProgramError, match=needle):
        generate([fake_status("kvm_cpuid")], targets)


def test_session_is_random_by_default_and_checked() -> None:
    a = generate([fake_status("kvm_cpuid")], [T1])
    assert 1 <= a.session <= 0xFFFF
    with pytest.raises(ProgramError, match="session"):
        generate([fake_status("kvm_cpuid")], [T1], session=0)


def test_stderr_filter_drops_known_noise() -> None:
    raw = (
        "Error while reading traceable functions from /sys/kernel/debug/tracing/"
        "available_filter_functions: Operation not permittedERROR: Unknown error -1: "
        "couldn't set RLIMIT_MEMLOCK for bpftrace. If your program is not loading, you can "
        'try "ulimit -l 8192" to fix the problem\nstdin:1:1: ERROR: real problem'
    )
    assert stderr_filter(raw) == "stdin:1:1: ERROR: real problem"


# --- bpftrace acceptance -----------------------------------------------------------

BPFTRACE = shutil.which("bpftrace")
needs_bpftrace = pytest.mark.skipif(
    BPFTRACE is None or os.geteuid() != 0,
    reason="needs root and bpftrace (apt-get install bpftrace) to compile programs",
)


@pytest.fixture(scope="module")
def host_statuses() -> list[P.ProbeStatus]:
    if not Path("/sys/kernel/tracing/events").is_dir():
        prerequisite_missing("tracefs not mounted: mount -t tracefs nodev /sys/kernel/tracing "
                             "(harness doctor --fix mounts it)")
    return P.availability(P.CATALOGUE)


@needs_bpftrace
@pytest.mark.parametrize("group", ["default", "all", "tracepoints", "markers"])
def test_bpftrace_accepts_group_programs(group: str, host_statuses: list[P.ProbeStatus]) -> None:
    wanted = {p.name for p in P.select([group])}
    sts = [s for s in host_statuses if s.probe.name in wanted]
    check_program(generate(sts, [T1, T2]).text)


@needs_bpftrace
def test_bpftrace_accepts_each_single_probe(host_statuses: list[P.ProbeStatus]) -> None:
    """Every available probe alone (plus the marker), and without the marker probe."""
    for s in host_statuses:
        if not s.available:
            continue
        marker = [x for x in host_statuses if x.probe.name == P.MARKER_PROBE]
        check_program(generate([*marker, s], [T1]).text)
        check_program(generate([s], [T1]).text)


@needs_bpftrace
def test_bpftrace_accepts_kprobe_function_blocks() -> None:
    """kprobe syntax compiles even where kprobes cannot attach (bpftrace -d does not attach)."""
    sts = [fake_status("kvm_cpuid"), fake_status("kvm_mmu_load", "kprobe:kvm_mmu_load")]
    check_program(generate(sts, [T1]).text)


@needs_bpftrace
def test_bpftrace_rejection_is_reported() -> None:
    with pytest.raises(ProgramError, match="kvm_no_such_event"):
        check_program("tracepoint:kvm:kvm_no_such_event { @x = count(); }\n")


def test_template_digest_ignores_pids_tokens_session_but_not_probes_or_count() -> None:
    sts = [fake_status("kvm_cpuid"), fake_status("kvm_exit")]
    a = generate(sts, [T1, T2], session=5)
    b = generate(sts, [TraceTarget("x", 42, 9), TraceTarget("y", 43, 10)], session=77)
    assert a.sha256 != b.sha256  # the real programs differ ...
    assert a.template_sha256 == b.template_sha256  # ... the program they instantiate does not
    assert len(a.template_sha256) == 64
    assert generate(sts, [T1], session=5).template_sha256 != a.template_sha256
    other = generate([fake_status("kvm_cpuid")], [T1, T2], session=5)
    assert other.template_sha256 != a.template_sha256
