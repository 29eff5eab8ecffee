"""Build the "paging micro" KVM guest and derive, from KVM's source, what it must cost.

The program is ``vm-images/micro/paging.asm``: a 64 KiB BIOS ROM (booted like
the micro guest's ROM: ``-bios ROM`` or libvirt ``<loader type='rom'>``) that
enters 64-bit long mode itself, builds ``K`` address spaces and runs a table
of marked phases (same CPUID marker and run token as micro.asm):

* ``cr3``: ``count`` CR3 writes, round-robin over the K address spaces;
* ``touch``: one write into each of the first ``count`` 4 KiB-mapped pages;
* ``pte``: for each of the first ``count`` pages, flip its PTE to the other
  frame, clear its accessed and dirty bits and INVLPG it.

Like micro.py, parameters go to nasm as ``-D`` defines, so the assembler
re-checks them; the ROM's digest covers every byte that runs.

:func:`expected_answers` is the known answer for each phase, derived from
KVM's x86 MMU (arch/x86/kvm/mmu/mmu.c and paging_tmpl.h, v6.x) for a host
that shadows the guest's page tables and emulates its instructions (the PVM
backend here). The derivation is in the docstrings below; the integration
tests check it event for event.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from harness.image import rom as rom_files
from harness.paths import VM_IMAGES_DIR

#: The guest program's source.
PAGING_SOURCE: Final = VM_IMAGES_DIR / "micro" / "paging.asm"

PhaseKind = Literal["cr3", "touch", "pte"]
#: Phase kind -> the code paging.asm dispatches on.
KIND_CODES: Final[dict[str, int]] = {"cr3": 1, "touch": 2, "pte": 3}

MAX_PHASES: Final = 16
#: K is capped so that all shadow pages of a run (K roots + the handful of boot
#: roots) stay well below KVM's default shadow-page budget for a 16 MiB guest
#: (n_max_mmu_pages = max(64, 2% of guest pages) = 81; KVM zaps unused pages
#: from the oldest when fewer than KVM_MIN_FREE_MMU_PAGES = 5 are left, which
#: would turn "existing root found" into "new root created").
MAX_ADDRESS_SPACES: Final = 32
#: 4 KiB pages in the touched region (two page tables of 512 PTEs).
MAX_PAGES: Final = 1024
#: CR3 writes per phase: 32-bit counter; at ~2 M emulated instructions/s about
#: 9 instructions per write make 10 M writes a ~45 s phase.
MAX_CR3_WRITES: Final = 10_000_000
#: The guest needs this much RAM: the alternate frames end at 12 MiB.
MIN_MEMORY_MIB: Final = 16

#: Physical layout (see paging.asm).
AS_PML4_BASE: Final = 0x110000
REGION_BASE: Final = 0x400000
ALT_REGION_BASE: Final = 0x800000
PAGE_SIZE: Final = 4096
PTES_PER_TABLE: Final = 512

EXIT_VALUE: Final = 1
QEMU_EXIT_STATUS: Final = (EXIT_VALUE << 1) | 1
ROM_SIZE: Final = 0x10000

#: KVM_MMU_NUM_PREV_ROOTS (arch/x86/include/asm/kvm_host.h): 3 in every kernel
#: this harness targets (5.15 - 6.18). With the current root, KVM keeps 4 shadow
#: roots. (A patch series proposed a larger, configurable cache; a host running
#: one would need ``prev_roots=`` in :func:`expected_answers`.)
KVM_MMU_NUM_PREV_ROOTS: Final = 3


class PagingImageError(ValueError):
    """Bad paging-guest parameters or a failed build; the message says what to fix."""


@dataclass(frozen=True)
class PagingPhase:
    """One phase of the paging guest: ``kind`` done ``count`` times."""

    name: str
    kind: PhaseKind
    count: int


@dataclass(frozen=True)
class PagingImage:
    """A built paging-guest ROM; phase numbers in markers are ``index + 1`` into ``phases``."""

    rom_path: Path
    token: int
    address_spaces: int
    phases: tuple[PagingPhase, ...]
    digest: str

    def pml4_gpa(self, address_space: int) -> int:
        """Guest-physical address of address space ``address_space``'s PML4 (1-based)."""
        if not 1 <= address_space <= self.address_spaces:
            raise IndexError(f"address space {address_space} not in 1..{self.address_spaces}")
        return AS_PML4_BASE + PAGE_SIZE * (address_space - 1)


