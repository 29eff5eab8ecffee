"""Building the micro guest with real nasm: layout, parameters, validation."""

from __future__ import annotations

import hashlib
import stat
import struct
import tomllib
from pathlib import Path

import pytest

from harness.image.micro import (
    FLOPPY_SIZE,
    MARKER_LEAF,
    ROM_SIZE,
    MicroImageError,
    MicroPhase,
    build_micro_image,
    expected_loop_insns,
)
from harness.paths import WORKLOADS_DIR

PHASES = (MicroPhase("a", 16), MicroPhase("b", 32, 2), MicroPhase("c", 64, 3))


def test_floppy_and_rom_layout(tmp_path: Path) -> None:
    img = build_micro_image(tmp_path / "out", PHASES, token=0x1234)
    assert img.rom_path is not None
    floppy = img.path.read_bytes()
    rom = img.rom_path.read_bytes()
    assert len(floppy) == FLOPPY_SIZE == 1_474_560
    assert len(rom) == ROM_SIZE
    sector = floppy[:512]
    assert sector[510:] == b"\x55\xaa"
    assert floppy[512:] == bytes(FLOPPY_SIZE - 512)
    assert rom[:512] == sector, "the ROM must run the very same boot sector"
    # Reset vector F000:FFF0 holds a far jump into segment F000.
    assert rom[0xFFF0] == 0xEA and rom[0xFFF3:0xFFF5] == b"\x00\xf0"
    assert img.digest == hashlib.sha256(floppy).hexdigest()
    assert img.rom_digest == hashlib.sha256(rom).hexdigest()
    assert img.token == 0x1234 and img.phases == PHASES


def test_parameters_are_baked_in(tmp_path: Path) -> None:
    img = build_micro_image(tmp_path, PHASES, token=0xBEEF)
    sector = img.path.read_bytes()[:512]
    # mov eax, MARKER_LEAF and mov ecx, TOKEN << 16 (operand-size prefix 66).
    assert b"\x66\xb8" + struct.pack("<I", MARKER_LEAF) in sector
    assert sector.count(b"\x66\xb9" + struct.pack("<I", 0xBEEF << 16)) == 2  # phase k and 0
    assert struct.pack("<3H", 16, 32, 64) + struct.pack("<3H", 1, 2, 3) in sector
    # `cmp si, NPHASES` bounds the phase loop.
    assert b"\x83\xfe\x03" in sector


def test_build_is_reproducible_and_token_specific(tmp_path: Path) -> None:
    a = build_micro_image(tmp_path, PHASES, token=7)
    b = build_micro_image(tmp_path, PHASES, token=7)
    c = build_micro_image(tmp_path, PHASES, token=8)
    assert a.digest == b.digest and a.path == b.path
    assert c.digest != a.digest and c.path != a.path
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_files_world_readable(tmp_path: Path) -> None:
    img = build_micro_image(tmp_path / "d", PHASES, token=1)
    assert img.rom_path is not None
    for p in (img.path, img.rom_path):
        assert p.stat().st_mode & stat.S_IROTH
    assert (tmp_path / "d").stat().st_mode & stat.S_IXOTH


def test_regions_are_disjoint_and_consecutive(tmp_path: Path) -> None:
    img = build_micro_image(tmp_path, PHASES, token=1)
    assert img.region(1) == (0x10000, 0x20000)
    assert img.region(2) == (0x20000, 0x40000)
    assert img.region(3) == (0x40000, 0x80000)
    with pytest.raises(IndexError):
        img.region(0)


def test_expected_loop_insns() -> None:
    assert expected_loop_insns(MicroPhase("x", 16, 2)) == 2 * 16 * (3 * 2048 + 8)


@pytest.mark.parametrize(
    ("phases", "token", "needle"),
    [
        (PHASES, 0, "token"),
        (PHASES, 65536, "token"),
        (PHASES, True, "token"),
        ((), 1, "phases: 0 given"),
        (tuple(MicroPhase(f"p{i}", 1) for i in range(17)), 1, "phases: 17 given"),
        ((MicroPhase("a", 0),), 1, "phases[0].pages"),
        ((MicroPhase("a", 129),), 1, "phases[0].pages"),
        ((MicroPhase("a", 1, 0),), 1, "phases[0].repeat"),
        ((MicroPhase("a", 1), MicroPhase("", 1)), 1, "phases[1].name"),
        ((MicroPhase("a", 1), MicroPhase("a", 1)), 1, "used twice"),
        ((MicroPhase("a", 64), MicroPhase("b", 65)), 1, "129 pages in all"),
    ],
)
def test_bad_input_named(
    tmp_path: Path, phases: tuple[MicroPhase, ...], token: int, needle: str
) -> None:
    with pytest.raises(MicroImageError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        build_micro_image(tmp_path, phases, token)
    assert list(tmp_path.iterdir()) == []


def test_missing_nasm_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MicroImageError, match="apt-get install nasm"):
        build_micro_image(tmp_path / "o", PHASES, token=1)


def test_shipped_workload_builds_with_1_2_4_ratio(tmp_path: Path) -> None:
    path = WORKLOADS_DIR / "micro-touch.toml"
    data = tomllib.loads(path.read_text())
    assert data["guest"] == "micro"
    phases = [MicroPhase(p["name"], p["pages"], p.get("repeat", 1)) for p in data["phases"]]
    img = build_micro_image(tmp_path, phases, token=42)
    work = [p.pages * p.repeat for p in img.phases]
    assert [w / work[0] for w in work] == [1.0, 2.0, 4.0]


def test_recipe_digest_ignores_the_token_and_follows_the_phases(tmp_path: Path) -> None:
    """Two runs of one micro guest differ only in their token: same recipe, other ROM."""
    from harness.image.micro import recipe_digest

    phases = [MicroPhase("a", 16, 2), MicroPhase("b", 32, 2)]
    one = build_micro_image(tmp_path / "one", phases, 0x11)
    two = build_micro_image(tmp_path / "two", phases, 0x22)
    assert one.rom_digest != two.rom_digest
    assert recipe_digest(phases) == recipe_digest(list(phases))
    assert recipe_digest(phases) != recipe_digest([MicroPhase("a", 16, 3), phases[1]])
