"""Unit tests for the image cache, the Linux image recipe/manifest and the guest tools."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from harness import paths
from harness.image import cache as image_cache
from harness.image import linux

# --------------------------------------------------------------------------- recipe digest


def _write(root: Path, rel: str, text: str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_digest_stable_and_order_independent(tmp_path: Path) -> None:
    a = _write(tmp_path, "r/a.txt", "alpha")
    b = _write(tmp_path, "r/b.txt", "beta")
    d1 = image_cache.recipe_digest([a, b], "x", base=tmp_path)
    d2 = image_cache.recipe_digest([b, a], "x", base=tmp_path)
    assert d1 == d2
    assert re.fullmatch(r"[0-9a-f]{64}", d1)


def test_digest_changes_with_content_name_and_extra(tmp_path: Path) -> None:
    a = _write(tmp_path, "r/a.txt", "alpha")
    b = _write(tmp_path, "r/b.txt", "beta")
    base = image_cache.recipe_digest([a, b], "x", base=tmp_path)
    assert image_cache.recipe_digest([a, b], "y", base=tmp_path) != base
    b.write_text("beta2")
    assert image_cache.recipe_digest([a, b], "x", base=tmp_path) != base
    b.write_text("beta")
    assert image_cache.recipe_digest([a, b], "x", base=tmp_path) == base
    c = tmp_path / "r/c.txt"
    b.rename(c)
    assert image_cache.recipe_digest([a, c], "x", base=tmp_path) != base
    # Moving content between files must not collide either.
    a.write_text("alphabeta")
    c.write_text("")
    assert image_cache.recipe_digest([a, c], "x", base=tmp_path) != base


def test_digest_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"gone\.txt"):
        image_cache.recipe_digest([tmp_path / "gone.txt"], "", base=tmp_path)


def test_linux_recipe_digest_covers_recipe_and_tools() -> None:
    files = linux.recipe_files()
    names = {f.name for f in files}
    assert {"recipe.toml", "harness-init", "initramfs-init", "sshd_config"} <= names
    assert {"page-touch.c", "kvm-marker.c"} <= names
    assert "README.md" not in names  # documentation edits must not force a rebuild
    assert linux.recipe_digest() == linux.recipe_digest()


def test_real_recipe_is_valid() -> None:
    recipe = linux.load_recipe()
    assert "openssh-server" in recipe.packages
    assert "busybox-static" in recipe.packages  # the initramfs needs its busybox
    assert "init=/sbin/harness-init" in recipe.cmdline
    assert "console=ttyS0" in recipe.cmdline


def test_bad_recipe_names_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "recipe.toml"
    bad.write_text(
        'suite = "bookworm"\npackages = []\ninitramfs_modules = []\n'
        'disk_gib = 2\ncmdline = "x"\nbogus = 1\n'
    )
    with pytest.raises(ValueError) as info:
        linux.load_recipe(bad)
    msg = str(info.value)
    assert str(bad) in msg
    assert "packages" in msg
    assert "bogus" in msg


# --------------------------------------------------------------------------- cache


def test_staging_renames_into_place_world_traversable(tmp_path: Path) -> None:
    digest = "ab" * 32
    with image_cache.entry_lock("t", digest, tmp_path):
        with image_cache.staging("t", digest, tmp_path) as stage:
            assert image_cache.lookup("t", digest, tmp_path) is None
            (stage / "f").write_text("x")
        final = image_cache.lookup("t", digest, tmp_path)
    assert final is not None
    assert final.name == f"t-{digest[:12]}"
    assert (final / "f").read_text() == "x"
    assert stat.S_IMODE(final.stat().st_mode) & 0o755 == 0o755
    assert [p.name for p in final.parent.iterdir() if p.is_dir()] == [final.name]


def test_failed_build_leaves_no_entry(tmp_path: Path) -> None:
    digest = "cd" * 32
    with pytest.raises(RuntimeError), image_cache.staging("t", digest, tmp_path) as stage:
        (stage / "half").write_text("x")
        raise RuntimeError("boom")
    assert image_cache.lookup("t", digest, tmp_path) is None
    assert [p for p in (tmp_path / "images").iterdir() if p.is_dir()] == []


def test_stale_staging_of_dead_process_is_removed(tmp_path: Path) -> None:
    digest = "ef" * 32
    final = image_cache.entry_dir("t", digest, tmp_path)
    # A pid above pid_max can never be alive: a build killed long ago.
    dead = final.parent / f".{final.name}.staging-999999999"
    dead.mkdir()
    with image_cache.staging("t", digest, tmp_path):
        pass
    assert not dead.exists()
    assert final.is_dir()


def test_forced_rebuild_replaces_entry(tmp_path: Path) -> None:
    digest = "01" * 32
    for content in ("old", "new"):
        with image_cache.staging("t", digest, tmp_path) as stage:
            (stage / "f").write_text(content)
    final = image_cache.entry_dir("t", digest, tmp_path)
    assert (final / "f").read_text() == "new"


# --------------------------------------------------------------------------- manifest


def _image(directory: Path) -> linux.LinuxImage:
    return linux.LinuxImage(
        name="linux",
        digest="f" * 64,
        directory=directory,
        disk=directory / "disk.qcow2",
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.cpio",
        cmdline="root=/dev/vda console=ttyS0",
        ssh_user="root",
        ssh_private_key=directory / "id_ed25519",
        host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDp2",
        guest_tools={"kvm-marker": "/usr/local/bin/kvm-marker"},
        kernel_release="6.1.0-test",
        packages={"stress-ng": "0.15"},
    )


def test_manifest_round_trip_is_relocatable(tmp_path: Path) -> None:
    image = _image(tmp_path / "a")
    image.directory.mkdir()
    image.write_manifest()
    assert linux.LinuxImage.from_manifest(image.directory) == image
    # Paths are stored relative, so the rename out of staging keeps them valid.
    moved = tmp_path / "b"
    image.directory.rename(moved)
    reloaded = linux.LinuxImage.from_manifest(moved)
    assert reloaded.disk == moved / "disk.qcow2"
    assert reloaded.missing_files() == [
        moved / "disk.qcow2",
        moved / "vmlinuz",
        moved / "id_ed25519",
        moved / "initrd.cpio",
    ]


def test_bad_manifest_names_field(tmp_path: Path) -> None:
    (tmp_path / "image.json").write_text('{"name": "linux"}')
    with pytest.raises(ValueError, match=r"image\.json.*'digest'"):
        linux.LinuxImage.from_manifest(tmp_path)


# --------------------------------------------------------------------------- mirror, modules, cpio


def test_mirror_from_deb822_and_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.invalid/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    (tmp_path / "sources.list.d/other.list").write_text(
        "deb [arch=amd64] http://other.invalid/apt cloud-bookworm main\n"
    )
    monkeypatch.delenv("HARNESS_DEBIAN_MIRROR", raising=False)
    assert linux.debian_mirror("bookworm", tmp_path) == "http://mirror.invalid/debian"
    (tmp_path / "sources.list").write_text(
        "deb [signed-by=/k] http://one.invalid/d bookworm main\n"
    )
    assert linux.debian_mirror("bookworm", tmp_path) == "http://one.invalid/d"
    with pytest.raises(linux.ImageBuildError, match="HARNESS_DEBIAN_MIRROR"):
        linux.debian_mirror("trixie", tmp_path)


def test_resolve_modules_orders_dependencies(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/v/virtio.ko:\nkernel/v/virtio_ring.ko:\n"
        "kernel/v/virtio_pci.ko: kernel/v/virtio_ring.ko kernel/v/virtio.ko\n"
        "kernel/b/virtio_blk.ko: kernel/v/virtio_ring.ko kernel/v/virtio.ko\n"
    )
    (tmp_path / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    order = linux.resolve_modules(tmp_path, ["virtio_pci", "ext4", "virtio-blk"])
    assert order == [
        "kernel/v/virtio_ring.ko",
        "kernel/v/virtio.ko",
        "kernel/v/virtio_pci.ko",
        "kernel/b/virtio_blk.ko",
    ]
    with pytest.raises(linux.ImageBuildError, match="initramfs_modules"):
        linux.resolve_modules(tmp_path, ["nope"])


def test_cpio_newc_layout() -> None:
    w = linux._Cpio()
    w.directory("bin")
    w.file("bin/x", b"hello", 0o755)
    data = w.finish()
    entries = []
    off = 0
    while True:
        assert data[off : off + 6] == b"070701"
        fields = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name_start = off + 110
        name = data[name_start : name_start + namesize - 1].decode()
        off = (name_start + namesize + 3) & ~3
        body = data[off : off + filesize]
        off = (off + filesize + 3) & ~3
        entries.append((name, stat.S_IFMT(fields[1]), body))
        if name == "TRAILER!!!":
            break
    assert off == len(data)
    assert entries[0] == ("bin", stat.S_IFDIR, b"")
    assert entries[1] == ("bin/x", stat.S_IFREG, b"hello")


# --------------------------------------------------------------------------- guest tools

_GCC = shutil.which("gcc")
needs_gcc = pytest.mark.skipif(_GCC is None, reason="gcc not installed: apt-get install gcc")


def _compile(tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    src = paths.GUEST_TOOLS_DIR / f"{name}.c"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(out), str(src)], check=True)
    return out


@needs_gcc
def test_kvm_marker_valid_and_invalid_args(tmp_path: Path) -> None:
    tool = str(_compile(tmp_path, "kvm-marker"))
    for args in (["1", "1"], ["65535", "65535"], ["7", "0"]):
        proc = subprocess.run([tool, *args], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
    for args in ([], ["1"], ["0", "1"], ["65536", "1"], ["1", "65536"], ["1", "-1"], ["x", "1"],
                 ["1", "2x"], ["1", "1", "1"]):  # fmt: skip
        proc = subprocess.run([tool, *args], capture_output=True, text=True, check=False)
        assert proc.returncode == 2, args
        assert "usage: kvm-marker TOKEN PHASE" in proc.stderr


_LINE = re.compile(
    r"page-touch pass=(\d+) kind=(first-touch|retouch) mib=(\d+) pages=(\d+) "
    r"seconds=(\d+\.\d{6}) mib_per_s=(\d+\.\d{2}) pgfault=(\d+) thp_fault_alloc=(\d+) "
    r"thp_fault_fallback=(\d+) huge_used=(\d+) minflt=(\d+)"
)


@needs_gcc
def test_page_touch_output_and_validation(tmp_path: Path) -> None:
    tool = str(_compile(tmp_path, "page-touch"))
    proc = subprocess.run(
        [tool, "--mib", "8", "--passes", "3", "--thp", "never"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines, start=1):
        m = _LINE.fullmatch(line)
        assert m, line
        assert int(m[1]) == i
        assert m[2] == ("first-touch" if i == 1 else "retouch")
        assert (int(m[3]), int(m[4])) == (8, 8 * 256)
        assert float(m[5]) > 0
    default = subprocess.run([tool, "--mib", "1"], capture_output=True, text=True, check=True)
    assert len(default.stdout.splitlines()) == 2  # default --passes 2
    for args in ([], ["--mib"], ["--mib", "0"], ["--mib", "abc"], ["--mib", "1", "--passes", "0"],
                 ["--mib", "1", "--thp", "maybe"], ["--frob"]):  # fmt: skip
        bad = subprocess.run([tool, *args], capture_output=True, text=True, check=False)
        assert bad.returncode == 2, args
        assert "usage: page-touch" in bad.stderr


@needs_gcc
def test_page_touch_mmap_failure(tmp_path: Path) -> None:
    tool = str(_compile(tmp_path, "page-touch"))
    # 4 TiB cannot be mapped under a 1 GiB address-space limit.
    proc = subprocess.run(
        ["sh", "-c", f"ulimit -v 1048576; exec {tool} --mib 4194304"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "mmap of 4194304 MiB failed" in proc.stderr
