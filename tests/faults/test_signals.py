"""SIGINT, SIGTERM and SIGKILL of a real `harness run` during boot, tracer start and
image build (and SIGTERM of `harness image build`).

Already covered elsewhere, and not repeated here: SIGINT and SIGTERM during a
Linux guest's phase (tests/integration/test_run_linux.py::
test_signal_mid_workload_leaves_nothing_and_keeps_finished_phases), SIGKILL
during a phase (test_run_linux.py::test_sigkilled_run_is_cleaned_by_libvirt_and_
reaped_by_the_next), SIGINT of a group of VMs mid-phase (tests/integration/
test_concurrent.py) and SIGTERM with a host configuration applied
(tests/integration/test_host_config_run.py).

The moment of each signal is observed, not slept for: "during boot" is after
the run's domain exists and before SSH answered (the result then has no
boot_to_ready_s), "during tracer start" is after the run's bpftrace process
exists and before the tracer was ready (the result then has no trace summary:
bpftrace takes over a second to attach every probe), "during image build" is
while debootstrap fills the staging directory of a private, empty cache.

What the harness promises: SIGINT/SIGTERM exit 130/143 with the result file
valid and saying ``incomplete`` and why, nothing left (domain, QEMU, overlay,
bpftrace, run directory, staging directory, build processes, mounts);
SIGKILL leaves only the run directory (libvirt's AUTODESTROY takes the
domain, PDEATHSIG the tracer and build commands), which the next run reaps,
marking the result ``killed``; the image cache never serves a partial build.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.image import cache as image_cache
from harness.image.linux import IMAGE_NAME, cached_linux_image, recipe_digest
from tests.faults.helpers_a import (
    assert_nothing_left,
    finish,
    first_result,
    mounts_under,
    next_run_succeeds,
    nothing_left_behind_by_fault,  # noqa: F401  (fair on a shared host; see helpers_a)
    only_result,
    private_cache,
    processes_under,
    run_domains,
    run_tracers,
    shared_linux_image,
    start_cli,
    stop,
    wait_for,
    write_linux_suite,
    write_micro1_suite,
)

pytestmark = pytest.mark.integration

SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]


@pytest.fixture
def cache_with_image() -> Iterator[Path]:
    """A private cache that uses the shared Linux image (built first if missing)."""
    shared_linux_image()
    with private_cache(share_images=True) as root:
        yield root


@pytest.fixture
def empty_cache() -> Iterator[Path]:
    """A private cache with no image: a Linux run there builds one."""
    with private_cache(share_images=False) as root:
        yield root


def check_interrupted(
    done_rc: int, stderr: str, results: Path, sig: signal.Signals
) -> dict[str, object]:
    """The result of a run stopped by ``sig``: valid, and saying what happened."""
    data = only_result(results)
    if sig == signal.SIGKILL:
        assert done_rc == -signal.SIGKILL
        assert data["status"] == "running"  # no handler runs: it never got to say otherwise
    else:
        assert done_rc == 128 + sig, stderr[-3000:]
        assert "cleaned up; the partial result was kept" in stderr
        assert data["status"] == "incomplete"
        assert f"interrupted by {sig.name} before the suite finished" in data["errors"]
    return data


def check_next_run(tmp_path: Path, cache: Path, run_id: str, sig: signal.Signals) -> None:
    """The next run on the same cache works; after a SIGKILL it reaps and records the dead run."""
    after = next_run_succeeds(tmp_path, cache)
    run_dir = cache / "runs" / run_id
    if sig == signal.SIGKILL:
        assert f"reaped leftover of a killed run: run directory {run_dir}" in after["notes"]
        killed = only_result(tmp_path / "results")
        assert killed["status"] == "killed"
        assert str(killed["errors"][-1]).startswith("killed: its harness process")  # type: ignore[index]
    assert not run_dir.exists()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", SIGNALS, ids=[s.name for s in SIGNALS])
def test_signal_during_boot(tmp_path: Path, cache_with_image: Path, sig: signal.Signals) -> None:
    cache = cache_with_image
    suite = write_linux_suite(tmp_path)
    results = tmp_path / "results"
    proc = start_cli("run", str(suite), "--results-dir", str(results), "--quiet", cache=cache)
    try:
        run_id = wait_for(lambda: first_result(results), 60, "the result file", proc=proc)["run_id"]
        wait_for(lambda: run_domains(run_id), 60, "the run's domain to start", proc=proc)
        proc.send_signal(sig)
        done = finish(proc, 60)
    finally:
        stop(proc)
    data = check_interrupted(done.returncode, done.stderr, results, sig)
    # It was booting: SSH had not answered, no workload had started.
    for vm in data["vms"]:  # type: ignore[attr-defined]
        assert vm["boot_to_ready_s"] is None
    assert not [p for r in data["runs"] for p in r["phases"]]  # type: ignore[attr-defined]
    assert_nothing_left(run_id, cache, run_dir_kept=sig == signal.SIGKILL)
    check_next_run(tmp_path, cache, run_id, sig)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", SIGNALS, ids=[s.name for s in SIGNALS])
def test_signal_during_tracer_start(
    tmp_path: Path, empty_cache: Path, sig: signal.Signals
) -> None:
    cache = empty_cache  # the micro guest needs no image cache
    # Every probe: bpftrace needs well over a second to attach them all.
    suite = write_micro1_suite(tmp_path, "traced", probes='"all"')
    results = tmp_path / "results"
    proc = start_cli("run", str(suite), "--results-dir", str(results), "--quiet", cache=cache)
    try:
        run_id = wait_for(lambda: first_result(results), 60, "the result file", proc=proc)["run_id"]
        wait_for(
            lambda: run_tracers(run_id), 60, "the run's tracer to start", poll=0.02, proc=proc
        )
        proc.send_signal(sig)
        sent = time.monotonic()
        done = finish(proc, 60)
    finally:
        stop(proc)
    print(f"\n{sig.name} during tracer start: harness gone {time.monotonic() - sent:.1f} s later")
    data = check_interrupted(done.returncode, done.stderr, results, sig)
    # The tracer never became ready: no VM got its summary, no phase ran.
    for vm in data["vms"]:  # type: ignore[attr-defined]
        assert vm["trace"] is None, vm["trace"]
    assert not [p for r in data["runs"] for p in r["phases"]]  # type: ignore[attr-defined]
    assert_nothing_left(run_id, cache, run_dir_kept=sig == signal.SIGKILL)
    check_next_run(tmp_path, cache, run_id, sig)


def staging_dirs(cache: Path) -> list[Path]:
    return sorted((cache / "images").glob(f".{IMAGE_NAME}-*.staging-*"))


def debootstrap_running(cache: Path) -> bool:
    """debootstrap has begun filling the staging directory (downloads, unpacking)."""
    return any((d / "rootfs").is_dir() for d in staging_dirs(cache)) and any(
        "debootstrap" in p for p in processes_under(cache)
    )


def check_no_partial_image(cache: Path) -> None:
    """Nothing of the build is served, runs or stays mounted."""
    assert image_cache.lookup(IMAGE_NAME, recipe_digest(), cache) is None
    assert cached_linux_image(cache) is None
    assert not [d for d in (cache / "images").iterdir() if d.name.startswith(f"{IMAGE_NAME}-")]
    assert wait_for(lambda: not processes_under(cache), 30, "build commands to exit") is True
    assert not mounts_under(cache)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", SIGNALS, ids=[s.name for s in SIGNALS])
def test_signal_during_image_build(tmp_path: Path, empty_cache: Path, sig: signal.Signals) -> None:
    cache = empty_cache
    suite = write_linux_suite(tmp_path)
    results = tmp_path / "results"
    proc = start_cli("run", str(suite), "--results-dir", str(results), "--quiet", cache=cache)
    try:
        run_id = wait_for(lambda: first_result(results), 60, "the result file", proc=proc)["run_id"]
        wait_for(lambda: debootstrap_running(cache), 60, "debootstrap to start", proc=proc)
        time.sleep(1)  # any moment of the build will do; this one is inside debootstrap
        assert debootstrap_running(cache)
        proc.send_signal(sig)
        sent = time.monotonic()
        done = finish(proc, 60)
    finally:
        stop(proc)
    print(f"\n{sig.name} during image build: harness gone {time.monotonic() - sent:.1f} s later")
    data = check_interrupted(done.returncode, done.stderr, results, sig)
    assert not data["vms"] or all(  # type: ignore[attr-defined]
        vm["boot_to_ready_s"] is None for vm in data["vms"]  # type: ignore[attr-defined]
    )
    check_no_partial_image(cache)
    if sig == signal.SIGKILL:
        # The killed build's staging directory is the leftover; the next build removes it.
        (stale,) = staging_dirs(cache)
        digest = recipe_digest()
        with (
            pytest.raises(RuntimeError, match="stand-in"),
            image_cache.entry_lock(IMAGE_NAME, digest, cache),
            image_cache.staging(IMAGE_NAME, digest, cache),
        ):
            assert not stale.exists(), "the next build removes a dead build's staging directory"
            raise RuntimeError("stand-in for the rest of the build")
    assert not staging_dirs(cache)
    check_no_partial_image(cache)
    assert_nothing_left(run_id, cache, run_dir_kept=sig == signal.SIGKILL)
    check_next_run(tmp_path, cache, run_id, sig)


@pytest.mark.timeout(120)
def test_sigterm_of_image_build_command(tmp_path: Path, empty_cache: Path) -> None:
    """`harness image build` unwinds on SIGTERM too: no staging directory, no debootstrap."""
    cache = empty_cache
    proc = start_cli("image", "build", "linux", cache=cache)
    try:
        wait_for(lambda: debootstrap_running(cache), 60, "debootstrap to start", proc=proc)
        time.sleep(1)
        assert debootstrap_running(cache)
        proc.send_signal(signal.SIGTERM)
        done = finish(proc, 60)
    finally:
        stop(proc)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert "interrupted by SIGTERM: the partial build was removed" in done.stderr
    assert not staging_dirs(cache)
    check_no_partial_image(cache)
