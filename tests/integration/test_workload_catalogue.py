"""Every Linux workload of the catalogue, briefly, in one real TCG guest.

Each workload's phases run through the harness's own phase path
(`run_linux_phase`: guest markers around the rendered command, metrics
parsed by the workload's regexes) on one booted guest shared by the module.
Known answers come from each workload's definition (pages = MiB * 256 for
4 KiB pages, MiB / 2 for 2 MiB pages, 3 ops per loop, ...) and are checked
against the guest's own counters (/proc/vmstat, /proc/stat, /proc/meminfo,
DBSIZE), which the guest programs print and the regexes record.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.image.linux import LinuxImage
from harness.paths import WORKLOADS_DIR
from harness.platform.linux import run_linux_phase
from harness.results import PhaseResult
from harness.spec import ParamValue, load_workload
from harness.trace.program import TraceTarget
from tests.integration.conftest import Booted, booted_guest, write_suite
from tests.integration.test_run_linux import only_result, run_harness

pytestmark = pytest.mark.integration

_phase_numbers = itertools.count(1)
#: page-touch's own faults outside the touched pages in a pass (stack, vDSO): a couple.
OWN = 8
#: Faults by the rest of the guest during a pass (sshd, timers), seen in the guest-wide
#: /proc/vmstat: up to several hundred under TCG, far below the thousands a 4 KiB answer
#: differs by (the exact check is minflt, this process's own faults).
NOISE = 1024


@pytest.fixture(scope="module")
def guest(linux_image: LinuxImage) -> Iterator[Booted]:
    """One TCG guest for the whole catalogue (booting costs more than most workloads)."""
    with booted_guest(linux_image, "catalogue") as booted:
        yield booted


def run_workload(
    booted: Booted, name: str, params: dict[str, ParamValue]
) -> dict[str, PhaseResult]:
    """All phases of workload ``name`` in order; each must succeed with all its metrics."""
    workload = load_workload(WORKLOADS_DIR / f"{name}.toml")
    for key, value in params.items():  # the test's own sizes must be legal values
        assert workload.param_problem(key, value) is None, (key, value)
    merged = {**workload.defaults(), **params}
    target = TraceTarget(vm="catalogue", pid=booted.vm.pid, token=4242)
    phases: dict[str, PhaseResult] = {}
    t0 = time.monotonic()
    for spec in workload.phases:
        phase = run_linux_phase(
            booted.guest, workload, spec, merged, next(_phase_numbers), target, None, lambda: None
        )
        assert phase.status == "ok", (spec.name, phase.error, phase.stderr_tail, phase.stdout_tail)
        assert phase.metrics_missing == [], (spec.name, phase.stdout_tail)
        assert set(phase.metrics) == {m.name for m in spec.metrics}
        for metric, value in phase.metrics.items():
            assert math.isfinite(value) and value >= 0, (spec.name, metric, value)
        phases[spec.name] = phase
    took = time.monotonic() - t0
    print(f"{name}: {took:.1f} s", json.dumps({k: p.metrics for k, p in phases.items()}))
    # One record per phase, in the workload's order.
    assert list(phases) == [p.name for p in workload.phases]
    return phases


MIB = 32


def test_page_touch_4k_faults_once_per_4k_page(guest: Booted) -> None:
    phases = run_workload(guest, "page-touch-4k", {"mib": MIB})
    first, again = phases["first-touch"].metrics, phases["retouch"].metrics
    pages = MIB * 256
    assert pages <= first["minflt"] <= pages + OWN
    assert first["minflt"] <= first["pgfault"] <= first["minflt"] + NOISE
    assert first["thp_fault_alloc"] == 0
    assert again["minflt"] <= OWN and again["pgfault"] <= NOISE
    assert first["mib_per_s"] > 0 and again["mib_per_s"] > 0


def test_page_touch_thp_faults_once_per_2m_page(guest: Booted) -> None:
    phases = run_workload(guest, "page-touch-thp", {"mib": MIB})
    first, again = phases["first-touch"].metrics, phases["retouch"].metrics
    huge = MIB // 2
    assert first["thp_fault_alloc"] == huge, first
    assert first["thp_fault_fallback"] == 0
    assert huge <= first["minflt"] <= huge + OWN
    assert first["minflt"] <= first["pgfault"] <= first["minflt"] + NOISE
    assert again["minflt"] <= OWN and again["pgfault"] <= NOISE


def test_page_touch_tmpfs_faults_once_per_4k_page(guest: Booted) -> None:
    phases = run_workload(guest, "page-touch-tmpfs", {"mib": MIB})
    first, again = phases["first-touch"].metrics, phases["retouch"].metrics
    pages = MIB * 256
    assert pages <= first["minflt"] <= pages + OWN
    assert first["minflt"] <= first["pgfault"] <= first["minflt"] + NOISE
    assert first["thp_fault_alloc"] == 0
    assert again["minflt"] <= OWN and again["pgfault"] <= NOISE


def test_page_touch_hugetlbfs_faults_once_per_2m_page(guest: Booted) -> None:
    phases = run_workload(guest, "page-touch-hugetlbfs", {"mib": MIB})
    first, again = phases["first-touch"].metrics, phases["retouch"].metrics
    huge = MIB // 2
    assert huge <= first["minflt"] <= huge + OWN
    assert first["minflt"] <= first["pgfault"] <= first["minflt"] + NOISE
    assert first["huge_used"] >= huge
    assert first["thp_fault_alloc"] == 0
    assert again["minflt"] <= OWN and again["pgfault"] <= NOISE


def test_membw_four_kernels_and_closed_form_check(guest: Booted) -> None:
    mib = 8
    (stream,) = run_workload(guest, "membw", {"mib": mib, "times": 2}).values()
    for kernel in ("copy", "scale", "add", "triad"):
        assert stream.metrics[f"{kernel}_mb_per_s"] > 0
    assert stream.metrics["checked_elements"] == mib * 2**20 // 8


def test_fork_storm_forks_counted_by_the_guest(guest: Booted) -> None:
    procs = 100
    (fork,) = run_workload(guest, "fork-storm", {"procs": procs, "parallel": 2}).values()
    assert procs <= fork.metrics["forks_counted"] <= procs + 16
    assert fork.metrics["procs_per_s"] > 0


def test_mmap_churn_ops_and_faults(guest: Booted) -> None:
    threads, iterations, kib = 2, 200, 16
    (churn,) = run_workload(
        guest, "mmap-churn", {"threads": threads, "iterations": iterations, "kib": kib}
    ).values()
    assert churn.metrics["ops"] == 3 * threads * iterations
    assert churn.metrics["pgfault"] >= threads * iterations * kib // 4
    assert churn.metrics["ops_per_s"] > 0
    # Two threads of one mm on the guest's two vCPUs: unmapping touched pages needs IPIs.
    assert churn.metrics["tlb_shootdowns"] > 0


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("stress-ng-vm-rw", {"mib": 4, "seconds": 1}),
        ("stress-ng-mmap", {"mib": 4, "seconds": 1}),
        ("stress-ng-madvise", {"seconds": 1}),
        ("stress-ng-userfaultfd", {"mib": 4, "seconds": 1}),
    ],
)
def test_stress_ng_stressor_bogo_ops(guest: Booted, name: str, params: dict[str, int]) -> None:
    (phase,) = run_workload(guest, name, params).values()
    # bogo-ops/s (real time) is bogo-ops over the run's wall time, which is at least
    # `seconds` (stress-ng stops between bogo-ops, after its timeout).
    ops, rate = phase.metrics["bogo_ops"], phase.metrics["bogo_ops_per_s"]
    assert 0 < rate <= 1.1 * ops / params["seconds"]


def test_kv_store_loads_keyspace_and_serves_it(guest: Booted) -> None:
    keys = 2000
    phases = run_workload(
        guest, "kv-store", {"keys": keys, "requests": 2000, "clients": 4, "value_bytes": 128}
    )
    setup, steady = phases["setup"].metrics, phases["steady"].metrics
    assert setup["keys"] == keys
    assert setup["used_memory"] > keys * 128
    assert steady["keys_after"] == keys  # SET -r keys only overwrote the same names
    for op in ("set", "get"):
        assert steady[f"{op}_ops_per_s"] > 0
        assert 0 <= steady[f"{op}_p50_ms"] <= steady[f"{op}_p99_ms"]
    assert phases["teardown"].exit_status == 0


def test_run_with_set_override_end_to_end(tmp_path: Path, linux_image: LinuxImage) -> None:
    """`harness run --set`, traced: the values reach the guest, every phase is its own record."""
    suite = write_suite(
        tmp_path,
        # No warm-up repetitions: one record per run, as the checks below count them.
        '[[runs]]\nworkload = "page-touch-4k"\nvm = "linux"\nwarmup = 0\n\n'
        '[[runs]]\nworkload = "fork-storm"\nvm = "linux"\nwarmup = 0\n',
    )
    results = tmp_path / "results"
    proc = run_harness(
        suite, results, "--quiet",
        "--set", "page-touch-4k.mib=16", "--set", "fork-storm.procs=50", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = only_result(results)
    touch, fork = data["runs"]
    assert touch["params"]["mib"] == 16 and fork["params"]["procs"] == 50
    assert [p["name"] for p in touch["phases"]] == ["first-touch", "retouch"]
    assert "--mib 16 " in touch["phases"][0]["command"]
    assert 16 * 256 <= touch["phases"][0]["metrics"]["minflt"] <= 16 * 256 + OWN
    assert 50 <= fork["phases"][0]["metrics"]["forks_counted"] <= 50 + 16
    assert data["vms"][0]["trace"]["tracer_status"] == "ok"
    phases = [p for r in data["runs"] for p in r["phases"]]
    assert len({p["index"] for p in phases}) == 3  # one number, one record, one trace each
    for p in phases:
        assert p["status"] == "ok" and p["trace"] is not None
        if data["vms"][0]["accelerator"] == "tcg":
            assert p["trace"]["attribution"] == "host-window"


BALLOON_SUITE = """\
name = "resize"

