"""Several VMs at once through the harness's own run path: real libvirtd, QEMU/KVM
(micro guests) or TCG (Linux guests), one real bpftrace for all of them."""

from __future__ import annotations

import dataclasses
import itertools
import json
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from harness.image.linux import LinuxImage
from harness.image.micro import MicroPhase, expected_emulated_insns
from harness.paths import RESULTS_DIR, SUITES_DIR
from harness.run import run_suite
from harness.spec import load_suite
from tests.conftest import harness_domains, stray_tracers
from tests.integration.test_run_linux import (
    assert_cleaned_up,
    only_result,
    run_harness,
    start_harness,
    wait_for,
)

pytestmark = pytest.mark.integration

SCHEMA = json.loads((RESULTS_DIR / "schema.json").read_text())
ROUNDS = 5


def test_three_micro_guests_at_once_exact_per_vm_and_phase(tmp_path: Path) -> None:
    """Three micro guests with different page counts run together, five rounds in a row.

    Per VM and phase the emulated instructions are that guest's own loop count
    (from its code: expected_loop_insns), each marker is seen once, and each
    phase holds exactly one cpuid, its own marker: no event of one VM lands
    in another's phases.
    """
    shipped = load_suite(SUITES_DIR / "micro-neighbours.toml")
    suite = dataclasses.replace(
        shipped, spec=shipped.spec.model_copy(update={"repetitions": ROUNDS})
    )
    (group,) = suite.spec.groups
    assert len(group.vms) == 3
    started = time.monotonic()
    state = run_suite(suite, results_dir=tmp_path)
    elapsed = time.monotonic() - started
    data: dict[str, Any] = json.loads(state.path.read_text())
    jsonschema.validate(data, SCHEMA)
    assert data["status"] == "complete", data["errors"]
    assert data["errors"] == []

    vms = data["vms"]
    assert len(vms) == 3 * ROUNDS
    rounds: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for vm in vms:
        assert vm["group"] == group.name and vm["accelerator"] == "kvm"
        assert vm["trace"]["tracer_status"] == "ok" and vm["trace"]["lost_events"] == 0
        # One tracer (one program) per round, for all three guests.
        rounds[vm["trace"]["program_sha256"]].append(vm)
    assert len(rounds) == ROUNDS
    for members in rounds.values():
        assert sorted(v["name"] for v in members) == sorted(group.vms)
        # Marker tokens and QEMU pids tell the three apart.
        assert len({v["marker_token"] for v in members}) == 3
        assert len({v["qemu_pid"] for v in members}) == 3
    # Same probes, same number of targets: the same program, whatever the pids.
    (template,) = {v["trace"]["program_template_sha256"] for v in vms}
    assert isinstance(template, str) and len(template) == 64 and template not in rounds

    runs = data["runs"]
    assert len(runs) == 3 * ROUNDS
    by_vm_rep = {(r["vm"], r["repetition"]): r for r in runs}
    assert len(by_vm_rep) == len(runs)
    for run in runs:
        assert run["status"] == "ok"
        workload = suite.workloads[run["workload"]]
        assert [p["name"] for p in run["phases"]] == [p.name for p in workload.phases]
        expected = expected_emulated_insns(
            [MicroPhase(s.name, s.pages or 0, s.repeat) for s in workload.phases]
        )
        for k, (phase, spec) in enumerate(zip(run["phases"], workload.phases, strict=True), 1):
            tr = phase["trace"]
            assert tr["attribution"] == "guest-marker" and tr["markers_seen"] == 1
            # Exactly the phase's own instructions, nothing of a neighbour or another VM.
            assert tr["emulated_insns"] == expected[k], (run["vm"], spec.name, expected[k], tr)
            assert tr["events_by_probe"]["kvm_cpuid"] == 1, (run["vm"], spec.name)
        for a, b in itertools.pairwise(run["phases"]):
            assert a["end_ns"] == b["start_ns"]

    # They really ran at the same time: in every round the guests' work overlaps.
    for rep in range(1, ROUNDS + 1):
        spans = [
            (r["phases"][0]["start_ns"], r["phases"][-1]["end_ns"])
            for r in (by_vm_rep[(name, rep)] for name in group.vms)
        ]
        assert max(s for s, _ in spans) < min(e for _, e in spans), (rep, spans)

    run_id = data["run_id"]
    assert not [d for d in harness_domains() if run_id in d]
    assert not [t for t in stray_tracers() if run_id in t]
    print(f"\n{ROUNDS} rounds of 3 micro guests at once: {elapsed:.1f} s")


