"""The catalogue's guest programs, compiled and run on the host: output, known answers, usage.

The same sources are built into the guest image; the integration tests check
the answers again inside the real guest, where the counters are quieter.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import paths

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def build(tmp_path: Path, name: str) -> str:
    out = tmp_path / name
    src = paths.GUEST_TOOLS_DIR / f"{name}.c"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(out), str(src)], check=True)
    return str(out)


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)


def fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


def test_page_touch_hold_and_resume_split_the_passes(tmp_path: Path) -> None:
    tool = build(tmp_path, "page-touch")
    held = tmp_path / "held"
    first = run(tool, "--mib", "8", "--passes", "3", "--backing", "tmpfs", "--hold", str(held))
    assert first.returncode == 0, first.stderr
    (line,) = first.stdout.splitlines()
    f = fields(line)
    assert (f["pass"], f["kind"], f["pages"]) == ("1", "first-touch", str(8 * 256))
    # Every 4 KiB shmem page faulted once in this process (and the host's vmstat saw them).
    assert 8 * 256 <= int(f["minflt"]) <= 8 * 256 + 8
    assert int(f["pgfault"]) >= int(f["minflt"])
    assert held.is_dir()
    again = run(tool, "--resume", str(held))
    assert again.returncode == 0, again.stderr
    lines = again.stdout.splitlines()
    assert [fields(x)["pass"] for x in lines] == ["2", "3"]
    assert all(fields(x)["kind"] == "retouch" and int(fields(x)["minflt"]) <= 8 for x in lines)
    assert not held.exists(), "resume removes the holder's directory"
    # Nobody holds it any more: a second resume fails instead of hanging.
    gone = run(tool, "--resume", str(held))
    assert gone.returncode == 1 and "no holder waiting" in gone.stderr


def test_page_touch_rejects_bad_backing_and_odd_hugetlb_size(tmp_path: Path) -> None:
    tool = build(tmp_path, "page-touch")
    for args in (["--mib", "2", "--backing", "disk"], ["--mib", "3", "--backing", "hugetlbfs"],
                 ["--mib", "2", "--hold"], ["--resume"]):  # fmt: skip
        bad = run(tool, *args)
        assert bad.returncode == 2, args
        assert "usage: page-touch" in bad.stderr


def test_membw_reports_four_kernels_and_checks_its_arrays(tmp_path: Path) -> None:
    tool = build(tmp_path, "membw")
    proc = run(tool, "--mib", "4", "--times", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    kernels = [fields(x) for x in lines[:4]]
    assert [k["kernel"] for k in kernels] == ["copy", "scale", "add", "triad"]
    elems = 4 * 2**20 // 8
    # STREAM's byte counts: two arrays for copy and scale, three for add and triad.
    assert [int(k["bytes"]) for k in kernels] == [16 * elems, 16 * elems, 24 * elems, 24 * elems]
    assert all(float(k["mb_per_s"]) > 0 for k in kernels)
    check = fields(lines[4])
    assert check["check"] == "ok" and int(check["elements"]) == elems
    assert run(tool, "--mib", "4", "--times", "1").returncode == 2


def test_fork_storm_counts_its_forks_in_proc_stat(tmp_path: Path) -> None:
    tool = build(tmp_path, "fork-storm")
    proc = run(tool, "--procs", "300", "--parallel", "2", "--touch-kib", "16")
    assert proc.returncode == 0, proc.stderr
    f = fields(proc.stdout)
    assert int(f["procs"]) == 300 and int(f["failed"]) == 0
    assert int(f["forks_counted"]) >= 300  # the host's own /proc/stat agrees
    assert float(f["procs_per_s"]) > 0
    assert run(tool, "--procs", "0").returncode == 2


def test_mmap_churn_counts_ops_and_faults(tmp_path: Path) -> None:
    tool = build(tmp_path, "mmap-churn")
    proc = run(tool, "--threads", "2", "--iterations", "300", "--kib", "32")
    assert proc.returncode == 0, proc.stderr
    f = fields(proc.stdout)
    assert int(f["ops"]) == 3 * 2 * 300 and int(f["failed"]) == 0
    assert int(f["expected_faults"]) == 2 * 300 * 8
    assert int(f["pgfault"]) >= int(f["expected_faults"])
    assert run(tool, "--threads", "2", "--iterations", "1", "--kib", "6").returncode == 2
