"""Files a guest's disk, keys and console live in are closed to other local users.

A running VM's overlay, the base image (its disk holds the guest's SSH host
private key) and the run directory must not be readable by a local user on a
shared runner; QEMU (libvirt-qemu) still reaches them: libvirt's DAC driver
chowns each disk, kernel, initrd and console file to QEMU's user while the
domain runs. That a guest still boots so is shown by every integration test
that boots one (tests/integration/test_hostile_guest.py among them).
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from harness.image import linux
from harness.vm import lifecycle


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_run_directory_is_closed_to_other_users(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "r1"
    lifecycle.claim_run_dir(run_dir)
    st = run_dir.stat()
    gid = lifecycle.qemu_gid()
    if gid is None:
        assert mode(run_dir) == 0o711
    else:
        # root lists and writes it; QEMU's group (no one else in it) only passes through.
        assert mode(run_dir) == 0o710 and st.st_gid == gid
        assert grp.getgrgid(gid).gr_name in lifecycle.QEMU_GROUPS
    assert st.st_uid == os.geteuid()
    assert mode(run_dir) & 0o007 in (0, 0o001), "no read or write for other users"


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_overlay_is_mode_0600(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    overlay = tmp_path / "o.qcow2"
    lifecycle.create_overlay(base, overlay)
    assert mode(overlay) == 0o600


def test_image_directory_disk_and_key_are_closed(tmp_path: Path) -> None:
    directory = tmp_path / "linux-abc"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    disk, key, kernel = directory / "disk.qcow2", directory / "id_ed25519", directory / "vmlinuz"
    for f in (disk, key, kernel):
        f.write_bytes(b"x")
        f.chmod(0o644)
    image = linux.LinuxImage(
        name="linux", digest="d" * 64, directory=directory, disk=disk, kernel=kernel,
        initrd=None, cmdline="", ssh_user="root", ssh_private_key=key, host_key="k v",
        guest_tools={},
    )  # fmt: skip
    linux._make_private(image)
    assert mode(disk) == 0o600 and mode(key) == 0o600
    assert mode(directory) in (0o710, 0o711)
    assert mode(kernel) == 0o644  # no secret in it


def test_console_log_copy_replaces_a_planted_symlink_and_never_writes_through(
    tmp_path: Path,
) -> None:
    src = tmp_path / "console.log"
    src.write_text("guest console\n")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    results = tmp_path / "results"
    results.mkdir()
    dest = results / "run.console.log"
    dest.symlink_to(victim)
    assert lifecycle.copy_console_log(src, dest)
    assert victim.read_text() == "precious\n"
    assert not dest.is_symlink() and dest.read_text() == "guest console\n"
    assert mode(dest) == 0o644
    assert [p.name for p in results.iterdir()] == ["run.console.log"]  # no temp file left


def test_console_log_copy_does_not_truncate_a_planted_hard_link(tmp_path: Path) -> None:
    src = tmp_path / "console.log"
    src.write_text("guest console\n")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    dest = tmp_path / "run.console.log"
    os.link(victim, dest)
    lifecycle.copy_console_log(src, dest)
    assert victim.read_text() == "precious\n"
    assert dest.read_text() == "guest console\n"


def test_console_log_source_symlink_is_refused_and_missing_one_is_no_copy(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root only\n")
    src = tmp_path / "console.log"
    src.symlink_to(secret)
    with pytest.raises(lifecycle.VmError, match=r"console log .* not copied"):
        lifecycle.copy_console_log(src, tmp_path / "out.log")
    assert not (tmp_path / "out.log").exists()
    assert lifecycle.copy_console_log(tmp_path / "none.log", tmp_path / "out.log") is False
