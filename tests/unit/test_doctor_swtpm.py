"""`harness doctor` repairs swtpm's local CA when someone else owns its files (seen on this
host: swtpm_setup once run as root left a root-owned lock, and every TPM domain then
failed to start with "Need read/write rights on .../.lock.swtpm-localca for user tss")."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from harness.host import doctor


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_root_owned_lock_is_found_and_fixed(tmp_path: Path) -> None:
    try:
        tss = pwd.getpwnam("tss")
    except KeyError:
        pytest.skip("no tss user (swtpm-tools not installed)")
    ca = tmp_path / "swtpm-localca"
    ca.mkdir()
    (ca / ".lock.swtpm-localca").touch()
    (ca / "certserial").write_text("1\n")
    os.chown(ca, tss.pw_uid, -1)
    os.chown(ca / "certserial", tss.pw_uid, tss.pw_gid)
    check = doctor.check_swtpm_localca(ca, "tss")
    assert not check.ok and ".lock.swtpm-localca" in check.detail
    assert check.fix == f"chown -R tss:tss {ca}"
    said: list[str] = []
    doctor.fix_swtpm_localca(said.append, ca, "tss")
    assert doctor.check_swtpm_localca(ca, "tss").ok and said == [check.fix]
    assert (ca / ".lock.swtpm-localca").stat().st_uid == tss.pw_uid


def test_an_absent_ca_is_fine(tmp_path: Path) -> None:
    assert doctor.check_swtpm_localca(tmp_path / "none", "tss").ok
