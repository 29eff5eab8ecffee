"""A hostile guest, through the real CLI on the real Linux guest (TCG here, KVM elsewhere).

One boot runs workloads that misbehave the way a guest the harness does not
control can: flood stdout (to an end, and without end past the phase
timeout), print non-finite and enormous numbers where a metric is expected,
forge phase markers with another run's token, ignore SIGTERM past the
timeout, and try to reach the host's loopback services through 10.0.2.2.
Between them, a check workload counts (``pgrep`` in the guest) what is left
of the earlier ones. Each phase must end with the right status, the run must
go on to its last workload with nothing lost, and the harness's own peak
memory with the flooding guest must stay within 64 MiB of a quiet run's.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import results
from harness.guest.ssh import MARKER_TOOL
from harness.image.linux import LinuxImage
from tests.faults.helpers_b import assert_nothing_left

pytestmark = pytest.mark.integration

MIB = 1 << 20
#: How much more the harness may hold at its peak with a flooding guest than with a quiet one.
RSS_BUDGET = 64 * MIB
#: What a check phase counts: anything left of the flooding or stubborn workloads.
LEFT_PATTERN = "^[y]es$|[s]leep 1000|[d]ev/zero"


def phase(name: str, command: str, timeout_s: float, metrics: tuple[str, ...] = ()) -> str:
    text = f"[[phases]]\nname = {json.dumps(name)}\ncommand = {json.dumps(command)}\n"
    text += f"timeout_s = {timeout_s}\n"
    for m in metrics:
        text += f"\n[[phases.metrics]]\nname = \"{m}\"\nregex = '^{m}=(\\S+)$'\n"
    return text + "\n"


def workload(name: str, *phases: str) -> str:
    return f'name = "{name}"\nguest = "linux"\ndescription = "hostile guest"\n\n' + "".join(
        phases
    )


CHECK = phase(
    "check", f"n=$(pgrep -c -f '{LEFT_PATTERN}'); echo left=$n; test \"$n\" = 0", 60, ("left",)
)


def hostile_workloads(port: int) -> dict[str, str]:
    """Every hostile workload (and the check between them), by name."""
    return {
        # 32 MiB: 16 times what the reader keeps of a stream; figures at both ends.
        "hg-flood-done": workload("hg-flood-done", phase(
            "flood",
            "echo first=7; head -c 32M /dev/zero | tr '\\0' y; echo; echo last=9",
            300, ("first", "last"),
        )),
        "hg-flood-forever": workload(
            "hg-flood-forever", phase("flood", "yes", 5), phase("after", "true", 30)
        ),
        "hg-numbers": workload("hg-numbers", phase(
            "print",
            "echo big=$(printf '9%.0s' $(seq 400)); echo notnum=nan; echo infinite=-inf; "
            "echo huge=1e308; echo fine=5",
            60, ("big", "notnum", "infinite", "huge", "fine"),
        )),
        # Another run's token (and a phase number of no phase of this run).
        "hg-forge": workload(
            "hg-forge",
            phase("forge", f"for p in 1 7 9 0; do {MARKER_TOOL} 4242 $p; done; echo forged=1",
                  60, ("forged",)),
            phase("after", "echo after=1", 60, ("after",)),
        ),
        "hg-stubborn": workload(
            "hg-stubborn",
            phase("stubborn", "trap '' TERM HUP INT; sleep 1000", 3),
            phase("after", "true", 30),
        ),
        "hg-reach": workload("hg-reach", phase(
            "reach",
            # A reachable service answers through the forward at once; a blocked one never
            # does, so a short wait decides it.
            f"if timeout 4 bash -c 'echo x > /dev/tcp/10.0.2.2/{port}'; then echo reached=1; "
            "else echo reached=0; fi",
            60, ("reached",),
        )),
        "hg-check-a": workload("hg-check-a", CHECK),
        "hg-check-b": workload("hg-check-b", CHECK),
        "hg-check-c": workload("hg-check-c", CHECK),
    }  # fmt: skip


HOSTILE_RUNS = (
    "hg-flood-done", "hg-check-a", "hg-flood-forever", "hg-check-b", "hg-numbers",
    "hg-forge", "hg-stubborn", "hg-check-c", "hg-reach",
)  # fmt: skip


def write_suite(dir_: Path, name: str, runs: tuple[str, ...], port: int) -> Path:
    for wname, text in hostile_workloads(port).items():
        (dir_ / f"{wname}.toml").write_text(text)
    body = f'name = "{name}"\nrepetitions = 1\nworkload_dirs = ["."]\n'
    body += (
        '\n[[vms]]\nname = "h"\nimage = "linux"\nvcpus = 1\nmemory_mib = 512\n'
        'accelerator = "auto"\nboot_timeout_s = 120\n'
    )
    for r in runs:
        body += f'\n[[runs]]\nworkload = "{r}"\nvm = "h"\n'
    body += '\n[trace]\nenabled = true\nprobes = ["default"]\n'
    path = dir_ / f"{name}.toml"
    path.write_text(body)
    return path


def vm_hwm_bytes(pid: int) -> int | None:
    """The process's peak resident set (VmHWM), None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def run_measured(suite: Path, results_dir: Path, timeout_s: float) -> tuple[int, str, int]:
    """`harness run SUITE` through the CLI: exit status, stderr, the harness's peak RSS.

    The peak is the harness process's own VmHWM (not its children's: bpftrace
    and QEMU are not the harness's memory), read until just before it exits.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "run", str(suite),
         "--results-dir", str(results_dir), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            hwm = vm_hwm_bytes(proc.pid)
            if hwm is None:
                return
            peak = max(peak, hwm)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the run did not end within {timeout_s:.0f} s: {err[-3000:]}")
    finally:
        stop.set()
        watcher.join()
    return proc.returncode, err, peak


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Overrides the session-wide check of the same name (tests/integration/conftest.py).

    Other sessions run the harness on this host at the same time, so that check
    would count their tracers; this test checks exactly what its own runs left
    (assert_nothing_left by run id).
    """
    yield


