"""The leak checks see a leak that no result file names (tests/leaks.py, used by helpers_b.py).

A run killed before its first save leaves no result file, so a check that
only follows run ids from result files misses whatever it left. Here real
leftovers are made by hand, with no result file anywhere: a harness-named
libvirt domain whose owner is gone, a QEMU whose domain libvirt does not
list, a tracer process whose parent is gone, and a run directory (overlay
inside) whose owner pid is dead or is the test process itself; a run
directory of another live owner is another session's run in progress and is
left out.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from harness.vm.lifecycle import OWNER_FILE
from tests.leaks import harness_qemus, host_state, leaks_since

pytestmark = pytest.mark.integration

DOMAIN_XML = """\
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>16</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><memballoon model='none'/></devices>
</domain>
"""


@contextlib.contextmanager
def leaked_domain(name: str) -> Iterator[None]:
    """A paused transient domain with no owner metadata, destroyed on leaving."""
    conn = libvirt.open("qemu:///system")
    dom = conn.createXML(DOMAIN_XML.format(name=name), libvirt.VIR_DOMAIN_START_PAUSED)
    try:
        yield
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        conn.close()


@contextlib.contextmanager
def domainless_qemu(name: str) -> Iterator[None]:
    """A QEMU named like a harness guest that libvirt knows nothing about."""
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-name", f"guest={name},debug-threads=on", "-machine", "none",
         "-display", "none", "-nodefaults", "-S"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not any(name in q for q in harness_qemus()) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def orphaned_tracer(tmp_path: Path) -> Iterator[None]:
    """A process named ``kvmtrace`` (the libbpf loader's name) whose parent has exited."""
    exe = tmp_path / "kvmtrace"
    shutil.copy("/bin/sleep", exe)
    subprocess.run(["sh", "-c", f"{exe} 60 >/dev/null 2>&1 &"], check=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 10
        while not pids and time.monotonic() < deadline:
            out = subprocess.run(["pgrep", "-f", str(exe)], capture_output=True, text=True)
            pids = [int(p) for p in out.stdout.split()]
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leaks_without_any_result_file_are_seen(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    tag = f"leakcheck{secrets.token_hex(3)}"
    before = host_state(runs)

    dead = runs / f"{tag}"
    dead.mkdir()
    (dead / OWNER_FILE).write_text(str(_dead_pid()))
    (dead / "a.qcow2").write_bytes(b"")
    alive = runs / f"{tag}-alive"
    alive.mkdir()
    other_session = subprocess.Popen(["sleep", "60"])  # a live harness run of someone else
    (alive / OWNER_FILE).write_text(str(other_session.pid))
    mine = runs / f"{tag}-mine"  # a run inside this very process: ended when the test ends
    mine.mkdir()
    (mine / OWNER_FILE).write_text(str(os.getpid()))

    with (
        leaked_domain(f"kvmh-{tag}-dom"),
        domainless_qemu(f"kvmh-{tag}-q"),
        orphaned_tracer(tmp_path),
    ):
        leaks = leaks_since(before, runs)
    other_session.kill()
    other_session.wait()
    assert not list(tmp_path.rglob("*.json")), "no result file was written"
    assert f"libvirt domain kvmh-{tag}-dom" in leaks, leaks
    assert [q for q in leaks if q.startswith("QEMU") and f"guest=kvmh-{tag}-q" in q], leaks
    assert [t for t in leaks if t.startswith("tracer") and str(tmp_path / "kvmtrace") in t], leaks
    assert f"run directory {dead}: ['a.qcow2', '{OWNER_FILE}']" in leaks, leaks
    assert not [x for x in leaks if str(alive) in x], leaks
    assert f"run directory {mine}: ['{OWNER_FILE}']" in leaks, leaks
    # Once they are gone, nothing of them is reported.
    deadline = time.monotonic() + 15
    for d in (dead, alive, mine):
        shutil.rmtree(d)
    while [x for x in leaks_since(before, runs) if tag in x] and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not [x for x in leaks_since(before, runs) if tag in x]
