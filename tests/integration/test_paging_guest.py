"""The paging micro guest under real QEMU/KVM, traced by the harness tracer: known answers.

Every per-phase count below is derived from KVM's source (see
``harness.image.paging.RootCache`` and ``expected_answers``), not from an
earlier run. The derivation assumes what this host is: KVM shadows the
guest's page tables and emulates every guest instruction (the PVM backend);
on other hosts the exact tests skip.

Root cache, in short (arch/x86/kvm/mmu/mmu.c): a CR3 write that changes CR3
goes kvm_set_cr3 -> kvm_mmu_new_pgd -> fast_pgd_switch ->
cached_root_find_and_keep_current, which keeps current + KVM_MMU_NUM_PREV_ROOTS
(3) roots in LRU order. A hit costs nothing traceable; a miss frees the LRU
root and kvm_mmu_load -> mmu_alloc_shadow_roots -> mmu_alloc_root looks the
new root up: one ``kvmmmu:kvm_mmu_get_page``, ``created`` only the first time
that PML4 is used. So round-robin over K <= 4 address spaces costs no lookup
per switch once every space was visited, and over K >= 5 costs exactly one
per switch (LRU always evicts the space needed next).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from harness.host.mmuconfig import HostConfigSpec, HostConfigurator, plan
from harness.image.paging import (
    KVM_MMU_NUM_PREV_ROOTS,
    QEMU_EXIT_STATUS,
    PagingPhase,
    build_paging_image,
    expected_answers,
)
from harness.trace import probes as P
from harness.trace.correlate import phase_traces
from harness.trace.model import PhaseTrace
from harness.trace.program import TraceTarget
from harness.trace.runner import Tracer
from tests.conftest import host_difference_skip
from tests.integration.conftest import BACKENDS, make_backend
from tests.integration.micro_qemu import micro_vm

pytestmark = [
    pytest.mark.integration,
    pytest.mark.requires(
        root=True, tools=("bpftrace", "qemu-system-x86_64", "nasm"), kvm=True,
        tracepoints=("kvm/kvm_cpuid", "kvmmmu/kvm_mmu_get_page"), mmu_modes=("pvm",),
        why="the known answers assume KVM emulates every guest instruction",
    ),
]

#: Probes the answers are about, plus the marker.
PROBES = ("kvm_cpuid", "kvm_cr", "kvm_emulate_insn", "kvm_mmu_get_page",
          "kvm_mmu_set_accessed_bit", "kvm_mmu_set_dirty_bit", "kvm_mmu_prepare_zap_page",
          "kvm_mmu_sync_page")


def _phases(k: int, n1: int, n2: int, pages: int, edits: int) -> list[PagingPhase]:
    return [
        PagingPhase("cr3-visit-all", "cr3", k),
        PagingPhase("cr3-cycle-a", "cr3", n1),
        PagingPhase("cr3-cycle-b", "cr3", n2),
        PagingPhase("touch-first", "touch", pages),
        PagingPhase("touch-again", "touch", pages),
        PagingPhase("pte-edit-invlpg", "pte", edits),
        PagingPhase("touch-after-edit", "touch", pages),
    ]


def run_paging(
    tmp_path: Path,
    k: int,
    phases: Sequence[PagingPhase],
    token: int,
    qemu_args: Sequence[str] = (),
    while_paused: Callable[[], None] | None = None,
    backend: str = "bpftrace",
) -> dict[int, PhaseTrace]:
    """Boot the paging ROM paused, attach the tracer, run it to its exit; per-phase traces."""
    image = build_paging_image(tmp_path / "img", k, phases, token)
    with (
        micro_vm(image, tmp_path, qemu_args) as vm,
        Tracer(P.select(PROBES), [TraceTarget("paging", vm.pid, token)],
               workdir=tmp_path / "trace", backend=make_backend(backend)) as tracer,
    ):
        tracer.start()
        if while_paused is not None:
            while_paused()
        vm.cont()
        assert vm.wait() == QEMU_EXIT_STATUS
        final = tracer.stop()
        target = tracer.program.targets[0]
    assert tracer.status == "ok", tracer.error
    return phase_traces(final, target, list(range(1, len(phases) + 1)), attached=PROBES)


# K on both sides of the cache (1 + KVM_MMU_NUM_PREV_ROOTS = 4 roots), with two
# cycle lengths per boot: one not a multiple of K, one long.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
def test_paging_guest_costs_what_kvm_source_says(tmp_path: Path, k: int, backend: str) -> None:
    n1, n2 = 3 * k + 1, 200
    phases = _phases(k, n1, n2, pages=600, edits=40)
    pt = run_paging(tmp_path, k, phases, token=0x6A00 + k, backend=backend)
    want = expected_answers(k, phases)

    for p in range(len(phases) + 1):
        assert pt[p].markers_seen == 1, f"marker {p}"
        assert pt[p].attribution == "guest-marker"
    for p, a in want.items():
        got = pt[p]
        name = phases[p - 1].name
        assert got.mmu_events.get("kvm_mmu_get_page", 0) == a.root_lookups, name
        assert (got.shadow_pages_created, got.shadow_pages_found) == (
            a.roots_created, a.roots_found), name
        assert got.mmu_events.get("kvm_mmu_set_accessed_bit", 0) == a.accessed_bits, name
        assert got.mmu_events.get("kvm_mmu_set_dirty_bit", 0) == a.dirty_bits, name
        assert got.emulated_insns == a.emulated_insns, name
        # Nothing is zapped or resynced: no shadow page below a root ever exists.
        assert got.mmu_events.get("kvm_mmu_prepare_zap_page", 0) == 0, name
        assert got.mmu_events.get("kvm_mmu_sync_page", 0) == 0, name
        # The emulated MOV CR3 never reaches kvm:kvm_cr (it sits in the VMX/SVM
        # CR-exit handlers): zero here is blindness, not "no CR3 writes".
        assert got.cr_writes == {}, name

    # The closed forms the model must agree with.
    cache = 1 + KVM_MMU_NUM_PREV_ROOTS
    assert want[1].roots_created == k - 1  # every space but the one entered at boot
    for p, n in ((2, n1), (3, n2)):
        assert want[p].roots_found == (n if k > cache else 0)
        assert want[p].roots_created == 0
    assert (want[4].accessed_bits, want[4].dirty_bits) == (600 + 2, 600)  # + 2 PDEs
    assert (want[5].accessed_bits, want[5].dirty_bits) == (0, 0)
    assert (want[7].accessed_bits, want[7].dirty_bits) == (40, 40)


def _hugepages_free() -> int:
    m = re.search(r"^HugePages_Free:\s+(\d+)", Path("/proc/meminfo").read_text(), re.MULTILINE)
    assert m is not None
    return int(m.group(1))


@contextlib.contextmanager
def hugetlbfs(mount: Path, pages: int) -> Iterator[Path]:
    """``pages`` more 2 MiB pages reserved (through the host configurator) and a hugetlbfs
    mount at ``mount``; both undone afterwards."""
    hp = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
    conf = HostConfigurator()
    reserve = plan(HostConfigSpec(name="hugetlbfs-2m",
                                  hugepages_2m=int(hp.read_text()) + pages))
    mount.mkdir()
    with conf.applied(reserve):
        subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", str(mount)],
                       check=True)
        try:
            yield mount
        finally:
            subprocess.run(["umount", str(mount)], check=True)


def test_hugetlbfs_backed_guest_memory_gives_the_same_answers(tmp_path: Path) -> None:
    """Guest RAM from 2 MiB hugetlbfs pages (as libvirt <memoryBacking><hugepages/> gives).

    The answers do not change: with every instruction emulated no shadow page
    below a root exists, so the host page size behind guest memory never
    reaches an SPTE. The test proves the backing was really used (8 huge
    pages taken while the guest exists) and that the counts stay exact.
    """
    if "hugetlbfs" not in Path("/proc/filesystems").read_text():
        host_difference_skip("this kernel has no hugetlbfs")
    k = 5
    phases = _phases(k, 11, 60, pages=300, edits=20)
    with hugetlbfs(tmp_path / "huge", pages=8) as mnt:
        free_before = _hugepages_free()
        taken: list[int] = []
        pt = run_paging(
            tmp_path, k, phases, token=0x6B05,
            qemu_args=["-object", f"memory-backend-file,id=ram0,size=16M,mem-path={mnt},"
                       "prealloc=on", "-machine", "pc,memory-backend=ram0"],
            while_paused=lambda: taken.append(free_before - _hugepages_free()),
        )
    assert taken == [8], "16 MiB of guest RAM must take 8 huge pages"
    for p, a in expected_answers(k, phases).items():
        assert pt[p].markers_seen == 1
        assert pt[p].mmu_events.get("kvm_mmu_get_page", 0) == a.root_lookups
        assert pt[p].mmu_events.get("kvm_mmu_set_dirty_bit", 0) == a.dirty_bits
        assert pt[p].emulated_insns == a.emulated_insns
