"""Two `harness run` on one host at the same time, sharing one cache directory.

There is no host lock, and none is needed: every name a run makes carries
its own run id (domain ``kvmh-<run-id>-<vm>``, run directory
``runs/<run-id>/``, result ``<run-id>.json``), each bpftrace program is
filtered by its own QEMU pids and answers dumps of its own random session,
each Linux guest gets a port that is free when it starts, and a run's reaper
spares the directories and domains of a run whose process is alive.

Both runs must complete with exactly the answers they give alone (the micro
guest: every marker seen once, emulated instructions equal to the phase's
loop count, see tests/integration/test_run_micro.py), with nothing of one
in the other's result.

Host markers and dump requests count only from the process that placed
the tracer, so the two runs' tracers ignore each other's (also with equal
tokens or sessions); the asserts on distinct tokens and sessions below check
that the random choices did not collide in this instance. A forward's port
taken by the other run between its choice and QEMU's bind makes QEMU refuse
to start; the harness then takes another port (last test).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.image.linux import LinuxImage
from harness.paths import cache_dir
from harness.vm import configs, lifecycle
from tests.faults.helpers_a import (
    MICRO_SUITE,
    assert_nothing_left,
    finish,
    first_result,
    micro_known_answers,
    nothing_left_behind_by_fault,  # noqa: F401  (fair on a shared host; see helpers_a)
    only_result,
    private_cache,
    qemu_processes,
    run_domains,
    run_tracers,
    shared_linux_image,
    start_cli,
    stop,
    wait_for,
    write_linux_suite,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def shared_image() -> LinuxImage:
    return shared_linux_image()


@pytest.fixture
def cache() -> Iterator[Path]:
    shared_linux_image()
    with private_cache(share_images=True) as root:
        yield root


def run_ids(results: list[Path]) -> list[str]:
    """The run id of each run, once its first save is there."""
    return [
        wait_for(lambda r=r: first_result(r), 60, f"a result in {r}")["run_id"] for r in results
    ]


def sessions(cache: Path, run_id: str) -> set[int]:
    """The dump sessions of this run's tracer programs (in its run directory)."""
    found = set()
    for prog in (cache / "runs" / run_id).glob("trace-*/trace.*"):  # trace.bt or trace.cfg
        try:
            text = prog.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        m = re.search(r"^(?:// Dump session|session) (\d+)$", text, re.MULTILINE)
        if m:
            found.add(int(m.group(1)))
    return found