def validate_paging_params(
    address_spaces: int, phases: Sequence[PagingPhase], token: int
) -> None:
    """Raise :class:`PagingImageError` naming the bad field and the fix."""

    def bad_int(v: object, lo: int, hi: int) -> bool:
        return isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi

    rom_files.check_token(token, PagingImageError)
    if bad_int(address_spaces, 1, MAX_ADDRESS_SPACES):
        raise PagingImageError(
            f"address_spaces: {address_spaces!r} is not an integer in 1..{MAX_ADDRESS_SPACES}"
        )
    rom_files.check_phases(phases, PagingPhase, guest="paging", max_phases=MAX_PHASES,
                           error=PagingImageError)
    for i, ph in enumerate(phases):
        where = f"phases[{i}]"
        if ph.kind not in KIND_CODES:
            raise PagingImageError(
                f"{where}.kind ({ph.name!r}): {ph.kind!r}; use one of {', '.join(KIND_CODES)}"
            )
        hi = MAX_CR3_WRITES if ph.kind == "cr3" else MAX_PAGES
        if bad_int(ph.count, 1, hi):
            what = "CR3 writes" if ph.kind == "cr3" else "pages"
            raise PagingImageError(
                f"{where}.count ({ph.name!r}): {ph.count!r} {what}; use an integer in 1..{hi}"
            )


def nasm_defines(address_spaces: int, phases: Sequence[PagingPhase], token: int) -> list[str]:
    """The ``-D`` arguments that bake K, the phase table and the token into paging.asm."""
    return [
        f"-DTOKEN={token}",
        f"-DNAS={address_spaces}",
        f"-DNPHASES={len(phases)}",
        "-DKINDS=" + ",".join(str(KIND_CODES[p.kind]) for p in phases),
        "-DARGS=" + ",".join(str(p.count) for p in phases),
    ]


def recipe_digest(
    address_spaces: int, phases: Sequence[PagingPhase], source: Path = PAGING_SOURCE
) -> str:
    """What a paging ROM is built from, without its run token: equal digests, same guest.

    The ROM's own digest changes with every token (the marker carries it), so
    results record this one to say which guest program and parameters ran.
    """
    h = hashlib.sha256(source.read_bytes())
    for define in nasm_defines(address_spaces, phases, 1)[1:]:  # every define but the token
        h.update(b"\0" + define.encode())
    return h.hexdigest()


def assemble(address_spaces: int, phases: Sequence[PagingPhase], token: int) -> bytes:
    """Assemble paging.asm with the given parameters; return the checked 64 KiB ROM."""
    validate_paging_params(address_spaces, phases, token)
    rom = rom_files.run_nasm(PAGING_SOURCE, nasm_defines(address_spaces, phases, token),
                             guest="paging", error=PagingImageError)
    if len(rom) != ROM_SIZE:
        raise PagingImageError(
            f"{PAGING_SOURCE}: assembled to {len(rom)} bytes, expected a {ROM_SIZE}-byte ROM "
            "ending in the reset vector; keep the `reset` section at 0xFFF0"
        )
    if rom[0xFFF0] != 0xEA:  # jmp far ptr16:16
        raise PagingImageError(f"{PAGING_SOURCE}: no far jump at the reset vector (0xFFF0)")
    return rom


def build_paging_image(
    out_dir: Path, address_spaces: int, phases: Sequence[PagingPhase], token: int
) -> PagingImage:
    """Assemble the paging guest into a world-readable ROM in ``out_dir``.

    The file is named after the token and the ROM's digest (several builds can
    share ``out_dir``), written atomically, mode 0644: libvirt runs QEMU as
    ``libvirt-qemu``.
    """
    phases_t = tuple(phases)
    rom = assemble(address_spaces, phases_t, token)
    digest = hashlib.sha256(rom).hexdigest()
    rom_files.readable_dir(out_dir)
    path = out_dir / f"paging-t{token}-{digest[:12]}.rom"
    rom_files.write_readable(path, rom)
    return PagingImage(rom_path=path, token=token, address_spaces=address_spaces,
                       phases=phases_t, digest=digest)


