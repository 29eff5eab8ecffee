"""KVM statistics from a real tiny KVM guest, cross-checked against real bpftrace counts.

Also runs ``harness doctor``'s checks against the live host.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.host.doctor import render, required_failures, run_checks
from harness.host.facts import collect_host_facts
from harness.image.micro import (
    INSNS_TO_HALT,
    MicroPhase,
    build_micro_image,
    expected_emulated_insns,
)
from harness.trace.kvmstats import (
    _qmp_command,
    debugfs_unavailable_reason,
    diff,
    read_qmp_stats,
    read_vm_stats,
)
from tests.conftest import requires

pytestmark = pytest.mark.integration

# Real mode, forever: a marker cpuid, then 512 bytes of rep stosw. Every instruction traps
# to KVM's emulator under PVM; on VMX/SVM the cpuid still exits each round.
BOOT_ASM = """\
bits 16
org 0x7c00
  cli
  xor ax, ax
  mov ds, ax
  mov es, ax
spin:
  mov eax, 0x4B564D00
  mov ecx, 1
  cpuid
  mov di, 0x1000
  mov cx, 256
  rep stosw
  jmp spin
times 510-($-$$) db 0
dw 0xaa55
"""


def _need(*tools: str) -> None:
    requires(tools=tools, kvm=True)


@pytest.fixture
def boot_img(tmp_path: Path) -> Path:
    _need("nasm")
    (tmp_path / "boot.asm").write_text(BOOT_ASM)
    img = tmp_path / "boot.img"
    subprocess.run(["nasm", "-f", "bin", str(tmp_path / "boot.asm"), "-o", str(img)], check=True)
    with img.open("r+b") as f:
        f.truncate(1474560)  # a 1.44 MB floppy
    return img


#: The micro guest of the QMP test: small, and its whole run is known exactly.
MICRO_PHASES = (MicroPhase("one", 1, 1), MicroPhase("two", 2, 1))


@pytest.fixture
def paused_guest(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """The micro guest's ROM, created paused (-S) with a QMP socket; killed afterwards.

    Without an isa-debug-exit device it halts for good after its phases
    (cli; hlt), so its counters stop where its code says.
    """
    _need("qemu-system-x86_64", "nasm")
    image = build_micro_image(tmp_path / "img", MICRO_PHASES, token=0x51A7)
    assert image.rom_path is not None
    qmp = tmp_path / "qmp.sock"
    argv = [
        "qemu-system-x86_64", "-accel", "kvm", "-m", "16", "-display", "none", "-no-reboot",
        "-nodefaults", "-S", "-qmp", f"unix:{qmp},server=on,wait=off",
        "-bios", str(image.rom_path),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not qmp.exists():
            assert proc.poll() is None, "qemu exited before opening its QMP socket"
            assert time.monotonic() < deadline, "qemu did not open its QMP socket in 10 s"
            time.sleep(0.05)
        yield proc, qmp
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _qmp(qmp: Path, command: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(qmp))
        with s.makefile("rw", encoding="utf-8") as f:
            f.readline()
            _qmp_command(f, "qmp_capabilities")
            _qmp_command(f, command)


def _run_until_halted(qmp: Path, timeout_s: float = 60) -> None:
    """``cont``; once the guest has halted (its ``halt_exits`` count moves), ``stop``."""
    before = read_qmp_stats(qmp)
    _qmp(qmp, "cont")
    deadline = time.monotonic() + timeout_s
    while diff(before, read_qmp_stats(qmp)).get("halt_exits", 0) == 0:
        assert time.monotonic() < deadline, f"the guest did not halt within {timeout_s} s"
        time.sleep(0.1)
    _qmp(qmp, "stop")


def _run_for(qmp: Path, seconds: float) -> None:
    """``cont``, wait, ``stop``: counters are frozen while the vCPUs are stopped."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(qmp))
        with s.makefile("rw", encoding="utf-8") as f:
            f.readline()
            _qmp_command(f, "qmp_capabilities")
            _qmp_command(f, "cont")
            time.sleep(seconds)
            _qmp_command(f, "stop")


def test_qmp_stats_advance_and_debugfs_agrees_or_says_why(
    paused_guest: tuple[subprocess.Popen[bytes], Path],
) -> None:
    proc, qmp = paused_guest
    before = read_qmp_stats(qmp)
    assert "exits" in before and "insn_emulation" in before
    _run_until_halted(qmp)
    delta = diff(before, read_qmp_stats(qmp))
    assert delta["exits"] > 0 and delta["halt_exits"] >= 1
    facts = collect_host_facts()
    if facts.mmu_mode == "pvm":
        # PVM emulates every guest instruction: KVM's counter holds the guest's whole
        # run from reset to its hlt, exactly as micro.asm's code gives it.
        expected = sum(expected_emulated_insns(MICRO_PHASES).values()) + INSNS_TO_HALT
        assert delta["insn_emulation"] == expected, (delta, expected)
    debugfs = read_vm_stats(proc.pid)
    if debugfs is None:
        reason = debugfs_unavailable_reason(proc.pid)
        assert reason, "read_vm_stats gave None without a reason"
    else:
        # Paused guest: debugfs must show the same frozen counters as QMP.
        assert debugfs["exits"] == read_qmp_stats(qmp)["exits"]


def test_doctor_live_host_has_no_required_failures() -> None:
    checks = run_checks()
    lines = render(checks)
    assert len(lines) == len(checks)
    assert required_failures(checks) == [], "\n".join(lines)


@pytest.mark.parametrize("backend", ["bpftrace", "libbpf"])
def test_insn_emulation_equals_traced_kvm_emulate_insn(
    boot_img: Path, tmp_path: Path, backend: str
) -> None:
    """KVM's own insn_emulation(+_fail) = kvm_emulate_insn events, through each backend.

    Through the harness's Tracer: a bare ``bpftrace -e`` once ignored SIGINT for
    a minute (bpftrace 0.17 can take it on a thread that then sleeps) and,
    left running, slowed the next tests' guests; the Tracer nudges and kills.
    """
    _need("qemu-system-x86_64", "bpftrace" if backend == "bpftrace" else "bpftool")
    from harness.trace import probes as P
    from harness.trace.program import TraceTarget
    from harness.trace.runner import Tracer
    from tests.integration.conftest import make_backend

    qmp = tmp_path / "qmp.sock"
    argv = [
        "qemu-system-x86_64", "-accel", "kvm", "-m", "16", "-display", "none",
        "-no-reboot", "-nodefaults", "-S", "-qmp", f"unix:{qmp},server=on,wait=off",
        "-drive", f"file={boot_img},format=raw,if=floppy", "-boot", "a",
    ]  # fmt: skip
    q = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not qmp.exists():
            assert q.poll() is None
            time.sleep(0.05)
        with Tracer(P.select(["kvm_emulate_insn"]), [TraceTarget("floppy", q.pid, 0x77)],
                    workdir=tmp_path / "trace", backend=make_backend(backend)) as tracer:
            tracer.start()
            before = read_qmp_stats(qmp)
            _run_for(qmp, 1.0)
            delta = diff(before, read_qmp_stats(qmp))
            final = tracer.stop()
    finally:
        q.kill()
        q.wait(timeout=10)
    traced = final.counter("total").get((q.pid, P.probe_id("kvm_emulate_insn")), 0)
    assert traced > 0
    assert traced == delta["insn_emulation"] + delta.get("insn_emulation_fail", 0)