@pytest.fixture
def loopback_listener() -> Iterator[tuple[int, list[object]]]:
    """A service on the host's 127.0.0.1 that a guest must not reach; records connections."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    seen: list[object] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                conn, addr = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            seen.append(addr)
            conn.close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], seen
    finally:
        done.set()
        t.join()
        srv.close()


def only_result(results_dir: Path) -> tuple[Path, dict[str, Any]]:
    files = sorted(results_dir.glob("*.json"))
    assert len(files) == 1, files
    return files[0], json.loads(files[0].read_text())


def runs_by_workload(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["workload"]: r for r in data["runs"]}


def assert_checked_clean(run: dict[str, Any]) -> None:
    """A check workload found nothing left of the workloads before it."""
    (check,) = run["phases"]
    assert (check["status"], check["metrics"]) == ("ok", {"left": 0.0}), check


@pytest.mark.timeout(900)
def test_hostile_guest_cannot_stall_flood_or_fool_the_harness(
    tmp_path: Path,
    linux_image: LinuxImage,
    loopback_listener: tuple[int, list[object]],
) -> None:
    port, seen = loopback_listener
    quiet_dir, hostile_dir = tmp_path / "quiet", tmp_path / "hostile"
    quiet_dir.mkdir()
    hostile_dir.mkdir()

    # A quiet run of the same VM and tracer: the baseline of the harness's own memory.
    quiet = write_suite(quiet_dir, "hg-quiet", ("hg-check-a",), port)
    code, err, quiet_peak = run_measured(quiet, quiet_dir / "results", 300)
    assert code == 0, err[-3000:]
    assert_nothing_left(only_result(quiet_dir / "results")[1]["run_id"])

    suite = write_suite(hostile_dir, "hg-hostile", HOSTILE_RUNS, port)
    code, err, hostile_peak = run_measured(suite, hostile_dir / "results", 700)
    print(
        f"harness peak RSS (VmHWM): quiet run {quiet_peak / MIB:.1f} MiB, flooding guest "
        f"{hostile_peak / MIB:.1f} MiB, difference {(hostile_peak - quiet_peak) / MIB:+.1f} MiB"
    )
    assert code == 1, err[-3000:]  # two phases timed out: the run is "failed", not broken
    path, data = only_result(hostile_dir / "results")
    results.load(path)  # the strict loader (compare, stacks, the reaper) reads it back
    assert data["status"] == "failed"
    runs = runs_by_workload(data)
    # Nothing lost: every workload ran, in order, on the one boot.
    assert [r["workload"] for r in data["runs"]] == list(HOSTILE_RUNS)
    assert all(r["status"] != "skipped" for r in data["runs"]), data["runs"]
    assert data["vms"][0]["ended_early"] is None, data["vms"][0]
    assert all(r["phases"] for r in data["runs"])

    # (a) A flood that ends: ok, figures at both ends found, what was dropped said.
    (flood,) = runs["hg-flood-done"]["phases"]
    assert flood["status"] == "ok", flood
    assert flood["metrics"] == {"first": 7.0, "last": 9.0}
    assert "bytes; kept the first 1048576 and the last 1048576, dropped" in flood["stdout_tail"]
    assert_checked_clean(runs["hg-check-a"])

    # (a) A flood without end: a timeout on time, the dropped bytes said, its group killed.
    forever = runs["hg-flood-forever"]
    assert forever["status"] == "failed" and forever["not_run"] == ["after"]
    (flood,) = forever["phases"]
    assert flood["status"] == "timeout", flood
    assert "timed out after 5 s" in flood["error"] and "dropped" in flood["error"]
    # `yes` may already have died of SIGPIPE when the channel closed: 0 or 1 groups left.
    assert re.search(r"killed [01] process group\(s\)", flood["error"]), flood["error"]
    assert 5.0 <= flood["duration_s"] < 20, flood["duration_s"]
    assert_checked_clean(runs["hg-check-b"])

    # (b) Non-finite and enormous numbers: recorded as missing, never as a number or null.
    (numbers,) = runs["hg-numbers"]["phases"]
    assert numbers["status"] == "ok", numbers
    assert numbers["metrics"] == {"fine": 5.0}
    assert set(numbers["metrics_missing"]) == {"big", "notnum", "infinite", "huge"}
    if "metric_problems" in numbers:
        assert "not a finite number" in numbers["metric_problems"]["notnum"]
        assert "longer than" in numbers["metric_problems"]["big"]

    # (c) Forged markers: the phase and the next one are this run's, whole and in order.
    forge = runs["hg-forge"]
    assert [p["status"] for p in forge["phases"]] == ["ok", "ok"], forge
    assert [p["metrics"] for p in forge["phases"]] == [{"forged": 1.0}, {"after": 1.0}]
    indices = [p["index"] for r in data["runs"] for p in r["phases"]]
    assert indices == sorted(set(indices)), "phase numbers are this run's own, once each"
    assert all(p["trace"] is not None for r in data["runs"] for p in r["phases"])

    # (d) SIGTERM (and HUP, INT) ignored: killed with its group after its timeout.
    stubborn = runs["hg-stubborn"]
    (held,) = stubborn["phases"]
    assert held["status"] == "timeout" and stubborn["not_run"] == ["after"]
    assert "killed 1 process group(s)" in held["error"], held["error"]
    assert_checked_clean(runs["hg-check-c"])

    # No way out to the host's loopback services; SSH in (the forward) worked throughout.
    (reach,) = runs["hg-reach"]["phases"]
    assert (reach["status"], reach["metrics"]) == ("ok", {"reached": 0.0}), reach
    assert seen == [], f"the guest reached a host loopback service: {seen}"

    assert hostile_peak - quiet_peak < RSS_BUDGET, (
        f"harness peak RSS grew {(hostile_peak - quiet_peak) / MIB:.1f} MiB with a "
        f"flooding guest ({quiet_peak / MIB:.1f} -> {hostile_peak / MIB:.1f} MiB)"
    )
    assert_nothing_left(data["run_id"])
