"""KVM's own per-VM counters, to cross-check totals counted from tracepoints.

Two sources, same numbers (KVM's ``kvm_vm_stat`` / ``kvm_vcpu_stat``):

* debugfs ``/sys/kernel/debug/kvm/<pid>-<fd>/<stat>``: one integer per file,
  vCPU stats already summed over the VM's vCPUs.  Readable by root from any
  process - unless the kernel is locked down: then every stat file fails with
  EPERM ("Lockdown: debugfs access is restricted", seen on the 6.18 PVM
  development host).  :func:`read_vm_stats` returns None in that case.
* QEMU's QMP ``query-stats`` (QEMU >= 7.1), which reads KVM's binary stats fd
  (``KVM_GET_STATS_FD``) inside QEMU.  The binary interface itself cannot be
  used from another process: KVM rejects ioctls on a VM fd whose ``mm`` is not
  the caller's (EIO), even on a descriptor duplicated with ``pidfd_getfd``.
  :func:`read_qmp_stats` talks to a QMP socket the harness gave QEMU;
  :func:`read_libvirt_stats` sends the same command through libvirt's monitor.

:data:`TRACE_EQUIVALENTS` says which traced quantity each counter should equal,
decided from the kernel source (v6.18: ``arch/x86/kvm/x86.c``
``kvm_vcpu_stats_desc`` / ``kvm_vm_stats_desc``, ``mmu/mmu.c``,
``vmx/vmx.c``, ``svm/svm.c``); :data:`EXACT_EQUIVALENTS` lists the ones that
are incremented next to the tracepoint and so must match exactly.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEBUGFS_KVM = Path("/sys/kernel/debug/kvm")

#: KVM stat -> traced quantity it should equal (see the module docstring for sources).
TRACE_EQUIVALENTS: dict[str, str] = {
    # ++vcpu->stat.exits in vcpu_enter_guest() once per VM exit (fastpath re-entries
    # included); trace_kvm_exit() in vmx_vcpu_run()/svm_vcpu_run() once per exit.
    # The PVM backend counts exits but never fires kvm_exit.
    "exits": "kvm:kvm_exit count (VMX/SVM only)",
    # Both in x86_decode_emulated_instruction(): trace_kvm_emulate_insn_start()
    # is kvm_emulate_insn with failed=0.
    "insn_emulation": "kvm:kvm_emulate_insn count with failed == 0",
    # handle_emulation_failure(): ++insn_emulation_fail and trace_kvm_emulate_insn_failed().
    "insn_emulation_fail": "kvm:kvm_emulate_insn count with failed == 1",
    # __kvm_emulate_hypercall(): ++hypercalls then trace_kvm_hypercall().
    "hypercalls": "kvm:kvm_hypercall count (VMX/SVM)",
    # vmx_inject_irq()/svm_inject_irq(): ++irq_injections and trace_kvm_inj_virq().
    "irq_injections": "kvm:kvm_inj_virq count (VMX/SVM; PVM injects untraced)",
    # kvm_mmu_page_fault(): ++pf_taken only when the MMIO-SPTE shortcut did not
    # handle the fault; kvm_page_fault fires in the vendor handler before it.
    "pf_taken": "kvm:kvm_page_fault count, minus faults on MMIO SPTEs (approximate)",
    "pf_fast": "kvmmmu:fast_page_fault count with a fixed result (approximate)",
    "pf_mmio_spte_created": "kvmmmu:mark_mmio_spte count (approximate)",
    "pf_guest": "kvm:kvm_inj_exception count for #PF (vector 14) (approximate)",
    "io_exits": "kvm:kvm_exit IO_INSTRUCTION (VMX) / io (SVM) count (approximate)",
    "halt_exits": "kvm:kvm_exit HLT (VMX) / hlt (SVM) count (approximate)",
    "irq_exits": "kvm:kvm_exit EXTERNAL_INTERRUPT (VMX) / interrupt (SVM) count (approximate)",
    "irq_window_exits": "kvm:kvm_exit INTERRUPT_WINDOW (VMX) / vintr (SVM) (approximate)",
    "invlpg": "kvm:kvm_exit INVLPG / invlpg count under shadow paging (approximate)",
    "mmio_exits": "kvm:kvm_userspace_exit with reason KVM_EXIT_MMIO (6) (approximate)",
    "signal_exits": "kvm:kvm_userspace_exit with reason KVM_EXIT_INTR (10) (approximate)",
    # Shadow MMU (tdp_mmu=N, shadow paging, PVM): __kvm_mmu_prepare_zap_page() bumps the
    # stat next to trace_kvm_mmu_prepare_zap_page(); the TDP MMU zaps elsewhere.
    # Teardown zaps after the last read make traced totals larger (48 vs 56 seen).
    "mmu_shadow_zapped": "kvmmmu:kvm_mmu_prepare_zap_page count (shadow MMU, approximate)",
    # kvm_mmu_find_shadow_page() counts a miss; __kvm_mmu_get_shadow_page() then traces
    # kvm_mmu_get_page with created=1.
    "mmu_cache_miss": "kvmmmu:kvm_mmu_get_page count with created == 1 (shadow MMU)",
}

#: Stats bumped unconditionally next to their tracepoint on every backend: traced totals
#: must match.  insn_emulation and mmu_cache_miss were seen equal on the PVM host
#: (3746382 and 28 over a 3 s tiny-guest run).  hypercalls / irq_injections are exact on
#: VMX/SVM by the source but not here: PVM injected 26 IRQs without one kvm_inj_virq.
EXACT_EQUIVALENTS: frozenset[str] = frozenset(
    {"insn_emulation", "insn_emulation_fail", "mmu_cache_miss"}
)


# --- debugfs ----------------------------------------------------------------


def vm_stat_dirs(pid: int, root: Path = DEBUGFS_KVM) -> list[Path]:
    """debugfs directories of the VMs created by process ``pid`` (``<pid>-<fd>``)."""
    if not root.is_dir():
        return []
    return sorted(d for d in root.glob(f"{pid}-*") if d.is_dir() and d.name.split("-")[1].isdigit())


def parse_stat_value(text: str) -> int | None:
    """A debugfs stat file's value; None for non-scalar files (histograms, text)."""
    parts = text.split()
    if len(parts) != 1:
        return None
    try:
        return int(parts[0], 0)
    except ValueError:
        return None


