"""Reaping a killed run's leftovers, against libvirt's own test driver (test:///default):
real libvirt API and XML handling, no QEMU needed."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from harness.vm.lifecycle import DOMAIN_PREFIX, OWNER_FILE, reap_leftovers

DOMAIN = """<domain type='test'><name>{name}</name><memory>65536</memory>
<os><type>hvm</type></os></domain>"""


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid  # reaped: no process has this pid now (until the kernel reuses it)


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    c = libvirt.open("test:///default")
    yield c
    c.close()


def run_dir(root: Path, run_id: str, pid: int) -> Path:
    d = root / run_id
    d.mkdir(parents=True)
    (d / OWNER_FILE).write_text(str(pid))
    (d / "linux.qcow2").write_bytes(b"overlay")
    return d


def test_killed_runs_are_reaped_live_runs_are_not(conn: libvirt.virConnect, tmp_path: Path) -> None:
    dead = run_dir(tmp_path, "dead", dead_pid())
    live = run_dir(tmp_path, "live", os.getpid())
    conn.defineXML(DOMAIN.format(name=f"{DOMAIN_PREFIX}dead-linux")).create()
    conn.defineXML(DOMAIN.format(name=f"{DOMAIN_PREFIX}live-linux")).create()
    conn.defineXML(DOMAIN.format(name="someone-elses-vm"))
    said: list[str] = []

    reaped = reap_leftovers(conn, tmp_path, said.append)

    names = {d.name() for d in conn.listAllDomains()}
    assert f"{DOMAIN_PREFIX}dead-linux" not in names
    assert {f"{DOMAIN_PREFIX}live-linux", "someone-elses-vm"} <= names
    assert not dead.exists() and live.exists()
    assert reaped == [f"domain {DOMAIN_PREFIX}dead-linux", f"run directory {dead}"]
    assert all("reaped leftover of a killed run" in line for line in said) and len(said) == 2