[[vms]]
name = "linux"
image = "linux"
vcpus = 2
memory_mib = {memory}
balloon = true
boot_timeout_s = 90

[[runs]]
workload = "balloon"
vm = "linux"
params = {{ mib = 32, refill_mib = 64 }}

[trace]
enabled = false
"""


def test_balloon_shrinks_and_regrows_guest_memory(tmp_path: Path, linux_image: LinuxImage) -> None:
    """setMemory through virtio-balloon: the guest's MemTotal follows, held memory survives."""
    memory = 768
    suite = tmp_path / "resize.toml"  # not balloon.toml: that name would shadow the workload
    suite.write_text(BALLOON_SUITE.format(memory=memory))
    results = tmp_path / "results"
    t0 = time.monotonic()
    proc = run_harness(suite, results, "--quiet", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = only_result(results)
    (run,) = data["runs"]
    m = {p["name"]: p["metrics"] for p in run["phases"]}
    assert list(m) == ["touch", "shrink", "regrow", "retouch"]
    print(f"balloon: {time.monotonic() - t0:.1f} s", json.dumps(m))
    full = m["touch"]["memtotal_kib"]
    # The balloon took half the VM's memory out of the guest's managed total, then gave it back.
    assert m["shrink"]["memtotal_kib"] == pytest.approx(full - memory * 1024 / 2, abs=2048)
    assert m["regrow"]["memtotal_kib"] == pytest.approx(full, abs=2048)
    assert 32 * 256 <= m["touch"]["minflt"] <= 32 * 256 + OWN
    assert m["retouch"]["held_minflt"] <= OWN  # the held pages were not taken
    assert 64 * 256 <= m["retouch"]["refill_minflt"] <= 64 * 256 + OWN
