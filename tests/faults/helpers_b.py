"""Helpers of the fault tests for guests, SSH, the tracer and libvirtd
(tests/faults/test_guest_faults.py, test_ssh_faults.py, test_libvirtd_restart.py).

Every run goes through the real ``harness run`` CLI in a subprocess, on a
suite written beside its own fault workloads (a suite finds workload files in
its own directory first, see harness/spec.py ``load_suite``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.paths import cache_dir
from tests.conftest import harness_domains, stray_tracers
from tests.faults import helpers_a
from tests.leaks import host_state, leaks_since


@pytest.fixture(autouse=True)
def nothing_left_behind_by_fault(tmp_path: Path) -> Iterator[None]:
    """Overrides the conftest check of the same name in the modules that import it.

    As strong as the global check (every harness domain, tracer, QEMU and run
    directory on the host, not only those of runs that saved a result), made
    fair on a host where other sessions run the harness at the same time (see
    tests/leaks.py ``leaks_since``); plus, for every run this test started whose result
    file exists, the exact per-run-id check. An unreadable result file fails:
    results are written atomically.
    """
    before = host_state()
    yield
    run_ids = set()
    for f in tmp_path.rglob("*.json"):
        if f.name.startswith("."):
            continue
        try:
            run_ids.add(json.loads(f.read_text())["run_id"])
        except (ValueError, KeyError, TypeError, OSError) as exc:
            pytest.fail(f"{f}: not a readable result file ({exc!r})")
    for run_id in sorted(run_ids):
        assert_nothing_left(run_id)
    deadline = time.monotonic() + 15  # libvirtd reaps an autodestroy domain asynchronously
    while (leaks := leaks_since(before)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not leaks, f"the fault left these behind: {leaks}"

VM = """\
[[vms]]
name = "{name}"
image = "linux"
vcpus = 1
memory_mib = 512
accelerator = "auto"
boot_timeout_s = 90
"""

#: A phase that always succeeds and prints a metric: the data that must survive a fault.
BEFORE_PHASE = """\
[[phases]]
name = "before"
command = "echo before value=42"
timeout_s = 30

[[phases.metrics]]
name = "value"
regex = 'value=(\\d+)'
"""


def fault_workload(name: str, command: str, timeout_s: float, *, after: bool = True) -> str:
    """A workload: ``before`` (ok, metric value=42), the fault phase, then ``after``."""
    text = (
        f'name = "{name}"\nguest = "linux"\ndescription = "fault injection"\n\n'
        f"{BEFORE_PHASE}\n"
        f'[[phases]]\nname = "fault"\ncommand = {json.dumps(command)}\ntimeout_s = {timeout_s}\n'
    )
    if after:
        text += '\n[[phases]]\nname = "after"\ncommand = "true"\ntimeout_s = 30\n'
    return text


def write_fault_suite(
    dir_: Path,
    workloads: dict[str, str],
    runs: list[tuple[str, str]],
    vms: tuple[str, ...] = ("a",),
    *,
    trace: bool = True,
    name: str = "fault",
) -> Path:
    """A suite in ``dir_`` with its own workload files; ``runs`` are (workload, vm)."""
    for wname, text in workloads.items():
        (dir_ / f"{wname}.toml").write_text(text)
    # workload_dirs: the suite's own workloads sit beside it (only named dirs are searched).
    body = f'name = "{name}"\nrepetitions = 1\nworkload_dirs = ["."]\n\n' + "\n".join(
        VM.format(name=v) for v in vms
    )
    for workload, vm in runs:
        body += f'\n[[runs]]\nworkload = "{workload}"\nvm = "{vm}"\n'
    body += f'\n[trace]\nenabled = {str(trace).lower()}\nprobes = ["default"]\n'
    path = dir_ / f"{name}.toml"
    path.write_text(body)
    return path


def harness(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", *args]


def start_run(
    suite: Path, results: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """`harness run SUITE --quiet` in the background (``env``: added to the environment)."""
    return subprocess.Popen(
        harness("run", str(suite), "--results-dir", str(results), "--quiet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def finish(proc: subprocess.Popen[str], timeout_s: float) -> tuple[int, str]:
    """Wait for the run; its exit status and stderr (killed if it overruns)."""
    done = helpers_a.finish(proc, timeout_s)
    return done.returncode, done.stderr


def read_result(results: Path) -> dict[str, Any] | None:
    files = sorted(p for p in results.glob("*.json"))
    if not files:
        return None
    try:
        data: dict[str, Any] = json.loads(files[0].read_text())
    except json.JSONDecodeError:
        return None  # never half-written (atomic), but the file may not exist yet
    return data


#: The run's one result file, validated against results/schema.json and read back.
only_result = helpers_a.only_result


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` every 0.2 s until true; fail naming ``what`` after ``timeout_s``."""
    helpers_a.wait_for(condition, timeout_s, what, poll=0.2)


