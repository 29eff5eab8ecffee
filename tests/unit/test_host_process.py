"""harness.host.process: liveness, and children that die with their thread (real processes)."""

from __future__ import annotations

import os
import subprocess
import threading
import time

from harness.host.process import die_with_parent, pid_alive


def test_pid_alive_of_self_and_of_a_reaped_child() -> None:
    assert pid_alive(os.getpid())
    child = subprocess.Popen(["true"])
    child.wait()
    assert not pid_alive(child.pid)


def test_a_child_dies_when_the_thread_that_started_it_ends() -> None:
    started: list[subprocess.Popen[bytes]] = []
    t = threading.Thread(
        target=lambda: started.append(subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent))
    )
    t.start()
    t.join()
    (child,) = started
    try:
        deadline = time.monotonic() + 10
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert child.returncode == -9, "PDEATHSIG (SIGKILL) when the forking thread exited"
    finally:
        child.kill()
        child.wait()


def test_without_it_the_child_outlives_its_thread() -> None:
    """The control: the same child without die_with_parent keeps running."""
    started: list[subprocess.Popen[bytes]] = []
    t = threading.Thread(target=lambda: started.append(subprocess.Popen(["sleep", "60"])))
    t.start()
    t.join()
    (child,) = started
    try:
        time.sleep(0.3)
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()
