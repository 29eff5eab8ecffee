"""The results directory's file system fills up during a real run.

The results directory is a small tmpfs of the test's own. The run starts
with room (its first save, right after it claimed its run directory,
succeeds); as soon as that file exists the test fills the file system to the
last byte, so the run's next save (the tracer's summary, or a phase) fails
with ENOSPC.

What the harness promises: the run stops with a non-zero exit and a message
naming the result file and ENOSPC; the file keeps its last complete version
byte for byte (write_atomic: a temporary file renamed over it, removed when
the write fails); no temporary file, domain, QEMU or bpftrace is left. The
run directory stays, with a note of why (``save-error``), because the file
still says ``running``: the next run, once there is room, reaps it and
records in that file that the run failed and why.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.helpers_a import (
    assert_nothing_left,
    finish,
    first_result,
    next_run_succeeds,
    nothing_left_behind_by_fault,  # noqa: F401  (fair on a shared host; see helpers_a)
    only_result,
    private_cache,
    result_files,
    start_cli,
    stop,
    wait_for,
    write_micro1_suite,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "results"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0755", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(fs: Path) -> Path:
    """Write a filler file until the file system has no byte left."""
    filler = fs / "filler"
    with filler.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@pytest.mark.timeout(120)
def test_results_disk_full_mid_run(tmp_path: Path, small_fs: Path) -> None:
    with private_cache(share_images=False) as cache:
        suite = write_micro1_suite(tmp_path, "full")
        proc = start_cli("run", str(suite), "--results-dir", str(small_fs), "--quiet",
                         cache=cache)
        try:
            wait_for(lambda: first_result(small_fs), 60, "the first save", poll=0.01, proc=proc)
            filler = fill(small_fs)
            (path,) = result_files(small_fs)
            good = path.read_bytes()  # the last complete version: nothing more can be written
            done = finish(proc, 90)
        finally:
            stop(proc)
        assert done.returncode == 1, done.stderr[-3000:]
        assert "No space left on device (ENOSPC)" in done.stderr, done.stderr
        assert f"cannot write the result file {path}" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        assert path.read_bytes() == good, "the last good result file must stay as it was"
        data = only_result(small_fs)  # valid JSON, valid against the schema
        run_id = data["run_id"]
        assert data["status"] == "running"  # what it was when the disk filled
        assert sorted(p.name for p in small_fs.iterdir()) == sorted([path.name, "filler"])
        assert_nothing_left(run_id, cache, run_dir_kept=True)
        assert "ENOSPC" in (cache / "runs" / run_id / "save-error").read_text()

        # Room again: the next run reaps the run directory and says in the file what happened.
        filler.unlink()
        after = next_run_succeeds(tmp_path, cache)
        assert any(f"run directory {cache / 'runs' / run_id}" in n for n in after["notes"])
        data = only_result(small_fs)
        assert data["status"] == "failed"
        assert data["errors"][-1].startswith("failed: its harness process")
        assert "could not write this file" in data["errors"][-1]
        assert "ENOSPC" in data["errors"][-1]
        assert not (cache / "runs" / run_id).exists()
