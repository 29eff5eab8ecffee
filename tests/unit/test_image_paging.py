"""The paging micro guest: real nasm builds, parameter checks, and the known-answer model."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from harness.image.paging import (
    KVM_MMU_NUM_PREV_ROOTS,
    MAX_ADDRESS_SPACES,
    MAX_PAGES,
    ROM_SIZE,
    PagingImageError,
    PagingPhase,
    RootCache,
    build_paging_image,
    cr3_targets,
    expected_answers,
    recipe_digest,
)

PHASES = (PagingPhase("visit", "cr3", 5), PagingPhase("cycle", "cr3", 20),
          PagingPhase("touch", "touch", 64), PagingPhase("edit", "pte", 16))


def test_rom_layout_token_and_digests(tmp_path: Path) -> None:
    img = build_paging_image(tmp_path / "out", 5, PHASES, token=0x1234)
    rom = img.rom_path.read_bytes()
    assert len(rom) == ROM_SIZE
    assert img.digest == hashlib.sha256(rom).hexdigest()
    # Reset vector F000:FFF0: a far jump into segment F000.
    assert rom[0xFFF0] == 0xEA and rom[0xFFF3:0xFFF5] == b"\x00\xf0"
    # The marker's ECX = (token << 16) | phase: `mov ecx, imm32` (B9) with the token on top.
    assert b"\xb9\x00\x00\x34\x12" in rom
    assert stat.S_IMODE(img.rom_path.stat().st_mode) == 0o644
    assert img.pml4_gpa(1) == 0x110000 and img.pml4_gpa(5) == 0x114000
    other = build_paging_image(tmp_path / "out", 5, PHASES, token=0x1235)
    assert other.digest != img.digest, "the token is part of the ROM"
    assert recipe_digest(5, PHASES) == recipe_digest(5, list(PHASES))
    assert recipe_digest(5, PHASES) != recipe_digest(4, PHASES)
    assert recipe_digest(5, PHASES) != recipe_digest(5, PHASES[:3])


@pytest.mark.parametrize(
    ("k", "phases", "token", "match"),
    [
        (0, PHASES, 1, r"address_spaces: 0 is not an integer in 1\.\.32"),
        (MAX_ADDRESS_SPACES + 1, PHASES, 1, "address_spaces"),
        (2, PHASES, 0, "token"),
        (2, (), 1, "phases: 0 given"),
        (2, (PagingPhase("a", "cr3", 1), PagingPhase("a", "cr3", 1)), 1, "used twice"),
        (2, (PagingPhase("a", "tlb", 1),), 1, r"phases\[0\]\.kind .*use one of cr3, touch, pte"),  # type: ignore[arg-type]
        (2, (PagingPhase("a", "touch", MAX_PAGES + 1),), 1, r"phases\[0\]\.count .*pages"),
        (2, (PagingPhase("a", "cr3", 0),), 1, r"CR3 writes; use an integer"),
    ],
)
def test_bad_parameters_name_the_field(
    tmp_path: Path, k: int, phases: tuple[PagingPhase, ...], token: int, match: str
) -> None:
    with pytest.raises(PagingImageError, match=match):
        build_paging_image(tmp_path, k, phases, token)


def test_root_cache_is_an_lru_of_current_plus_prev_roots() -> None:
    cache = RootCache(1)
    assert cache.capacity == 1 + KVM_MMU_NUM_PREV_ROOTS == 4
    for a in (2, 3, 4):
        cache.write_cr3(a)
    assert (cache.created, cache.found) == (3, 0)
    for a in (1, 2, 3, 4, 1):  # all four fit: hits
        cache.write_cr3(a)
    assert (cache.created, cache.found) == (3, 0)
    cache.write_cr3(5)  # new: evicts the LRU (2)
    cache.write_cr3(2)  # evicted but still shadowed: found, evicts 3
    assert (cache.created, cache.found) == (4, 1)
    cache.write_cr3(2)  # same CR3: kvm_set_cr3 returns before kvm_mmu_new_pgd
    assert (cache.created, cache.found) == (4, 1)


@pytest.mark.parametrize("k", range(1, 10))
@pytest.mark.parametrize("n", [1, 7, 50])
def test_round_robin_costs_nothing_within_the_cache_and_one_lookup_beyond(
    k: int, n: int
) -> None:
    phases = [PagingPhase("visit", "cr3", k), PagingPhase("cycle", "cr3", n)]
    want = expected_answers(k, phases)
    assert want[1].roots_created == k - 1
    assert want[2].roots_created == 0
    assert want[2].roots_found == (n if k > 1 + KVM_MMU_NUM_PREV_ROOTS else 0)
    assert want[2].cr3_writes == n


def test_cr3_targets_continue_round_robin() -> None:
    assert cr3_targets(3, 1, 5) == [2, 3, 1, 2, 3]
    assert cr3_targets(1, 1, 3) == [1, 1, 1]


def test_touch_and_pte_answers() -> None:
    phases = [PagingPhase("t1", "touch", 600), PagingPhase("t2", "touch", 600),
              PagingPhase("e", "pte", 40), PagingPhase("e2", "pte", 10),
              PagingPhase("t3", "touch", 600)]
    want = expected_answers(3, phases)
    # First touch: A+D per PTE, A of the two PDEs (600 pages span two page tables).
    assert (want[1].accessed_bits, want[1].dirty_bits) == (602, 600)
    assert (want[2].accessed_bits, want[2].dirty_bits) == (0, 0)
    # The first write to the page tables dirties the 2 MiB page holding them, once.
    assert (want[3].dirty_bits, want[4].dirty_bits) == (1, 0)
    assert (want[5].accessed_bits, want[5].dirty_bits) == (40, 40)
    assert all(a.root_lookups == 0 for a in want.values())
    # Instruction counts follow paging.asm's loops: 4 per page touched, 9 per PTE edited.
    one_page = [phases[0], PagingPhase("t2", "touch", 1), *phases[2:]]
    assert want[2].emulated_insns - expected_answers(3, one_page)[2].emulated_insns == 4 * 599
