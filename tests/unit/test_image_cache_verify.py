"""The image cache serves an entry only while its files match the SHA256SUMS written
when it was built (the fault tests in tests/faults/test_image_faults.py do the same
against the real Linux image)."""

from __future__ import annotations

from pathlib import Path

from harness.image import cache as image_cache

DIGEST = "ab" * 32


def built_entry(cache: Path) -> Path:
    with image_cache.entry_lock("t", DIGEST, cache), image_cache.staging("t", DIGEST, cache) as st:
        (st / "disk.img").write_bytes(b"\x01" * 4096)
        (st / "sub").mkdir()
        (st / "sub" / "key").write_text("k")
    found = image_cache.lookup("t", DIGEST, cache)
    assert found is not None
    return found


def test_a_build_writes_sums_of_every_file(tmp_path: Path) -> None:
    entry = built_entry(tmp_path)
    names = [line.split("  ", 1)[1] for line in (entry / "SHA256SUMS").read_text().splitlines()]
    assert names == ["disk.img", "sub/key"]
    assert image_cache.verify_entry(entry) is None


def test_a_changed_byte_makes_the_entry_a_miss_and_says_why(tmp_path: Path) -> None:
    entry = built_entry(tmp_path)
    with (entry / "disk.img").open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\x02")
    said: list[str] = []
    assert image_cache.lookup("t", DIGEST, tmp_path, rejected=said.append) is None
    assert len(said) == 1 and "disk.img has sha256" in said[0] and str(entry) in said[0]


def test_missing_file_or_sums_make_the_entry_a_miss(tmp_path: Path) -> None:
    entry = built_entry(tmp_path)
    (entry / "sub" / "key").unlink()
    assert "sub/key unreadable" in (image_cache.verify_entry(entry) or "")
    (entry / "SHA256SUMS").unlink()
    assert "SHA256SUMS unreadable" in (image_cache.verify_entry(entry) or "")
    assert image_cache.lookup("t", DIGEST, tmp_path) is None


def test_malformed_sums_make_the_entry_a_miss(tmp_path: Path) -> None:
    entry = built_entry(tmp_path)
    (entry / "SHA256SUMS").write_text("not a sum line\n")
    assert image_cache.verify_entry(entry) == "SHA256SUMS is malformed"
