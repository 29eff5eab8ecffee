"""Helpers of the fault tests for signals, the image cache, a full disk, two runs at
once and bad input (tests/faults/test_signals.py ... test_bad_input.py).

Every run goes through the real ``harness`` CLI in a subprocess. Tests that
kill a run, or that need the image cache in a known state, give the run a
private cache (``HARNESS_CACHE``): its run directories are then reaped only
by this test's own next run, never by another harness user of the host, and
the shared image is never touched. The private cache sits under /var/cache
because libvirt's QEMU (user libvirt-qemu) must reach the files in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from harness.image.linux import LinuxImage, build_linux_image
from harness.paths import RESULTS_DIR, SUITES_DIR, cache_dir
from harness.results import load
from tests.conftest import harness_domains, stray_tracers
from tests.leaks import leaked_domains, orphaned_tracers

SCHEMA = json.loads((RESULTS_DIR / "schema.json").read_text())
MICRO_SUITE = SUITES_DIR / "micro-kvm.toml"

#: A small Linux suite: one TCG guest (about 6 s to SSH), one short workload.
LINUX_SUITE = """\
name = "{name}"
repetitions = 1

[[vms]]
name = "linux"
image = "linux"
vcpus = 1
memory_mib = 512
accelerator = "auto"
boot_timeout_s = 90

[[runs]]
workload = "page-touch"
vm = "linux"
params = {{ mib = {mib} }}

[trace]
enabled = {trace}
probes = ["default"]
"""


def write_linux_suite(
    dir_: Path, name: str = "fault", *, mib: int = 8, trace: bool = True
) -> Path:
    path = dir_ / f"{name}.toml"
    path.write_text(LINUX_SUITE.format(name=name, mib=mib, trace=str(trace).lower()))
    return path


def harness_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", *args]


def env_with(cache: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if cache is not None:
        env["HARNESS_CACHE"] = str(cache)
    return env


def run_cli(
    *args: str, cache: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``harness ARGS`` to completion."""
    return subprocess.run(
        harness_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env_with(cache),
    )