def read_stat_dir(directory: Path) -> dict[str, int]:
    """Every scalar stat file directly in ``directory`` (per-vCPU subdirectories skipped).

    Raises ``PermissionError`` when debugfs is locked down.
    """
    stats: dict[str, int] = {}
    for f in sorted(directory.iterdir()):
        if not f.is_file():
            continue
        value = parse_stat_value(f.read_text())
        if value is not None:
            stats[f.name] = value
    return stats


def read_vm_stats(pid: int, root: Path = DEBUGFS_KVM) -> dict[str, int] | None:
    """KVM stats of process ``pid``'s VMs from debugfs, summed over its VM directories.

    None when debugfs is not mounted, ``pid`` has no VM, or the kernel's lockdown
    makes the stat files unreadable (then use :func:`read_qmp_stats`).
    """
    dirs = vm_stat_dirs(pid, root)
    if not dirs:
        return None
    total: dict[str, int] = {}
    try:
        for d in dirs:
            for name, value in read_stat_dir(d).items():
                total[name] = total.get(name, 0) + value
    except PermissionError:
        return None
    except FileNotFoundError:
        return None  # the VM went away while we read it
    return total


def debugfs_unavailable_reason(pid: int, root: Path = DEBUGFS_KVM) -> str | None:
    """Why :func:`read_vm_stats` gives None for ``pid`` (None when it would not)."""
    if not root.is_dir():
        return f"{root} missing: mount -t debugfs nodev {root.parent}"
    dirs = vm_stat_dirs(pid, root)
    if not dirs:
        return f"no VM of pid {pid} under {root}"
    try:
        read_stat_dir(dirs[0])
    except PermissionError:
        return f"{dirs[0]} unreadable: kernel lockdown restricts debugfs"
    except FileNotFoundError:
        return f"VM of pid {pid} exited"
    return None