def test_one_guest_failing_keeps_its_neighbours_data(tmp_path: Path) -> None:
    """A guest that overruns its time is torn down alone; the others are measured in full."""
    shipped = load_suite(SUITES_DIR / "micro-neighbours.toml")
    vms = [
        vm.model_copy(update={"boot_timeout_s": 0.05}) if vm.name == "falling" else vm
        for vm in shipped.spec.vms
    ]
    spec = shipped.spec.model_copy(update={"repetitions": 1, "vms": vms})
    state = run_suite(dataclasses.replace(shipped, spec=spec), results_dir=tmp_path)
    data: dict[str, Any] = json.loads(state.path.read_text())
    jsonschema.validate(data, SCHEMA)
    assert data["status"] == "failed"
    runs = {r["vm"]: r for r in data["runs"]}
    assert runs["falling"]["status"] == "failed"
    assert any(
        "did not finish in time" in (p["error"] or "") for p in runs["falling"]["phases"]
    ), runs["falling"]
    for name in ("rising", "mixed"):
        assert runs[name]["status"] == "ok"
        assert all(p["trace"]["markers_seen"] == 1 for p in runs[name]["phases"])
    assert not [d for d in harness_domains() if data["run_id"] in d]


NEIGHBOURS = SUITES_DIR / "neighbours.toml"


def test_neighbours_suite_end_to_end(tmp_path: Path, linux_image: LinuxImage) -> None:
    """Two Linux guests at once (TCG here), one tracer, each VM's phases its own."""
    results = tmp_path / "results"
    started = time.monotonic()
    proc = run_harness(NEIGHBOURS, results, "--quiet", timeout=600)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = only_result(results)
    assert data["status"] == "complete", data["errors"]
    toucher, stressor = (next(v for v in data["vms"] if v["name"] == n) for n in
                         ("toucher", "stressor"))
    assert toucher["group"] == stressor["group"] == "neighbours"
    assert toucher["marker_token"] != stressor["marker_token"]
    assert toucher["qemu_pid"] != stressor["qemu_pid"]
    for vm in (toucher, stressor):
        assert vm["image_digest"] == linux_image.digest
        assert vm["trace"]["tracer_status"] == "ok", vm["trace"]
        assert vm["boot_to_ready_s"] > 0
    assert toucher["trace"]["program_sha256"] == stressor["trace"]["program_sha256"]

    runs = {r["vm"]: r for r in data["runs"]}
    touch, stress = runs["toucher"]["phases"][0], runs["stressor"]["phases"][0]
    assert runs["toucher"]["workload"] == "page-touch"
    assert runs["stressor"]["workload"] == "stress-ng-vm"
    assert touch["status"] == "ok" and touch["metrics"]["first_touch_mib_per_s"] > 0
    assert stress["status"] == "ok" and stress["metrics"]["bogo_ops"] > 0
    # Phase numbers are per VM: each VM numbers its own phases from 1 (its warm-up run's
    # first), so the two measured phases carry the same number.
    for name in ("toucher", "stressor"):
        numbers = [p["index"] for r in data["runs"] if r["vm"] == name for p in r["phases"]]
        assert numbers == list(range(1, len(numbers) + 1)), (name, numbers)
    assert touch["index"] == stress["index"]
    # The measured page-touch ran while the stressor worked: they were neighbours. Which
    # of the stressor's runs it met (its warm-up or its measured one) depends on timing.
    stressing = [p for r in data["runs"] if r["vm"] == "stressor" for p in r["phases"]]
    assert any(
        max(touch["start_ns"], s["start_ns"]) < min(touch["end_ns"], s["end_ns"])
        for s in stressing
    ), (touch, stressing)
    for vm, phase in ((toucher, touch), (stressor, stress)):
        tr = phase["trace"]
        assert tr is not None and tr["host_marks_seen"] == 1, (vm["name"], tr)
        if vm["accelerator"] == "tcg":  # no cpuid reaches KVM: the host windows attribute
            assert tr["attribution"] == "host-window" and tr["markers_seen"] == 0
    assert_cleaned_up(data["run_id"])
    print(f"\nneighbours suite end to end: {elapsed:.1f} s")


