"""A corrupted cached image: detected by its content digest, rebuilt, never booted.

Every cache entry holds ``SHA256SUMS`` (the sha256 of each of its files,
written at build time, harness/image/cache.py); a lookup serves the entry only
if every file still matches, so a flipped byte in the base disk, an edited
manifest, a truncated kernel or a lost SHA256SUMS make the entry a miss.

The tests work on a private copy of the shared entry (hard links for the
files they do not damage, so the copy is cheap and the shared image is never
touched). The cheap cases check that the harness refuses the entry (lookup,
`harness vm xml`), and that a real `harness run` finds the damaged base disk
and starts a rebuild before it boots anything. The full rebuild and boot of
the rebuilt image (about 95 s) runs too, unless HARNESS_FAULTS_QUICK=1.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.image import cache as image_cache
from harness.image.linux import IMAGE_NAME, LinuxImage, cached_linux_image, recipe_digest
from tests.faults.helpers_a import (
    assert_nothing_left,
    finish,
    first_result,
    nothing_left_behind_by_fault,  # noqa: F401  (fair on a shared host; see helpers_a)
    only_result,
    private_cache,
    run_cli,
    run_domains,
    shared_linux_image,
    start_cli,
    stop,
    wait_for,
    write_linux_suite,
)

pytestmark = pytest.mark.integration


def flip_bytes(path: Path, offset: int, n: int = 16) -> None:
    """Invert ``n`` bytes at ``offset`` (a private copy, never a hard link of the shared file)."""
    with path.open("r+b") as fh:
        fh.seek(offset)
        data = fh.read(n)
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in data))


def copy_entry(src: Path, dst: Path, damaged: str | None) -> None:
    """``src`` as ``dst``: every file hard-linked, except ``damaged``, which is copied."""
    dst.mkdir(mode=0o755)
    for f in src.iterdir():
        if f.name == damaged:
            shutil.copy2(f, dst / f.name)
        else:
            os.link(f, dst / f.name)


def damage_disk(d: Path) -> None:
    disk = d / "disk.qcow2"
    flip_bytes(disk, disk.stat().st_size // 2)  # the middle of the root file system's data


def damage_manifest(d: Path) -> None:
    manifest = d / "image.json"
    text = manifest.read_text()
    # A change that still parses and names a valid-looking host key: only the digest sees it.
    manifest.write_text(text.replace('"ssh_user": "root"', '"ssh_user": "r00t"'))


def truncate_kernel(d: Path) -> None:
    kernel = d / "vmlinuz"
    with kernel.open("r+b") as fh:
        fh.truncate(kernel.stat().st_size // 2)


def lose_sums(d: Path) -> None:
    (d / image_cache.SUMS_FILE).unlink()


DAMAGE: list[tuple[str, str, Callable[[Path], None], str]] = [
    ("disk-bytes-flipped", "disk.qcow2", damage_disk, "disk.qcow2 has sha256"),
    ("manifest-edited", "image.json", damage_manifest, "image.json has sha256"),
    ("kernel-truncated", "vmlinuz", truncate_kernel, "vmlinuz has sha256"),
    ("sums-missing", image_cache.SUMS_FILE, lose_sums, "SHA256SUMS unreadable"),
]


@pytest.fixture(scope="module")
def image() -> LinuxImage:
    return shared_linux_image()


@pytest.fixture
def cache() -> Iterator[Path]:
    with private_cache(share_images=False, share_debs=True) as root:
        yield root


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("case", "damaged", "damage", "why"), DAMAGE, ids=[d[0] for d in DAMAGE]
)
def test_damaged_entry_is_refused(
    tmp_path: Path,
    image: LinuxImage,
    cache: Path,
    case: str,
    damaged: str,
    damage: Callable[[Path], None],
    why: str,
) -> None:
    entry = image_cache.entry_dir(IMAGE_NAME, image.digest, cache)
    copy_entry(image.directory, entry, damaged)
    # The undamaged copy is served: the check is about content, not about where it lives.
    assert cached_linux_image(cache) is not None
    damage(entry)
    said: list[str] = []
    assert cached_linux_image(cache, rejected=said.append) is None
    assert len(said) == 1 and why in said[0] and str(entry) in said[0], said
    assert image_cache.lookup(IMAGE_NAME, recipe_digest(), cache) is None
    # The harness would not boot it: `vm xml` shows the image as not built yet.
    suite = write_linux_suite(tmp_path)
    proc = run_cli("vm", "xml", str(suite), cache=cache, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "image not built yet" in proc.stdout
    assert str(entry / "vmlinuz") in proc.stdout  # the placeholder path, not a served image
    # The shared entry itself was never touched.
    assert image_cache.verify_entry(image.directory) is None


@pytest.mark.timeout(120)
def test_run_on_a_damaged_disk_rebuilds_before_any_boot(
    tmp_path: Path, image: LinuxImage, cache: Path
) -> None:
    """A real run finds the damaged entry, starts a rebuild, and has booted nothing by then;
    stopped there (SIGINT), the damaged entry stays a miss and nothing is left."""
    entry = image_cache.entry_dir(IMAGE_NAME, image.digest, cache)
    copy_entry(image.directory, entry, "disk.qcow2")
    damage_disk(entry)
    suite = write_linux_suite(tmp_path)
    results = tmp_path / "results"
    proc = start_cli("run", str(suite), "--results-dir", str(results), cache=cache)
    try:
        run_id = wait_for(lambda: first_result(results), 60, "the result file", proc=proc)["run_id"]
        staging = wait_for(
            lambda: list((cache / "images").glob(f".{entry.name}.staging-*")), 60,
            "the rebuild to start", proc=proc,
        )
        assert not run_domains(run_id), "nothing may boot before the image is rebuilt"
        proc.send_signal(signal.SIGINT)
        done = finish(proc, 60)
    finally:
        stop(proc)
    assert done.returncode == 130, done.stderr[-3000:]
    said = " ".join(done.stderr.split())  # progress lines are wrapped at the terminal width
    assert f"cached image {entry} failed verification: disk.qcow2 has sha256" in said, said
    assert "compiling guest tools" in said
    assert "starting kvmh-" not in said
    data = only_result(results)
    assert data["status"] == "incomplete"
    assert all(vm["boot_to_ready_s"] is None for vm in data["vms"])
    assert not any(s.exists() for s in staging)
    assert cached_linux_image(cache) is None, "a damaged entry stays a miss until it is rebuilt"
    assert_nothing_left(run_id, cache)
    assert image_cache.verify_entry(image.directory) is None


@pytest.mark.timeout(300)
@pytest.mark.skipif(
    os.environ.get("HARNESS_FAULTS_QUICK") == "1",
    reason="HARNESS_FAULTS_QUICK=1: the full image rebuild (about 95 s) is left out",
)
def test_damaged_disk_is_rebuilt_and_only_the_rebuilt_image_boots(
    tmp_path: Path, image: LinuxImage, cache: Path
) -> None:
    entry = image_cache.entry_dir(IMAGE_NAME, image.digest, cache)
    copy_entry(image.directory, entry, "disk.qcow2")
    damage_disk(entry)
    damaged_sha = image_cache._file_sha256(entry / "disk.qcow2")
    suite = write_linux_suite(tmp_path)
    results = tmp_path / "results"
    # Not --quiet: the progress lines say what the harness did, in order.
    proc = run_cli("run", str(suite), "--results-dir", str(results), cache=cache, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = " ".join(proc.stderr.split())  # progress lines are wrapped at the terminal width
    rejected = err.find("failed verification: disk.qcow2 has sha256")
    built = err.find("built in")
    started = err.find("starting kvmh-")
    assert 0 <= rejected < built < started, err[-3000:]
    data = only_result(results)
    assert data["status"] == "complete"
    (vm,) = data["vms"]
    assert vm["image_digest"] == image.digest
    assert vm["boot_to_ready_s"] is not None
    # What booted is the rebuilt entry: it verifies, and its base disk is not the damaged one.
    assert image_cache.verify_entry(entry) is None
    assert image_cache._file_sha256(entry / "disk.qcow2") != damaged_sha
    rebuilt = cached_linux_image(cache)
    assert rebuilt is not None and rebuilt.host_key != image.host_key  # a new build, new keys
    assert not list((cache / "images").glob(".*staging-*"))
    assert not list((cache / "images").glob(".*.old-*"))
    assert_nothing_left(data["run_id"], cache)
    assert image_cache.verify_entry(image.directory) is None  # the shared entry untouched
