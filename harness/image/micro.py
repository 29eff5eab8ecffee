"""Build the "micro" KVM guest: a boot-sector program that runs marked phases.

The program is ``vm-images/micro/micro.asm``. The run token and the phase
table are build parameters passed to nasm as ``-D`` defines (not bytes patched
into a prebuilt binary), so nasm re-checks them and the source stays the only
description of the layout. One nasm run yields two bootable forms of the same
512-byte sector:

* ``MicroImage.path``: a raw 1.44 MB floppy, booted by SeaBIOS with
  ``-drive file=IMG,format=raw,if=floppy -boot a`` or, in libvirt, as
  ``<disk type='file' device='floppy'>`` (add ``<readonly/>``) with ``<boot dev='fd'/>``.
* ``MicroImage.rom_path``: a 64 KiB BIOS ROM replacing SeaBIOS, booted with
  ``-bios ROM`` or libvirt ``<loader type='rom'>ROM</loader>``. It starts the
  phases ~30 instructions after reset instead of after ~9 M emulated SeaBIOS
  instructions, and cannot fail the way SeaBIOS's floppy driver does when a
  per-event tracer slows emulation (its reads time out: "No bootable device").

Phase ``k`` (1-based) writes every 16-bit word of ``pages`` 4 KiB pages,
``repeat`` times over, in its own region: phases get consecutive, disjoint
regions from physical 0x10000, so the sum of all pages is limited to 128.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.image import rom as rom_files
from harness.image.rom import run_nasm
from harness.paths import VM_IMAGES_DIR

#: The guest program's source.
MICRO_SOURCE = VM_IMAGES_DIR / "micro" / "micro.asm"

#: CPUID leaf of the shared phase marker; ECX = (token << 16) | phase.
MARKER_LEAF = 0x4B564D00

#: Limits enforced by the guest program's memory layout and tables.
MAX_PHASES = 16
MAX_PAGES = 128  # 0x10000 + 128 * 4 KiB = 0x90000, below the EBDA
MAX_REPEAT = 0xFFFF  # a 16-bit pass counter

#: Physical address of the first touched byte and the page size used.
REGION_BASE = 0x10000
PAGE_SIZE = 4096

#: Value the program writes to isa-debug-exit; QEMU exits with (value << 1) | 1.
EXIT_VALUE = 1
QEMU_EXIT_STATUS = (EXIT_VALUE << 1) | 1

#: Emulated instructions per pass over one page: mov/add/loop per 16-bit word
#: (2048 words) plus 8 instructions of page bookkeeping (see micro.asm).
INSNS_PER_PAGE_PASS = 3 * (PAGE_SIZE // 2) + 8

SECTOR_SIZE = 512
ROM_SIZE = 0x10000  # QEMU maps a 64 KiB BIOS at 0xF0000 and below 4 GiB
FLOPPY_SIZE = 1_474_560  # 1.44 MB: 80 cylinders * 2 heads * 18 sectors * 512
BOOT_SIGNATURE = b"\x55\xaa"


class MicroImageError(ValueError):
    """Bad micro-guest parameters or a failed build; the message says what to fix."""


@dataclass(frozen=True)
class MicroPhase:
    """One phase of the micro guest: write ``pages`` 4 KiB pages ``repeat`` times."""

    name: str
    pages: int
    repeat: int = 1


@dataclass(frozen=True)
class MicroImage:
    """A built micro-guest floppy image.

    ``path`` is the floppy image and ``digest`` the sha256 of its bytes;
    ``rom_path`` is the same sector as a BIOS ROM, ``rom_digest`` its sha256.
    Phase numbers in markers are ``index + 1`` into ``phases``.
    """

    path: Path
    token: int
    phases: tuple[MicroPhase, ...]
    digest: str
    rom_path: Path | None = None
    rom_digest: str | None = None

    def region(self, phase_number: int) -> tuple[int, int]:
        """Physical ``[start, end)`` of the memory phase ``phase_number`` (1-based) writes."""
        if not 1 <= phase_number <= len(self.phases):
            raise IndexError(f"phase {phase_number} not in 1..{len(self.phases)}")
        start = REGION_BASE + PAGE_SIZE * sum(p.pages for p in self.phases[: phase_number - 1])
        return start, start + PAGE_SIZE * self.phases[phase_number - 1].pages


#: Emulated instructions per pass outside the page loop (micro.asm ``pass_loop``):
#: ``mov bx, [cur_pages]``, ``mov es, bp`` before it, ``dec dx``, ``jnz`` after it.
INSNS_PER_PASS = 4

#: Emulated instructions a phase pays once, whatever its size: the table loads after
#: its marker (6), the region advance and phase test after its last pass (6), and the
#: next marker: ``mov eax``, ``mov ecx``, ``or cx, si`` and one ``cpuid`` (4), or,
#: after the last phase, marker 0 without the ``or`` (3).
INSNS_PER_PHASE = 6 + 6 + 4
INSNS_PER_LAST_PHASE = 6 + 6 + 3

#: Emulated instructions outside any phase (phase 0) of a ROM boot: the reset jump
#: and the ROM stub (1 + 11 + 2 for ``rep movsw`` + 1), the sector's entry code
#: (9), marker 1 (4); after marker 0, ``mov al`` and ``out`` (2).
INSNS_PHASE0_ROM = 1 + 11 + 2 + 1 + 9 + 4 + 2

#: Without an isa-debug-exit device the ``out`` is ignored and ``cli``, ``hlt`` run:
#: the vCPU then halts for good, after this many more emulated instructions.
INSNS_TO_HALT = 2


def expected_loop_insns(phase: MicroPhase) -> int:
    """Instructions the page-writing loops of ``phase`` execute, without per-pass/phase code.

    Part of :func:`expected_emulated_insns`, which is a phase's whole cost.
    """
    return phase.repeat * phase.pages * INSNS_PER_PAGE_PASS


def expected_emulated_insns(phases: Sequence[MicroPhase]) -> dict[int, int]:
    """Per phase number, its exact ``kvm:kvm_emulate_insn`` count on a PVM host, 0 included.

    Valid where KVM emulates every guest instruction (MMU mode "pvm": each one
    is one ``kvm_emulate_insn`` event) and a phase is what the tracer counts
    between the guest's marker ``cpuid`` of that phase and the next one.
    Counted from ``vm-images/micro/micro.asm``, with interrupts off (``cli``) so
    that nothing else runs between the markers:

    * after marker k: ``mov bx, si`` / ``dec bx`` / ``shl bx, 1`` / ``mov ax,
      [pages_tbl+bx]`` / ``mov [cur_pages], ax`` / ``mov dx, [repeats_tbl+bx]``: 6;
    * per pass (``repeat``): ``mov bx, [cur_pages]`` / ``mov es, bp``, the pages,
      ``dec dx`` / ``jnz pass_loop``: 4 (:data:`INSNS_PER_PASS`);
    * per page and pass: ``xor di`` / ``mov cx`` / ``mov ax, si``, 2048 words x
      ``mov`` / ``add`` / ``loop``, ``mov ax, es`` / ``add ax`` / ``mov es, ax`` /
      ``dec bx`` / ``jnz page_loop``: 3 x 2048 + 8 (:data:`INSNS_PER_PAGE_PASS`);
    * after the last pass: ``mov ax, [cur_pages]`` / ``shl ax, 8`` / ``add bp, ax``
      / ``inc si`` / ``cmp si, NPHASES`` / ``jbe``: 6;
    * the next marker: ``mov eax`` / ``mov ecx`` / ``or cx, si`` / ``cpuid``: 4;
      after the last phase marker 0 has no ``or``: 3.

    Exactly one marker ``cpuid`` falls in each phase. KVM fires
    ``kvm_emulate_insn`` when it has decoded an instruction
    (x86_decode_emulated_instruction(), before x86_emulate_insn() runs it), and
    ``kvm_cpuid`` while running it, so a marker's own ``cpuid`` event is still
    counted in the phase it ends; the count would be the same the other way
    round (each phase would then hold its own marker's ``cpuid`` instead).
    Hence loop + 4 x repeat + 16, and loop + 4 x repeat + 15 for the last phase:
    a real capture (16 pages x 4, 32 x 4, 16 x 8) gave 393,760 / 787,488 / 787,503.

    Phase 0 (key 0), when booted from the ROM (``rom_path``; through SeaBIOS it
    also holds the BIOS's millions): the reset vector's far ``jmp`` (1); the ROM
    stub: ``cli`` ... ``mov cx, 256`` (11), ``rep movsw`` (2), ``jmp 0:7C00`` (1);
    the sector's entry code up to ``mov bp`` (9); marker 1 (4); after marker 0,
    ``mov al`` and ``out`` (2): :data:`INSNS_PHASE0_ROM` = 30. ``rep movsw`` is
    two events because KVM's emulator (x86_emulate_insn()) runs a rep string
    instruction's iterations in one go but returns to the guest whenever RCX
    reaches a multiple of 1024, 0 included, and that re-entry decodes the
    instruction again, which then ends at RCX = 0: 1 + ceil(RCX / 1024) events
    (256 words: 2; 2048 words, tried: 3). Without isa-debug-exit the guest then
    runs ``cli`` and ``hlt`` (:data:`INSNS_TO_HALT`) and halts for good.
    """
    validate_micro_params(phases, 1)
    answers = {0: INSNS_PHASE0_ROM}
    for k, ph in enumerate(phases, start=1):
        answers[k] = (
            expected_loop_insns(ph)
            + INSNS_PER_PASS * ph.repeat
            + (INSNS_PER_LAST_PHASE if k == len(phases) else INSNS_PER_PHASE)
        )
    return answers


def validate_micro_params(phases: Sequence[MicroPhase], token: int) -> None:
    """Raise :class:`MicroImageError` naming the bad field and the fix."""
    rom_files.check_token(token, MicroImageError)
    rom_files.check_phases(phases, MicroPhase, guest="micro", max_phases=MAX_PHASES,
                     error=MicroImageError)
    for i, ph in enumerate(phases):
        where = f"phases[{i}]"
        for field, value, hi in (("pages", ph.pages, MAX_PAGES), ("repeat", ph.repeat, MAX_REPEAT)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
                raise MicroImageError(
                    f"{where}.{field} ({ph.name!r}): {value!r} is not an integer in 1..{hi}"
                )
    total = sum(p.pages for p in phases)
    if total > MAX_PAGES:
        raise MicroImageError(
            f"phases: {total} pages in all; phases use disjoint regions from "
            f"{REGION_BASE:#x} and at most {MAX_PAGES} pages fit below 0x90000. "
            "Lower `pages` and raise `repeat` to keep the phase long"
        )


def nasm_defines(phases: Sequence[MicroPhase], token: int) -> list[str]:
    """The ``-D`` arguments that bake ``token`` and ``phases`` into micro.asm."""
    return [
        f"-DTOKEN={token}",
        f"-DNPHASES={len(phases)}",
        "-DPAGES=" + ",".join(str(p.pages) for p in phases),
        "-DREPEATS=" + ",".join(str(p.repeat) for p in phases),
    ]


def recipe_digest(phases: Sequence[MicroPhase], source: Path = MICRO_SOURCE) -> str:
    """What a micro ROM is built from, without its run token: equal digests, same guest.

    The ROM's own digest changes with every token, so it cannot tell two
    runs of the same guest apart from two different guests (``harness compare``).
    """
    h = hashlib.sha256(source.read_bytes())
    for define in nasm_defines(phases, 1)[1:]:  # every define but the token
        h.update(b"\0" + define.encode())
    return h.hexdigest()


def assemble(phases: Sequence[MicroPhase], token: int) -> tuple[bytes, bytes]:
    """Assemble micro.asm with the given parameters; return ``(sector, rom)``, both checked.

    ``sector`` is the 512-byte boot sector, ``rom`` the 64 KiB BIOS ROM that
    starts with those same 512 bytes.
    """
    validate_micro_params(phases, token)
    rom = run_nasm(MICRO_SOURCE, ["-DBIOS_ROM", *nasm_defines(phases, token)],
                   guest="micro", error=MicroImageError)
    if len(rom) != ROM_SIZE:
        raise MicroImageError(
            f"{MICRO_SOURCE}: assembled to {len(rom)} bytes, expected a {ROM_SIZE}-byte ROM "
            f"whose first {SECTOR_SIZE} bytes are the boot sector; keep the `times` padding"
        )
    sector = rom[:SECTOR_SIZE]
    if sector[-2:] != BOOT_SIGNATURE:
        raise MicroImageError(
            f"{MICRO_SOURCE}: boot sector ends in {sector[-2:].hex()}, not the 55aa "
            "boot signature (sector larger than 510 bytes of code?); the BIOS would not boot it"
        )
    return sector, rom


def build_micro_image(out_dir: Path, phases: Sequence[MicroPhase], token: int) -> MicroImage:
    """Assemble the micro guest; write a raw 1.44 MB floppy and a BIOS ROM into ``out_dir``.

    Files are named after the token and the floppy's digest, so several builds
    can share ``out_dir``; they are written atomically and made world-readable
    (libvirt runs QEMU as ``libvirt-qemu``). ``out_dir``'s parents must be
    traversable by that user too when the image is used through libvirt.
    Raises :class:`MicroImageError` for bad parameters or a failed build.
    """
    phases_t = tuple(phases)
    sector, rom = assemble(phases_t, token)
    image = sector + bytes(FLOPPY_SIZE - SECTOR_SIZE)
    digest = hashlib.sha256(image).hexdigest()
    rom_digest = hashlib.sha256(rom).hexdigest()

    rom_files.readable_dir(out_dir)
    path = out_dir / f"micro-t{token}-{digest[:12]}.img"
    rom_path = out_dir / f"micro-t{token}-{digest[:12]}.rom"
    rom_files.write_readable(path, image)
    rom_files.write_readable(rom_path, rom)
    return MicroImage(path=path, token=token, phases=phases_t, digest=digest,
                      rom_path=rom_path, rom_digest=rom_digest)