LONG_NEIGHBOURS = """\
name = "neighbours-long"
repetitions = 1

[[vms]]
name = "toucher"
image = "linux"
vcpus = 1
memory_mib = 512
boot_timeout_s = 180

[[vms]]
name = "stressor"
image = "linux"
vcpus = 1
memory_mib = 512
boot_timeout_s = 180

[[runs]]
workload = "page-touch"
vm = "toucher"
params = { mib = 16 }

[[runs]]
workload = "stress-ng-vm"
vm = "stressor"
params = { bytes = "32M", seconds = 120 }

[[groups]]
name = "pair"
vms = ["toucher", "stressor"]

[trace]
probes = ["default"]
"""


def test_sigint_tears_down_every_neighbour_and_keeps_finished_phases(
    tmp_path: Path, linux_image: LinuxImage
) -> None:
    suite = tmp_path / "neighbours-long.toml"
    suite.write_text(LONG_NEIGHBOURS)
    results = tmp_path / "results"
    proc = start_harness(suite, results)
    try:

        def toucher_done_stressor_running() -> bool:
            files = list(results.glob("*.json"))
            if not files:
                return False
            runs = {r["vm"]: r for r in json.loads(files[0].read_text())["runs"]}
            return runs.get("toucher", {}).get("status") == "ok" and "stressor" in runs

        assert wait_for(toucher_done_stressor_running, 300), proc.poll()
        run_id = only_result(results)["run_id"]
        assert len([d for d in harness_domains() if run_id in d]) >= 1
        time.sleep(2)  # inside the 120 s stress-ng phase
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
        print(f"\nSIGINT to exit with both neighbours torn down: {time.monotonic() - sent:.1f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    data = only_result(results)
    assert data["status"] == "incomplete"
    assert any("interrupted by SIGINT" in e for e in data["errors"])
    runs = {r["vm"]: r for r in data["runs"]}
    # The neighbour that finished keeps its phase; the interrupted one records none.
    assert runs["toucher"]["status"] == "ok"
    assert runs["toucher"]["phases"][0]["metrics"]["first_touch_mib_per_s"] > 0
    assert runs["stressor"]["status"] == "incomplete" and runs["stressor"]["phases"] == []
    assert_cleaned_up(run_id)
    listed = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert run_id not in listed


def test_a_neighbour_that_does_not_boot_ends_the_round_for_both(
    tmp_path: Path, linux_image: LinuxImage
) -> None:
    """Neighbours measured without their neighbour would be mislabelled: nothing runs."""
    suite = tmp_path / "neighbours-noboot.toml"
    # The toucher gets 1 s to answer SSH (it needs several under TCG).
    suite.write_text(
        LONG_NEIGHBOURS.replace('name = "toucher"\nimage = "linux"\nvcpus = 1\n'
                                'memory_mib = 512\nboot_timeout_s = 180',
                                'name = "toucher"\nimage = "linux"\nvcpus = 1\n'
                                'memory_mib = 512\nboot_timeout_s = 1')
    )
    assert "boot_timeout_s = 1\n" in suite.read_text()
    results = tmp_path / "results"
    started = time.monotonic()
    proc = run_harness(suite, results, "--quiet", timeout=300)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "toucher did not answer SSH within 1 s" in proc.stderr
    data = only_result(results)
    assert data["status"] == "failed"
    assert data["runs"] == []  # no phase ran beside a neighbour that was not there
    assert "toucher did not answer SSH" in data["errors"][0]
    assert_cleaned_up(data["run_id"])
    print(f"\nboot failure of one neighbour, both torn down: {elapsed:.1f} s")
