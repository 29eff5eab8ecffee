"""Host load while a run measures (harness/host/load.py): parsing and the accounting of
CPU time used outside the run, on a fake /proc tree (a double of the kernel's files, in
the kernel's own formats) and on the real one."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from harness.host import load

STAT = "cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 0 0 1 0 0 0 0 0 0\n"


def fake_proc(root: Path, busy: int, idle: int, procs: dict[int, tuple[int, int]]) -> Path:
    """A /proc double: /proc/stat's cpu line and /proc/PID/stat of each process."""
    root.mkdir(exist_ok=True)
    (root / "stat").write_text(STAT.format(busy=busy, idle=idle))
    (root / "loadavg").write_text("0.50 0.40 0.30 1/100 12345\n")
    for pid, (start, cpu) in procs.items():
        d = root / str(pid)
        d.mkdir(exist_ok=True)
        # comm with a space and a parenthesis, as the kernel allows
        fields = ["S", "1"] + ["0"] * 9 + [str(cpu), "0"] + ["0"] * 6 + [str(start)]
        (d / "stat").write_text(f"{pid} (qemu (x) 1) " + " ".join(fields) + "\n")
        (d / "comm").write_text("qemu-system-x86\n")
    return root


def test_parsers_read_the_kernels_formats(tmp_path: Path) -> None:
    assert load.busy_jiffies("cpu  10 1 2 100 5 3 4 6 0 0\n") == (26, 131)
    proc = fake_proc(tmp_path / "proc", 0, 0, {42: (777, 55)})
    assert load.process_jiffies(42, proc) == (777, 55)
    assert load.process_jiffies(43, proc) is None
    assert load.loadavg(proc) == [0.5, 0.4, 0.3]
    with pytest.raises(ValueError):
        load.busy_jiffies("intr 1 2 3\n")


def test_other_share_is_busy_time_minus_the_runs_own(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", busy=100, idle=100, procs={42: (9, 10)})
    sampler = load.LoadSampler(lambda: {42}, proc=proc)
    first = (load.busy_jiffies((proc / "stat").read_text()), sampler._ours())
    # 100 jiffies pass: 60 busy, of which the run's QEMU (pid 42) used 20.
    fake_proc(proc, busy=160, idle=140, procs={42: (9, 30)})
    sampler.sample_once(first)
    got = sampler.stop()
    assert got.other_cpu_share == pytest.approx(0.40) and got.busy
    assert got.other_vms == ["pid 42: qemu-system-x86"]


def test_an_interval_in_which_a_run_process_came_or_went_is_left_out(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", busy=100, idle=100, procs={42: (9, 10)})
    sampler = load.LoadSampler(lambda: {42, 43}, proc=proc)
    first = (load.busy_jiffies((proc / "stat").read_text()), sampler._ours())
    fake_proc(proc, busy=200, idle=100, procs={42: (9, 10), 43: (50, 90)})  # 43 started
    sampler.sample_once(first)
    assert sampler.stop().other_cpu_share is None


def test_a_pid_reused_by_another_process_is_not_the_same_process(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", busy=100, idle=100, procs={42: (9, 10)})
    sampler = load.LoadSampler(lambda: {42}, proc=proc)
    first = (load.busy_jiffies((proc / "stat").read_text()), sampler._ours())
    fake_proc(proc, busy=150, idle=150, procs={42: (10_000, 0)})  # new start time
    sampler.sample_once(first)
    assert sampler.stop().other_cpu_share is None


def test_a_busy_process_outside_the_run_is_seen_on_the_real_host() -> None:
    """Real /proc: a busy loop detached from this process tree (its parent exits, so it
    is no descendant of the run) is other CPU time: at least most of one CPU's share."""
    out = subprocess.run(["sh", "-c", "sh -c 'while :; do :; done' >/dev/null 2>&1 & echo $!"],
                         capture_output=True, text=True, check=True)
    hog = int(out.stdout.strip())
    try:
        assert hog not in load.descendants(os.getpid())
        sampler = load.LoadSampler(lambda: set()).start()
        time.sleep(4.5)
        got = sampler.stop()
    finally:
        os.kill(hog, 9)
    assert got.sampled_s >= 2 and got.other_cpu_share is not None
    assert got.other_cpu_share >= 0.7 / (os.cpu_count() or 1), got