def check_apart(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Nothing of one run is in the other's result."""
    assert a["run_id"] != b["run_id"]
    for x, y in ((a, b), (b, a)):
        assert all(x["run_id"] in vm["domain"] for vm in x["vms"])
        assert not any(y["run_id"] in vm["domain"] for vm in x["vms"])
        assert not [n for n in x["notes"] if "reaped" in n], x["notes"]  # spared each other
    pids = [vm["qemu_pid"] for r in (a, b) for vm in r["vms"]]
    assert len(set(pids)) == len(pids)
    tokens = [vm["marker_token"] for r in (a, b) for vm in r["vms"]]
    assert len(set(tokens)) == len(tokens), f"marker tokens collided across runs: {tokens}"


@pytest.mark.timeout(180)
def test_two_micro_runs_at_once(tmp_path: Path, cache: Path) -> None:
    results = [tmp_path / "a", tmp_path / "b"]
    procs = [
        start_cli("run", str(MICRO_SUITE), "--results-dir", str(r), "--quiet", cache=cache)
        for r in results
    ]
    try:
        ids = run_ids(results)
        # Both tracers run at once: collect their sessions while their programs exist.
        seen: dict[str, set[int]] = {i: set() for i in ids}

        def both_traced() -> bool:
            live = all(run_tracers(i) for i in ids)
            for i in ids:  # read after: a running tracer's program file is there
                seen[i] |= sessions(cache, i)
            return live and all(seen.values())

        wait_for(both_traced, 90, "both runs' tracers at the same time")
        done = [finish(p, 120) for p in procs]
    finally:
        for p in procs:
            stop(p)
    for d in done:
        assert d.returncode == 0, d.stderr[-3000:]
    a, b = (only_result(r) for r in results)
    micro_known_answers(a)
    micro_known_answers(b)
    check_apart(a, b)
    sa, sb = seen[ids[0]], seen[ids[1]]
    assert sa and sb and not sa & sb, f"tracer dump sessions collided: {sa} {sb}"
    for r in (a, b):
        assert_nothing_left(r["run_id"], cache)


HOSTFWD = re.compile(r"hostfwd=tcp:127\.0\.0\.1:(\d+)-:22")


@pytest.mark.timeout(240)
def test_two_linux_runs_at_once(tmp_path: Path, cache: Path) -> None:
    suites = [write_linux_suite(tmp_path, f"two-{n}", mib=16) for n in "ab"]
    results = [tmp_path / "a", tmp_path / "b"]
    procs = [
        start_cli("run", str(s), "--results-dir", str(r), "--quiet", cache=cache)
        for s, r in zip(suites, results, strict=True)
    ]
    try:
        ids = run_ids(results)
        ports: dict[str, set[int]] = {i: set() for i in ids}

        def both_up() -> bool:
            for i in ids:
                for line in qemu_processes(i):
                    ports[i] |= {int(p) for p in HOSTFWD.findall(line)}
            return all(run_domains(i) for i in ids) and all(ports.values())

        wait_for(both_up, 120, "both runs' guests at the same time", poll=0.2)
        done = [finish(p, 200) for p in procs]
    finally:
        for p in procs:
            stop(p)
    for d in done:
        assert d.returncode == 0, d.stderr[-3000:]
    a, b = (only_result(r) for r in results)
    for r in (a, b):
        assert r["status"] == "complete", r["errors"]
        (vm,) = r["vms"]
        assert vm["trace"]["tracer_status"] == "ok"
        phase = r["runs"][0]["phases"][0]
        assert phase["status"] == "ok" and phase["metrics"]["first_touch_mib_per_s"] > 0
        assert phase["trace"] is not None
    check_apart(a, b)
    pa, pb = ports[ids[0]], ports[ids[1]]
    assert len(pa) == len(pb) == 1 and not pa & pb, f"SSH forwards collided: {pa} {pb}"
    for r in (a, b):
        assert_nothing_left(r["run_id"], cache)


def test_a_taken_forward_port_is_replaced(shared_image: LinuxImage) -> None:
    """The port chosen for the SSH forward is bound by somebody else when QEMU starts
    (another run took it in between): the domain starts on another port, QEMU listens
    there, and any other start error is raised unchanged."""
    work = Path(tempfile.mkdtemp(prefix="port-", dir=cache_dir()))  # QEMU must reach it
    work.chmod(0o755)
    with contextlib.ExitStack() as cleanup, socket.socket() as squatter:
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        overlay = work / "port.qcow2"
        lifecycle.create_overlay(shared_image.disk, overlay)
        cfg = configs.linux_config(
            name=f"{lifecycle.DOMAIN_PREFIX}test-port-{os.getpid()}",
            accelerator="tcg",
            memory_mib=256,
            vcpus=1,
            kernel=shared_image.kernel,
            initrd=shared_image.initrd,
            cmdline=shared_image.cmdline,
            overlay=overlay,
            console_log=work / "port.log",
            ssh_port=taken,
        )
        given: list[int] = []

        def port() -> int:
            given.append(lifecycle.free_port())
            return given[-1]

        conn = lifecycle.connect()
        try:
            vm = lifecycle.start_forwarded(conn, cfg, port, paused=True)
            try:
                assert given and vm.ssh_port == given[-1] != taken, (given, vm.ssh_port)
                assert f"127.0.0.1:{vm.ssh_port}-:22" in " ".join(qemu_cmdline(vm.pid))
                socket.create_connection(("127.0.0.1", vm.ssh_port), timeout=5).close()
            finally:
                lifecycle.destroy(vm)
            given.clear()
            broken = dataclasses.replace(
                cfg, ssh_port=lifecycle.free_port(),
                boot=dataclasses.replace(cfg.boot, kernel=work / "no-such-kernel"),
            )
            with pytest.raises(lifecycle.VmError, match="libvirt refused to start") as exc:
                lifecycle.start_forwarded(conn, broken, port, paused=True)
            assert lifecycle.PORT_TAKEN not in str(exc.value) and not given
        finally:
            conn.close()


def qemu_cmdline(pid: int) -> list[str]:
    """A live process's argv."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