# --- known answers ------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseAnswer:
    """What one phase must cost on a shadow-paging host that emulates the guest.

    ``roots_created`` / ``roots_found``: ``kvmmmu:kvm_mmu_get_page`` events
    with ``created`` true / false (every one is a root lookup here, role
    level 4); ``accessed_bits`` / ``dirty_bits``: ``kvmmmu:kvm_mmu_set_accessed_bit``
    / ``kvm_mmu_set_dirty_bit`` events (guest A/D bits set by KVM's walker);
    ``emulated_insns``: ``kvm:kvm_emulate_insn`` events, the phase's own
    marker ``cpuid`` included; ``cr3_writes``: CR3 writes the guest executed.
    """

    roots_created: int
    roots_found: int
    accessed_bits: int
    dirty_bits: int
    emulated_insns: int
    cr3_writes: int

    @property
    def root_lookups(self) -> int:
        """All ``kvm_mmu_get_page`` events of the phase."""
        return self.roots_created + self.roots_found


class RootCache:
    """KVM's per-vCPU shadow-root cache, as kvm_mmu_new_pgd() runs it (v5.1+).

    A guest CR3 write reaches kvm_set_cr3() (arch/x86/kvm/x86.c). Writing the
    value CR3 already holds returns before kvm_mmu_new_pgd() (``cr3 ==
    kvm_read_cr3(vcpu)`` on a non-PAE guest), so it costs no lookup. Otherwise
    kvm_mmu_new_pgd() -> fast_pgd_switch() ->
    cached_root_find_and_keep_current() checks the current root, then swaps
    through ``prev_roots[0..KVM_MMU_NUM_PREV_ROOTS-1]``; the swaps keep the
    list in most-recently-used order ("C 0 1 2" -> "X C 0 1" on a hit of X,
    or on a miss with the least recently used root, the last one, freed by
    kvm_mmu_free_roots(KVM_MMU_ROOT_CURRENT)). So current + previous roots
    are one LRU cache of ``1 + KVM_MMU_NUM_PREV_ROOTS`` entries.

    A hit reuses the root: no ``kvm_mmu_get_page`` event. A miss leaves the
    root invalid; before the next guest entry kvm_mmu_load() ->
    mmu_alloc_shadow_roots() -> mmu_alloc_root() -> kvm_mmu_get_shadow_page()
    looks the root up by (gfn, role) in the shadow-page hash: exactly one
    ``kvm_mmu_get_page`` event, ``created`` false when a shadow page for that
    PML4 still exists (a freed root is only unreferenced: mmu_free_root_page()
    zaps it only if it is invalid), true the first time that PML4 is used.
    """

    def __init__(self, current: int, *, prev_roots: int = KVM_MMU_NUM_PREV_ROOTS) -> None:
        self.capacity = 1 + prev_roots
        self.lru: list[int] = [current]  # most recently used first; [0] is current
        self.shadowed: set[int] = {current}
        self.created = 0
        self.found = 0

    @property
    def current(self) -> int:
        """The loaded root's address space."""
        return self.lru[0]

    def write_cr3(self, target: int) -> None:
        """The guest writes CR3 = PML4 of ``target``; count the root lookup it causes."""
        if target == self.current:
            return  # kvm_set_cr3(): same CR3, no kvm_mmu_new_pgd()
        if target in self.lru:
            self.lru.remove(target)
            self.lru.insert(0, target)
            return  # cache hit: root reused, no lookup
        self.lru.insert(0, target)
        del self.lru[self.capacity:]
        if target in self.shadowed:
            self.found += 1
        else:
            self.created += 1
            self.shadowed.add(target)


def cr3_targets(address_spaces: int, start: int, writes: int) -> list[int]:
    """The address spaces ``writes`` round-robin CR3 writes load, starting after ``start``."""
    return [(start + i) % address_spaces + 1 for i in range(writes)]


