"""Doctor checks on real files and directories, and the rendering the CLI prints."""

from __future__ import annotations

import grp
import os
import time
from pathlib import Path

import pytest

from harness.host.doctor import (
    APT_PACKAGES,
    Check,
    check_debugfs,
    check_dev_kvm,
    check_root,
    check_tracefs,
    render,
    required_failures,
    wait_for_libvirtd,
)


def test_render_statuses_and_fix() -> None:
    checks = [
        Check("root", True, True, "euid 0"),
        Check("libvirtd", False, True, "qemu:///system: no socket", "libvirtd -d"),
        Check("xmllint", False, False, "xmllint not found", "apt-get install libxml2-utils"),
        Check("mmu-mode", True, False, "ept", "never shown when ok"),
    ]
    lines = render(checks)
    assert lines[0].split() == ["ok", "root", "euid", "0"]
    assert lines[1].startswith("missing  libvirtd")
    assert lines[1].endswith("(fix: libvirtd -d)")
    assert lines[2].startswith("info     xmllint")
    assert "fix" not in lines[3]
    # Columns line up: the detail starts at the same offset on every line.
    assert len({line.index(c.detail) for line, c in zip(lines, checks, strict=True)}) == 1
    assert required_failures(checks) == [checks[1]]
    assert render([]) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chgrp to kvm needs root")
def test_check_dev_kvm_on_real_file(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.write_text("")
    kvm_gid = grp.getgrnam("kvm").gr_gid
    os.chown(dev, -1, kvm_gid)
    os.chmod(dev, 0o660)
    assert check_dev_kvm(dev).ok
    os.chmod(dev, 0o600)
    bad = check_dev_kvm(dev)
    assert not bad.ok and bad.required
    assert bad.fix == "chgrp kvm /dev/kvm; chmod 660 /dev/kvm"
    os.chown(dev, -1, 0)
    os.chmod(dev, 0o660)
    assert "group root" in check_dev_kvm(dev).detail
    missing = check_dev_kvm(tmp_path / "absent")
    assert not missing.ok and "does not exist" in missing.detail


def test_check_tracefs_layouts(tmp_path: Path) -> None:
    assert check_tracefs(tmp_path).fix == f"mount -t tracefs nodev {tmp_path}"
    (tmp_path / "events").mkdir()
    no_kvm = check_tracefs(tmp_path)
    assert not no_kvm.ok and "no kvm events" in no_kvm.detail
    (tmp_path / "events" / "kvm").mkdir()
    assert check_tracefs(tmp_path).ok


def test_check_debugfs_layouts(tmp_path: Path) -> None:
    absent = check_debugfs(tmp_path)
    assert not absent.ok and not absent.required
    (tmp_path / "kvm").mkdir()
    (tmp_path / "kvm" / "exits").write_text("12\n")
    assert check_debugfs(tmp_path).ok


def test_check_root_matches_euid() -> None:
    assert check_root().ok == (os.geteuid() == 0)


def test_wait_for_libvirtd_is_bounded() -> None:
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="not answering"):
        wait_for_libvirtd(1.0, uri="qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    assert time.monotonic() - t0 < 10
    wait_for_libvirtd(1.0, uri="test:///default")  # libvirt's built-in test driver answers


def test_package_list_is_the_documented_one() -> None:
    assert {"qemu-system-x86", "libvirt-daemon-system", "bpftrace", "busybox-static"} <= set(
        APT_PACKAGES
    )
    assert len(set(APT_PACKAGES)) == len(APT_PACKAGES)