def diff(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """``after - before`` per stat; a stat missing from ``before`` counts from 0.

    Cumulative counters give the work done in between; for instant stats
    (``pages_4k``, ``mmu_unsync``) the result is the change and may be negative.
    """
    return {name: value - before.get(name, 0) for name, value in after.items()}


# --- QMP query-stats ----------------------------------------------------------


def parse_query_stats(*replies: Any) -> dict[str, int]:
    """Sum the scalar ``kvm`` stats of QMP ``query-stats`` replies (vm and vcpu targets).

    Accepts either full replies (``{"return": [...]}``) or their ``return`` lists.
    vCPU stats are summed over vCPUs, matching debugfs' per-VM files; booleans
    count as 0/1; histograms (lists) are skipped. A reply of any other shape is a
    ValueError that says so (QEMU's answer is input, not trusted to be well formed).
    """
    total: dict[str, int] = {}
    for reply in replies:
        entries = reply.get("return") if isinstance(reply, dict) else reply
        if not isinstance(entries, list):
            raise ValueError(f"query-stats reply has no 'return' list: {str(reply)[:200]}")
        for entry in entries:
            if not isinstance(entry, dict):
                raise ValueError(f"query-stats reply: an entry is not an object: {entry!r:.200}")
            if entry.get("provider") != "kvm":
                continue
            stats = entry.get("stats", [])
            if not isinstance(stats, list):
                raise ValueError(f"query-stats reply: 'stats' is not a list: {stats!r:.200}")
            for stat in stats:
                if not isinstance(stat, dict) or not isinstance(stat.get("name"), str):
                    raise ValueError(f"query-stats reply: a stat without a name: {stat!r:.200}")
                value = stat.get("value")
                if isinstance(value, bool):
                    value = int(value)
                if isinstance(value, int):
                    total[stat["name"]] = total.get(stat["name"], 0) + value
    return total


class QmpError(RuntimeError):
    """QEMU's monitor answered with an error or not at all."""


#: Longest QMP message read, and most messages (events) read while waiting for one reply.
MAX_QMP_LINE = 1 << 20
MAX_QMP_MESSAGES = 1000


def _qmp_command(stream: Any, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """Send ``command`` and return its reply; anything else QEMU says is a QmpError.

    Bounded: at most MAX_QMP_MESSAGES messages of MAX_QMP_LINE characters are read.
    """
    msg: dict[str, Any] = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    stream.write(json.dumps(msg) + "\n")
    stream.flush()
    for _ in range(MAX_QMP_MESSAGES):
        line = stream.readline(MAX_QMP_LINE + 1)
        if not line:
            raise QmpError(f"QMP connection closed while waiting for {command}")
        if len(line) > MAX_QMP_LINE:
            raise QmpError(f"QMP {command}: a message longer than {MAX_QMP_LINE} characters")
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise QmpError(f"QMP {command}: not a JSON message: {line[:200]!r}") from e
        if not isinstance(reply, dict):
            raise QmpError(f"QMP {command}: not a JSON object: {line[:200]!r}")
        if "error" in reply:
            err = reply["error"]
            desc = err.get("desc", err) if isinstance(err, dict) else err
            raise QmpError(f"QMP {command}: {str(desc)[:200]}")
        if "return" in reply:
            return reply  # events ({"event": ...}) are skipped
    raise QmpError(f"QMP {command}: no reply among {MAX_QMP_MESSAGES} messages")


def qmp_query_stats(stream: Any) -> dict[str, int]:
    """KVM stats over an open, capability-negotiated QMP text stream."""
    vm = _qmp_command(stream, "query-stats", {"target": "vm"})
    vcpu = _qmp_command(stream, "query-stats", {"target": "vcpu"})
    return parse_query_stats(vm, vcpu)


def read_qmp_stats(qmp_socket: Path, timeout_s: float = 5.0) -> dict[str, int]:
    """KVM stats of the QEMU listening on QMP unix socket ``qmp_socket``.

    The socket must be one the harness owns (``-qmp unix:PATH,server=on,wait=off``)
    and not otherwise connected: QEMU serves one QMP client per socket at a time.
    A libvirt domain's monitor belongs to libvirt; use :func:`read_libvirt_stats`.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(qmp_socket))
            with sock.makefile("rw", encoding="utf-8") as stream:
                if not stream.readline():  # the greeting
                    raise QmpError(f"{qmp_socket}: no QMP greeting")
                _qmp_command(stream, "qmp_capabilities")
                return qmp_query_stats(stream)
        except TimeoutError as e:
            raise QmpError(
                f"{qmp_socket}: no QMP answer within {timeout_s} s (another client connected?)"
            ) from e


def read_libvirt_stats(domain: Any) -> dict[str, int]:
    """KVM stats of a running libvirt domain (``virDomainPtr``), via its QEMU monitor."""
    import libvirt_qemu

    replies = [
        json.loads(
            libvirt_qemu.qemuMonitorCommand(
                domain,
                json.dumps({"execute": "query-stats", "arguments": {"target": target}}),
                0,
            )
        )
        for target in ("vm", "vcpu")
    ]
    return parse_query_stats(*replies)
