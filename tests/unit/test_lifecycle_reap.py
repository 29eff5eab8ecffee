"""Reaping a killed run's leftovers, against libvirt's own test driver (test:///default):
real libvirt API and XML handling, no QEMU needed."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from harness.results import WorkloadRun, load, write_atomic
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


def test_domains_of_a_live_owner_are_spared_without_a_run_dir(
    conn: libvirt.virConnect, tmp_path: Path
) -> None:
    """Tests and benchmarks start domains outside any run: their owner metadata protects them."""
    from harness.vm.lifecycle import domain_owner, with_owner

    live = f"{DOMAIN_PREFIX}bench-live"
    dead = f"{DOMAIN_PREFIX}bench-dead"
    conn.defineXML(with_owner(DOMAIN.format(name=live), os.getpid())).create()
    conn.defineXML(with_owner(DOMAIN.format(name=dead), dead_pid())).create()
    assert domain_owner(conn.lookupByName(live)) == os.getpid()

    reaped = reap_leftovers(conn, tmp_path, lambda _line: None)

    names = {d.name() for d in conn.listAllDomains()}
    assert live in names and dead not in names
    assert reaped == [f"domain {dead}"]


def test_a_run_dir_appears_with_its_owner_and_a_claim_in_progress_is_spared(
    conn: libvirt.virConnect, tmp_path: Path
) -> None:
    from harness.vm.lifecycle import claim_run_dir

    claim_run_dir(tmp_path / "r1")
    assert (tmp_path / "r1" / OWNER_FILE).read_text() == str(os.getpid())
    assert [p.name for p in tmp_path.iterdir()] == ["r1"]  # no staging left
    in_progress = tmp_path / f".claim-r2-{os.getpid()}"
    in_progress.mkdir()  # a concurrent run between mkdir and writing its owner file
    abandoned = tmp_path / f".claim-r3-{dead_pid()}"
    abandoned.mkdir()
    reap_leftovers(conn, tmp_path, lambda _line: None)
    assert in_progress.exists() and (tmp_path / "r1").exists() and not abandoned.exists()
    with pytest.raises(OSError):
        claim_run_dir(tmp_path / "r1")  # run ids are unique: never two owners


def test_a_dead_runs_result_file_is_told_it_was_killed(
    conn: libvirt.virConnect, tmp_path: Path
) -> None:
    """The reaper hands the dead run's result file to the callback; mark_killed rewrites it."""
    from harness.results import mark_killed
    from harness.vm.lifecycle import RESULT_FILE
    from tests.unit.test_results import result

    results = tmp_path / "results"
    runs = tmp_path / "runs"
    dead_file, done_file = results / "dead.json", results / "done.json"
    running = result("running")
    running.runs.append(
        WorkloadRun(workload="w", vm="v", repetition=1, params={}, status="ok")
    )
    write_atomic(running, dead_file)
    write_atomic(result("complete"), done_file)
    for name, file in (("dead", dead_file), ("done", done_file)):
        d = run_dir(runs, name, dead_pid())
        (d / RESULT_FILE).write_text(str(file))

    def killed(_d: Path, file: Path, owner: str) -> bool:
        return mark_killed(file, f"killed: pid {owner} gone")

    reaped = reap_leftovers(conn, runs, lambda _line: None, killed)

    after = load(dead_file)
    assert after.status == "killed" and after.errors[-1].startswith("killed: pid ")
    assert after.runs == running.runs  # what it measured is untouched
    assert load(done_file).status == "complete"  # only a file still claiming "running"
    assert f"result {dead_file} marked killed" in reaped