# Emulated instructions per phase, counted from paging.asm. Every phase pays:
# its own marker cpuid (1); the table lookup and dispatch: 2 loads plus a
# cmp/je pair per kind tested (cr3 1 pair, touch 2, pte 3); the loop (below);
# `jmp phase_done` (not for pte, which falls through); inc/cmp/jbe; and the
# next marker's register setup: mov/mov/or (3), or mov/mov (2) before the
# closing marker 0 after the last phase.
_CR3_PER_WRITE: Final = 9  # inc cmp jbe mov shl add mov-cr3 dec jnz (+1 mov on wrap)
_TOUCH_PER_PAGE: Final = 4  # mov add dec jnz
_PTE_PER_PAGE: Final = 9  # mov xor and mov invlpg add add dec jnz


def _emulated_insns(kind: str, count: int, wraps: int, last: bool) -> int:
    tail = 3 + (2 if last else 3)
    if kind == "cr3":
        return 1 + 4 + _CR3_PER_WRITE * count + wraps + 1 + tail
    if kind == "touch":
        return 1 + 6 + 1 + _TOUCH_PER_PAGE * count + 1 + tail
    return 1 + 8 + 2 + _PTE_PER_PAGE * count + tail


def expected_answers(
    address_spaces: int, phases: Sequence[PagingPhase], *, prev_roots: int = KVM_MMU_NUM_PREV_ROOTS
) -> dict[int, PhaseAnswer]:
    """Per phase number (1-based), what the phase must cost; see :class:`PhaseAnswer`.

    Valid on a host that shadows guest paging and emulates every guest
    instruction (MMU mode "pvm" here). Derivation, besides :class:`RootCache`:

    * The program enters address space 1 before phase 1, so the cache starts
      as [AS1] (the boot root is older and never loaded again).
    * Nothing runs natively, so no shadow page below a root is ever built
      (no guest page fault reaches the MMU): ``kvm_mmu_get_page`` fires only
      for root lookups, and touch and pte phases cause none.
    * A/D bits: KVM's guest page-table walker (paging_tmpl.h,
      FNAME(walk_addr_generic) -> FNAME(update_accessed_dirty_bits)) sets the
      accessed bit of every entry it walks through that lacks it, and the
      dirty bit of the leaf on a write; each is one tracepoint event. The
      program's entries start with A = D = 0. A cr3 phase's first instruction
      fetch in an address space sets the A bit of that space's own PML4E
      (the PDPT, PD and 2 MiB code page are shared and were walked in phase
      0). A touch phase sets A and D of each PTE it writes through that lacks
      them, plus the A bit of the PDE of each page table walked for the first
      time. A pte phase clears A and D of the PTEs it edits (so the next touch
      sets them again) and, the first time, sets the D bit of the 2 MiB page
      holding the page tables (the first write through the address spaces to
      low memory). INVLPG walks nothing and, with no shadow page below the
      root, invalidates nothing that traces.
    """
    validate_paging_params(address_spaces, phases, 1)
    cache = RootCache(1, prev_roots=prev_roots)
    pml4e_accessed = {1}
    pde_accessed: set[int] = set()
    pte_ad: set[int] = set()  # pages whose PTE has A and D set
    low_dirty = False
    current = 1
    out: dict[int, PhaseAnswer] = {}
    for k, ph in enumerate(phases, start=1):
        created0, found0 = cache.created, cache.found
        accessed = dirty = wraps = cr3 = 0
        if ph.kind == "cr3":
            for target in cr3_targets(address_spaces, current, ph.count):
                if current == address_spaces:
                    wraps += 1  # paging.asm's `mov r13d, 1` runs: K -> 1
                cache.write_cr3(target)
                if target not in pml4e_accessed:
                    pml4e_accessed.add(target)
                    accessed += 1
                current = target
            cr3 = ph.count
        elif ph.kind == "touch":
            for page in range(ph.count):
                table = page // PTES_PER_TABLE
                if table not in pde_accessed:
                    pde_accessed.add(table)
                    accessed += 1
                if page not in pte_ad:
                    pte_ad.add(page)
                    accessed += 1
                    dirty += 1
        else:
            if not low_dirty:
                low_dirty = True
                dirty += 1
            pte_ad -= set(range(ph.count))
        out[k] = PhaseAnswer(
            roots_created=cache.created - created0,
            roots_found=cache.found - found0,
            accessed_bits=accessed,
            dirty_bits=dirty,
            emulated_insns=_emulated_insns(ph.kind, ph.count, wraps, k == len(phases)),
            cr3_writes=cr3,
        )
    return out