def wait_for_phase(
    proc: subprocess.Popen[str], results: Path, workload: str, phase: str, timeout_s: float = 120
) -> dict[str, Any]:
    """Return once ``workload``'s ``phase`` is running: the phases before it are recorded.

    The result file is rewritten after every phase, so the phase is running
    once the one before it is in the file (and the fault phase follows
    ``before``, which takes well under a second).
    """

    def running() -> bool:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-3000:]}"
        data = read_result(results)
        if data is None:
            return False
        for r in data["runs"]:
            names = [p["name"] for p in r["phases"]]
            if r["workload"] == workload and names and names[-1] == "before" and phase == "fault":
                return True
        return False

    wait_for(running, timeout_s, f"phase {workload}/{phase} to start")
    time.sleep(1.0)  # the phase's command is now running in the guest
    data = read_result(results)
    assert data is not None
    return data


def run_domain(run_id: str, vm: str) -> str:
    return f"kvmh-{run_id}-{vm}"


def ssh_port(domain: str) -> int:
    """The loopback port forwarded to the guest's sshd, from the live domain XML."""
    xml = subprocess.run(
        ["virsh", "-c", "qemu:///system", "dumpxml", domain],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(r"hostfwd=tcp:127\.0\.0\.1:(\d+)-:22", xml)
    assert found, xml
    return int(found.group(1))


def qemu_of_run(run_id: str) -> list[str]:
    out = subprocess.run(
        ["pgrep", "-a", "-f", f"guest=kvmh-{run_id}-"], capture_output=True, text=True, check=False
    ).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def assert_nothing_left(run_id: str) -> None:
    """No domain, QEMU, overlay, run directory or bpftrace of ``run_id`` is left."""
    deadline = time.monotonic() + 15  # libvirtd removes a destroyed domain asynchronously
    while time.monotonic() < deadline and (
        [d for d in harness_domains() if run_id in d] or qemu_of_run(run_id)
    ):
        time.sleep(0.3)
    assert not [d for d in harness_domains() if run_id in d], "a domain of the run is left"
    assert not qemu_of_run(run_id), "a QEMU process of the run is left"
    run_dir = cache_dir() / "runs" / run_id
    assert not run_dir.exists(), f"run directory (overlay, console) left: {list(run_dir.iterdir())}"
    assert not list((cache_dir() / "runs").glob(f"{run_id}*")), "a run directory is left"
    assert not [t for t in stray_tracers() if run_id in t], "a tracer outlived the run"


NEXT_WORKLOAD = """\
name = "fault-next"
guest = "linux"
description = "the run after a fault"

[[phases]]
name = "touch"
command = "page-touch --mib 8 --passes 2 --thp never"
timeout_s = 120

[[phases.metrics]]
name = "first_touch_mib_per_s"
regex = '^page-touch pass=1 kind=first-touch .*mib_per_s=([\\d.]+)'
"""


def assert_next_run_succeeds(dir_: Path) -> dict[str, Any]:
    """A plain run after the fault: it completes, its result valid; returns it."""
    next_dir = dir_ / "next"
    next_dir.mkdir()
    suite = write_fault_suite(
        next_dir, {"fault-next": NEXT_WORKLOAD}, [("fault-next", "a")], trace=False, name="next"
    )
    results = next_dir / "results"
    proc = subprocess.run(
        harness("run", str(suite), "--results-dir", str(results), "--quiet"),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = only_result(results)
    assert data["status"] == "complete", data["errors"]
    assert data["runs"][0]["phases"][0]["metrics"]["first_touch_mib_per_s"] > 0
    assert_nothing_left(data["run_id"])
    return data


def assert_before_kept(run: dict[str, Any]) -> None:
    """The phase that finished before the fault is in the file with its data."""
    before = run["phases"][0]
    assert before["name"] == "before" and before["status"] == "ok", before
    assert before["metrics"] == {"value": 42.0}
    assert before["exit_status"] == 0 and before["duration_s"] is not None


def by_workload(data: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["workload"], r["vm"]): r for r in data["runs"]}