def start_cli(*args: str, cache: Path | None = None) -> subprocess.Popen[str]:
    """``harness ARGS`` in the background; stderr is read by :class:`Lines`."""
    return subprocess.Popen(
        harness_argv(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_with(cache),
    )


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def finish(proc: subprocess.Popen[str], timeout: float = 90) -> Finished:
    """Wait for ``proc`` (killed if it overstays) and return what it printed."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"harness did not exit within {timeout} s:\n{err[-3000:]}")
    return Finished(proc.returncode, out, err)


def wait_for(
    condition: Callable[[], Any],
    timeout_s: float,
    what: str,
    poll: float = 0.05,
    proc: subprocess.Popen[str] | None = None,
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what``.

    With ``proc``, fail at once (with its stderr) if that process ends first.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"harness exited ({proc.returncode}) before {what}:\n{err[-3000:]}")
        time.sleep(poll)
    value = condition()
    if not value:
        pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
    return value


def result_files(results: Path) -> list[Path]:
    return sorted(p for p in results.glob("*.json") if not p.name.startswith("."))


def read_json(path: Path) -> dict[str, Any] | None:
    """The file's JSON, or None while it does not exist yet."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return data


def only_result(results: Path) -> dict[str, Any]:
    """The one result file in ``results``, checked against the schema and the model."""
    files = result_files(results)
    assert len(files) == 1, files
    data: dict[str, Any] = json.loads(files[0].read_text())
    jsonschema.validate(data, SCHEMA)
    load(files[0])  # and the harness itself reads it back
    return data


def first_result(results: Path) -> dict[str, Any] | None:
    files = result_files(results)
    return read_json(files[0]) if files else None


#: The tracer processes of either backend: bpftrace, or the libbpf loader kvmtrace.
TRACER_NAMES = ("bpftrace", "kvmtrace")


def tracer_processes() -> list[str]:
    """``pgrep -a`` lines of every tracer process of either backend on the host."""
    lines = list(stray_tracers())  # bpftrace
    out = subprocess.run(
        ["pgrep", "-a", "-x", "kvmtrace"], capture_output=True, text=True, check=False
    ).stdout
    return lines + [line for line in out.splitlines() if line.strip()]


def run_tracers(run_id: str) -> list[str]:
    """Tracer processes of this run (their program lives in its run directory)."""
    return [t for t in tracer_processes() if run_id in t]


def run_domains(run_id: str) -> list[str]:
    return [d for d in harness_domains() if run_id in d]


def qemu_processes(run_id: str) -> list[str]:
    """QEMU processes whose command line names this run (domain name, overlay, ROM)."""
    out = subprocess.run(
        ["pgrep", "-a", "-f", f"qemu-system.*{run_id}"], capture_output=True, text=True, check=False
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


def processes_under(path: Path) -> list[str]:
    """Processes whose command line names ``path`` (a build's debootstrap, mkfs, ...)."""
    out = subprocess.run(
        ["pgrep", "-a", "-f", str(path)], capture_output=True, text=True, check=False
    ).stdout
    me = os.getpid()
    return [
        line for line in out.splitlines() if line.strip() and int(line.split()[0]) != me
    ]


def mounts_under(path: Path) -> list[str]:
    base = str(path.resolve())
    with open("/proc/self/mounts") as fh:
        return [ln.split()[1] for ln in fh if ln.split()[1].startswith(base + "/")]


def assert_nothing_left(
    run_id: str, cache: Path | None = None, *, run_dir_kept: bool = False
) -> None:
    """No domain, QEMU or tracer of the run is left; its run directory only when
    ``run_dir_kept`` (SIGKILL, a full disk: the next run reaps and records it)."""
    assert wait_for(lambda: not run_domains(run_id), 30, f"domains of {run_id} to go") is True
    assert wait_for(lambda: not qemu_processes(run_id), 15, f"QEMU of {run_id} to exit") is True
    assert wait_for(lambda: not run_tracers(run_id), 15, f"bpftrace of {run_id} to exit") is True
    run_dir = (cache or cache_dir()) / "runs" / run_id
    if run_dir_kept:
        assert run_dir.is_dir(), "the run directory is left for the next run to reap and record"
    else:
        assert not run_dir.exists(), f"run directory left behind: {sorted(run_dir.rglob('*'))}"
    claims = list(((cache or cache_dir()) / "runs").glob(f".claim-{run_id}-*"))
    assert not claims, claims


@contextlib.contextmanager
def private_cache(*, share_images: bool, share_debs: bool = False) -> Iterator[Path]:
    """A cache directory of this test's own (``HARNESS_CACHE``), removed afterwards.

    ``share_images`` links ``images`` to the shared image cache, so runs use
    the shared Linux image without building it; otherwise the cache starts
    empty. ``share_debs`` links the downloaded .deb cache, so a build that is
    not going to be killed needs no download.
    """
    root = Path(tempfile.mkdtemp(prefix="kvmh-faults-", dir="/var/cache"))
    root.chmod(0o755)
    shared = cache_dir()
    try:
        if share_images:
            (shared / "images").mkdir(exist_ok=True)
            (root / "images").symlink_to(shared / "images")
        if share_debs:
            (shared / "debs").mkdir(exist_ok=True)
            (root / "debs").symlink_to(shared / "debs")
        yield root
    finally:
        for mnt in sorted(mounts_under(root), key=len, reverse=True):
            subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def nothing_left_behind_by_fault() -> Iterator[None]:
    """Overrides the conftest check of the same name in the modules that import it.

    The same promise (no harness domain and no tracer left by the test), made
    fair on a host where other sessions run the harness at the same time: a
    domain that appeared meanwhile counts only if its owner process is gone,
    a bpftrace only if its harness is gone. On CI nothing else runs, and the
    two checks are the same.
    """
    domains, tracers = set(harness_domains()), set(tracer_processes())
    yield
    deadline = time.monotonic() + 10  # libvirtd reaps an autodestroy domain asynchronously
    while True:
        new_domains = leaked_domains(set(harness_domains()) - domains)
        new_tracers = orphaned_tracers(set(tracer_processes()) - tracers)
        if not (new_domains or new_tracers) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not new_domains, f"the fault left libvirt domains behind: {sorted(new_domains)}"
    assert not new_tracers, f"a tracer process outlived the fault: {sorted(new_tracers)}"


_image: LinuxImage | None = None


def shared_linux_image() -> LinuxImage:
    """The default guest image in the shared cache, built once per session if missing."""
    global _image
    if _image is None:
        _image = build_linux_image(progress=print)
    return _image


def micro_known_answers(data: dict[str, Any]) -> None:
    """A micro-kvm result holds exactly the known per-phase answers (see test_run_micro.py)."""
    from harness.image.micro import MicroPhase, expected_emulated_insns
    from harness.spec import load_suite

    suite = load_suite(MICRO_SUITE)
    workload = suite.workloads["micro-touch"]
    assert data["status"] == "complete", data["errors"]
    assert len(data["runs"]) == suite.spec.repetitions
    for vm in data["vms"]:
        assert vm["accelerator"] == "kvm"
        assert vm["trace"]["tracer_status"] == "ok"
        assert vm["trace"]["lost_events"] == 0
    for run in data["runs"]:
        phases = run["phases"]
        assert [p["name"] for p in phases] == [p.name for p in workload.phases]
        expected = expected_emulated_insns(
            [MicroPhase(s.name, s.pages or 0, s.repeat) for s in workload.phases]
        )
        for k, (p, spec) in enumerate(zip(phases, workload.phases, strict=True), start=1):
            tr = p["trace"]
            assert tr["markers_seen"] == 1 and tr["attribution"] == "guest-marker", tr
            assert tr["emulated_insns"] == expected[k], (spec.name, expected[k], tr)


#: The micro guest, one repetition: a cheap real run (about 6 s) for "the next run works".
MICRO1_SUITE = """\
name = "{name}"
repetitions = 1

[[vms]]
name = "micro"
image = "micro"
vcpus = 1
memory_mib = 16
accelerator = "kvm"
boot_timeout_s = 60

[[runs]]
workload = "micro-touch"
vm = "micro"

[trace]
enabled = true
probes = [{probes}]
"""


def write_micro1_suite(dir_: Path, name: str = "micro1", probes: str = '"default"') -> Path:
    path = dir_ / f"{name}.toml"
    path.write_text(MICRO1_SUITE.format(name=name, probes=probes))
    return path


def next_run_succeeds(tmp_path: Path, cache: Path | None, name: str = "after") -> dict[str, Any]:
    """A short real run on the same host and cache after the fault; returns its result."""
    suite = write_micro1_suite(tmp_path, name)
    results = tmp_path / name
    proc = run_cli("run", str(suite), "--results-dir", str(results), "--quiet", cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = only_result(results)
    assert data["status"] == "complete"
    assert_nothing_left(data["run_id"], cache)
    return data


def stop(proc: subprocess.Popen[str]) -> None:
    """Kill ``proc`` if a failed assertion left it running."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate()
