"""`harness cache prune`: which cache directories go, which stay, and the real CLI on a
private cache (real directories, real processes holding files open)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.host.process import users_of
from harness.image import cache as image_cache
from harness.image.linux import IMAGE_NAME, recipe_digest
from harness.trace import libbpf

CURRENT = recipe_digest()
OTHER = "0" * 64 if not CURRENT.startswith("0" * 12) else "f" * 64


def entry(root: Path, name: str, size: int = 1000) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "disk.qcow2").write_bytes(b"x" * size)
    return d


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def holder() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def hold_open(path: Path, procs: list[subprocess.Popen[bytes]]) -> int:
    """A real process with ``path`` open (as QEMU holds its base disk), until the test ends."""
    with path.open("rb") as fh:
        p = subprocess.Popen(["sleep", "60"], stdin=fh)
    procs.append(p)
    deadline = time.monotonic() + 5
    while path.resolve() not in users_of(path.parent) and time.monotonic() < deadline:
        time.sleep(0.01)
    return p.pid


def test_images_of_other_recipes_and_dead_builds_go_the_rest_stays(tmp_path: Path) -> None:
    images = image_cache.images_root(tmp_path)
    keep = entry(images, f"{IMAGE_NAME}-{CURRENT[:12]}")
    old = entry(images, f"{IMAGE_NAME}-{OTHER[:12]}", size=4096)
    foreign = entry(images, "windows-0123456789ab")  # not an image this harness builds
    dead = dead_pid()
    staging_dead = entry(images, f".{keep.name}.staging-{dead}")
    staging_live = entry(images, f".{keep.name}.staging-{os.getpid()}")
    old_dead = entry(images, f".{keep.name}.old-{dead}")
    (images / f".{keep.name}.lock").write_text("")
    found = {p.path: p for p in image_cache.prunable({IMAGE_NAME: CURRENT}, tmp_path)}
    assert set(found) == {old, staging_dead, old_dead}
    assert found[old].size == 4096 and found[old].in_use_by is None
    assert f"the current one is {CURRENT[:12]}" in found[old].why
    assert f"pid {dead}" in found[staging_dead].why
    for kept in (keep, foreign, staging_live):
        assert kept not in found


def test_an_image_a_live_process_holds_is_kept(tmp_path: Path, holder: list[Any]) -> None:
    images = image_cache.images_root(tmp_path)
    old = entry(images, f"{IMAGE_NAME}-{OTHER[:12]}")
    pid = hold_open(old / "disk.qcow2", holder)
    (found,) = image_cache.prunable({IMAGE_NAME: CURRENT}, tmp_path)
    assert found.path == old and found.in_use_by == pid


def test_loaders_of_other_builds_go_recent_build_dirs_stay(tmp_path: Path) -> None:
    root = tmp_path / "libbpf"
    current = libbpf.build_digest(libbpf.btf_path())[: libbpf.SHORT_DIGEST]
    keep = entry(root, current)
    other = entry(root, "0" * libbpf.SHORT_DIGEST if current[0] != "0" else "f" * 16)
    fresh_tmp = entry(root, f".{current}-abcd1234")  # a build in progress (mkdtemp)
    stale_tmp = entry(root, f".{current}-efgh5678")
    day_and_more = time.time() - 2 * 86400
    os.utime(stale_tmp, (day_and_more, day_and_more))
    found = {p.path for p in libbpf.prunable_builds(tmp_path)}
    assert found == {other, stale_tmp}
    assert keep.exists() and fresh_tmp.exists()


def test_without_btf_only_leftovers_of_builds_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HARNESS_LIBBPF_BTF", str(tmp_path / "no-btf"))
    root = tmp_path / "libbpf"
    some = entry(root, "0123456789abcdef")  # perhaps the loader of the other kernel
    stale_tmp = entry(root, ".0123456789abcdef-efgh5678")
    os.utime(stale_tmp, (time.time() - 2 * 86400,) * 2)
    assert {p.path for p in libbpf.prunable_builds(tmp_path)} == {stale_tmp}
    assert some.exists()


def test_the_cli_removes_what_can_go_and_keeps_what_is_in_use(
    tmp_path: Path, holder: list[Any]
) -> None:
    images = image_cache.images_root(tmp_path)
    keep = entry(images, f"{IMAGE_NAME}-{CURRENT[:12]}")
    old = entry(images, f"{IMAGE_NAME}-{OTHER[:12]}", size=2_000_000)
    busy = entry(images, f"{IMAGE_NAME}-{'e' * 12 if OTHER[0] != 'e' else 'd' * 12}")
    pid = hold_open(busy / "disk.qcow2", holder)
    env = dict(os.environ, HARNESS_CACHE=str(tmp_path))

    def prune(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "harness.cli", "cache", "prune", *args],
                              capture_output=True, text=True, env=env, timeout=60, check=False)

    dry = prune("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {old} (2.0 MB)" in dry.stdout
    assert "would free 2.0 MB; 1 kept, in use" in dry.stdout
    assert old.exists()
    done = prune()
    assert done.returncode == 0, done.stderr
    assert f"removed      {old} (2.0 MB)" in done.stdout
    assert f"kept         {busy}" in done.stdout and f"in use by pid {pid}" in done.stdout
    assert not old.exists() and busy.exists() and keep.exists()
    again = prune()
    assert again.stdout.splitlines()[-1] == "freed 0.0 MB; 1 kept, in use"
