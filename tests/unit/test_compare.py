"""`harness compare` on result files built here: matching, fairness, verdicts, exit codes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from harness.analysis import render
from harness.analysis.compare import compare
from harness.analysis.resultset import InputError, load_side
from harness.cli import main
from harness.results import (
    MetricInfo,
    PhaseResult,
    RunResult,
    SuiteRef,
    VmRecord,
    WorkloadInfo,
    WorkloadRun,
    write_atomic,
)
from harness.trace.model import HistBucketModel, PhaseTrace, ProbeNotAttached, TraceSummary
from tests.unit.test_results import host

RNG_SEED = 1128


def trace(faults: int, slow_share: float = 0.0, exits: int = 0) -> PhaseTrace:
    """A phase trace with ``faults`` MMU faults, ``slow_share`` of them in the 2-4 us bucket."""
    slow = round(faults * slow_share)
    return PhaseTrace(
        attribution="guest-marker",
        markers_seen=1,
        marker_ns=1,
        mmu_faults={"ept_violation": faults},
        exits={"EPT_VIOLATION": faults, **({"HLT": exits} if exits else {})},
        events_by_probe={"kvm_page_fault": faults, "kvm_exit": faults + exits},
        events_total=2 * faults + exits,
        latency_ns={
            "page_fault_to_entry": [
                HistBucketModel(low=1024, high=2047, count=faults - slow),
                HistBucketModel(low=2048, high=4095, count=slow),
            ]
        },
    )


def run_result(
    run_id: str,
    throughputs: list[float],
    *,
    faults: list[int] | None = None,
    slow_share: float = 0.0,
    kernel: str = "6.1.0",
    image: str = "a" * 64,
    status: str = "complete",
    attached: tuple[str, ...] = ("kvm_page_fault", "kvm_exit"),
    not_attached: tuple[str, ...] = (),
    loads: int | None = None,
    reps_per_boot: int = 1,
) -> RunResult:
    """One run of workload "touch" with one repetition per throughput value, each its own
    boot unless ``reps_per_boot`` groups them."""
    h = host()
    h.kernel_release = kernel
    runs = []
    for i, mbps in enumerate(throughputs):
        phase = PhaseResult(
            index=i + 1,
            name="touch",
            status="ok",
            duration_s=1.0,
            metrics={"mib_per_s": mbps},
            trace=trace(faults[i], slow_share) if faults else None,
        )
        if phase.trace is not None and loads is not None:
            phase.trace.events_by_probe["kvm_mmu_load"] = loads
        runs.append(
            WorkloadRun(workload="touch", vm="vm1", repetition=i % reps_per_boot + 1,
                        params={"mib": 64}, status="ok", phases=[phase],
                        boot=f"vm1-b{i // reps_per_boot + 1}")
        )
    return RunResult(
        run_id=run_id,
        status=status,  # type: ignore[arg-type]
        started_at=datetime.now(UTC),
        harness_version="0.1.0",
        command_line=["harness", "run"],
        suite=SuiteRef(name="s", path="/s.toml", sha256="0" * 64),
        host=h,
        vms=[
            VmRecord(
                name="vm1", domain="d", image="linux", image_digest=image, accelerator="kvm",
                accelerator_reason="r", vcpus=2, memory_mib=1024, marker_token=1,
                trace=TraceSummary(
                    tracer_status="ok",
                    probes_attached=list(attached),
                    probes_not_attached=[
                        ProbeNotAttached(probe=p, reason="not in this kernel") for p in not_attached
                    ],
                    program_template_sha256="t-" + "-".join(attached),
                ),
            )
        ],
        runs=runs,
        workloads={"touch": WorkloadInfo(metrics={"mib_per_s": MetricInfo(unit="MiB/s")})},
    )


def save(tmp: Path, *results: RunResult) -> list[Path]:
    paths = []
    for r in results:
        p = tmp / f"{r.run_id}.json"
        write_atomic(r, p)
        paths.append(p)
    return paths


def noisy(center: float, n: int, seed: int, sd: float = 0.02) -> list[float]:
    rng = np.random.default_rng(seed)
    return [float(x) for x in center * rng.lognormal(0.0, sd, n)]


def test_a_set_against_itself_is_no_change(tmp_path: Path) -> None:
    files = save(tmp_path, run_result("a1", noisy(1000, 5, 1), faults=[6000] * 5),
                 run_result("a2", noisy(1000, 5, 2), faults=[6000] * 5))
    report = compare(load_side("base", files), load_side("candidate", files))
    assert report.exit_status == 0
    assert {f.verdict for f in report.figures} == {"no change"}
    assert report.what_changed == [] and report.unfair == []


def test_twenty_percent_slower_throughput_is_a_regression(tmp_path: Path) -> None:
    base = save(tmp_path, run_result("b", noisy(1000, 5, 3)))
    cand = save(tmp_path, run_result("c", noisy(800, 5, 4), kernel="6.6.0"))
    report = compare(load_side("base", base), load_side("candidate", cand))
    assert report.exit_status == 1
    [reg] = report.failing()
    assert reg.figure == "metric.mib_per_s" and reg.unit == "MiB/s"
    assert reg.change == pytest.approx(-0.2, abs=0.03)
    assert reg.ci_low is not None and reg.ci_high is not None and reg.ci_high < 0
    assert [c.field for c in report.what_changed] == ["host.kernel_release"]
    md = render.markdown(report)
    assert md.index("#### Regressions") < md.index("Unchanged:")
    assert "metric.mib_per_s" in md and "6.1.0 → 6.6.0" in md


def test_a_small_significant_change_is_not_a_verdict(tmp_path: Path) -> None:
    """Two gates: 2% slower with tiny noise is significant but below a 5% threshold."""
    base = save(tmp_path, run_result("b", noisy(1000, 6, 5, sd=0.002)))
    cand = save(tmp_path, run_result("c", noisy(980, 6, 6, sd=0.002)))
    report = compare(load_side("base", base), load_side("candidate", cand))
    fig = next(f for f in report.figures if f.figure == "metric.mib_per_s")
    assert fig.q is not None and fig.q < 0.05
    assert fig.verdict == "no change" and report.exit_status == 0
    strict = compare(load_side("base", base), load_side("candidate", cand), threshold=0.01)
    assert strict.exit_status == 1


def test_fewer_but_slower_faults_is_an_improvement(tmp_path: Path) -> None:
    """6x fewer faults, each 12% slower: total fault time falls, the latency rise is offset."""
    base = save(tmp_path, run_result("b", [1000.0] * 4, faults=[6000, 6010, 5990, 6005]))
    cand = save(
        tmp_path,
        run_result("c", [1000.0] * 4, faults=[1000, 1002, 998, 1001], slow_share=0.12),
    )
    report = compare(load_side("base", base), load_side("candidate", cand))
    by = {f.figure: f for f in report.figures}
    time_fig = by["time.page_fault_to_entry_ns"]
    assert time_fig.verdict == "improvement"
    d = time_fig.decomposition
    assert d is not None
    assert d.events_ratio == pytest.approx(1 / 6, rel=0.01)
    assert d.per_event_ratio == pytest.approx(1.12, rel=0.001)
    assert d.total_ratio == pytest.approx(d.events_ratio * d.per_event_ratio)
    mean = by["latency.page_fault_to_entry.mean_ns"]
    assert mean.verdict == "regression" and mean.offset_by == "time.page_fault_to_entry_ns"
    assert by["mmu_faults.ept_violation"].verdict == "improvement"
    assert report.exit_status == 0
    assert "offset by fewer events" in render.markdown(report)


def test_one_repetition_per_side_is_not_enough(tmp_path: Path) -> None:
    base = save(tmp_path, run_result("b", [1000.0]))
    cand = save(tmp_path, run_result("c", [500.0]))
    report = compare(load_side("base", base), load_side("candidate", cand))
    fig = next(f for f in report.figures if f.figure == "metric.mib_per_s")
    assert fig.verdict == "not enough data" and fig.change == pytest.approx(-0.5)
    # Nothing could be tested: no verdict is possible, which is not "no regression".
    assert report.exit_status == 2 and report.no_verdict is not None
    assert "NO VERDICT POSSIBLE" in render.headline(report)
    # Still shown, untested: a single quick A/B run should not hide a halved throughput.
    untested = render.markdown(report).split("but not a verdict")[1]
    assert "metric.mib_per_s" in untested and "-50.0%" in untested


def test_other_guest_image_is_unfair(tmp_path: Path) -> None:
    base = save(tmp_path, run_result("b", noisy(1000, 3, 7)))
    cand = save(tmp_path, run_result("c", noisy(1000, 3, 8), image="b" * 64))
    report = compare(load_side("base", base), load_side("candidate", cand))
    assert report.exit_status == 2
    assert [c.field for c in report.unfair] == ["vm vm1: image"]
    assert "NOT COMPARABLE" in render.table(report)
    allowed = compare(load_side("base", base), load_side("candidate", cand), allow_mismatch=True)
    assert allowed.exit_status == 0 and allowed.unfair


def test_a_side_mixing_kernels_is_unfair(tmp_path: Path) -> None:
    base = save(tmp_path, run_result("b1", noisy(1000, 3, 9)),
                run_result("b2", noisy(1000, 3, 10), kernel="6.2.0"))
    cand = save(tmp_path, run_result("c", noisy(1000, 3, 11), kernel="6.6.0"))
    report = compare(load_side("base", base), load_side("candidate", cand))
    assert report.exit_status == 2
    assert report.unfair[0].field == "host.kernel_release"
    assert "mixes" in report.unfair[0].meaning


def test_unfinished_results_are_listed_and_left_out(tmp_path: Path) -> None:
    good = run_result("ok1", noisy(1000, 3, 12))
    failed = run_result("bad1", [1.0, 1.0, 1.0], status="failed")
    failed.errors.append("GuestError: boom")
    running = run_result("run1", [1.0, 1.0, 1.0], status="running")
    incomplete = run_result("inc1", [1.0, 1.0, 1.0], status="incomplete")
    incomplete.errors.append("interrupted by SIGINT before the suite finished")
    side = load_side("base", save(tmp_path, good, failed, running, incomplete))
    # A failed run finished its suite: its good phases count and its failures are judged.
    assert [r.run_id for _, r in side.results] == ["ok1", "bad1"]
    reasons = {e.run_id: e.reason for e in side.excluded}
    assert "killed" in reasons["run1"]
    assert reasons["inc1"] == "interrupted before the suite finished: interrupted by SIGINT " \
        "before the suite finished"
    with pytest.raises(InputError, match="no finished result"):
        load_side("candidate", save(tmp_path, running))


def test_a_killed_run_is_named_once(tmp_path: Path) -> None:
    """Issue 22: "left out ... killed: killed ..." said the status twice."""
    dead = run_result("k1", [1.0, 1.0], status="killed")
    dead.errors.append("killed: its harness process (pid 7) was gone")
    side = load_side("base", save(tmp_path, run_result("ok", [1.0, 2.0]), dead))
    [e] = side.excluded
    assert e.reason == "killed: its harness process (pid 7) was gone"


def test_phases_are_matched_by_parameters(tmp_path: Path) -> None:
    base = run_result("b", noisy(1000, 3, 13))
    cand = run_result("c", noisy(1000, 3, 14))
    for run in cand.runs:
        run.params = {"mib": 128}
    report = compare(load_side("base", save(tmp_path, base)),
                     load_side("candidate", save(tmp_path, cand)))
    assert report.exit_status == 2 and not report.figures
    assert any("mib=64" in u for u in report.unmatched_phases)


def test_cli_exit_statuses_and_formats(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save(tmp_path / "a", run_result("b", noisy(1000, 4, 15)))
    save(tmp_path / "b", run_result("c", noisy(700, 4, 16)))
    (tmp_path / "a" / "schema.json").write_text('{"$schema": "x"}')  # not a result: skipped
    runner = CliRunner()
    res = runner.invoke(main, ["compare", str(tmp_path / "a"), str(tmp_path / "b"),
                               "--format", "json"])
    assert res.exit_code == 1, res.output
    data = json.loads(res.output)
    assert data["exit_status"] == 1 and data["settings"]["correction"] == "bh"
    same = runner.invoke(main, ["compare", str(tmp_path / "a"), str(tmp_path / "a")])
    assert same.exit_code == 0 and "no regression" in same.output
    out = tmp_path / "report.md"
    md = runner.invoke(main, ["compare", str(tmp_path / "a" / "b.json"),
                              str(tmp_path / "b" / "*.json"), "--format", "md",
                              "--output", str(out), "--threshold", "50%"])
    assert md.exit_code == 0 and out.read_text().startswith("### harness compare")


def test_cli_bad_input_exits_2(tmp_path: Path) -> None:
    [good] = save(tmp_path, run_result("b", noisy(1000, 3, 17)))
    truncated = tmp_path / "trunc.json"
    truncated.write_text(good.read_text()[:200])
    newer = tmp_path / "newer.json"
    newer.write_text(good.read_text().replace('"schema_version": 1', '"schema_version": 99'))
    runner = CliRunner()
    for bad in (truncated, newer, tmp_path / "missing.json"):
        res = runner.invoke(main, ["compare", str(good), str(bad)])
        assert res.exit_code == 2, res.output
        assert str(bad) in res.output
    res = runner.invoke(main, ["compare", str(good), str(good), "--threshold", "lots"])
    assert res.exit_code == 2


def test_a_function_gone_in_the_candidate_kernel_is_listed_not_judged(tmp_path: Path) -> None:
    """kvm_mmu_load attaches on kernel A only: its count is 'measured on one side', not -100%."""
    both = ("kvm_page_fault", "kvm_exit")
    base = save(tmp_path, run_result("b", [1000.0] * 3, faults=[100] * 3, loads=40,
                                      attached=(*both, "kvm_mmu_load")))
    cand = save(tmp_path, run_result("c", [1000.0] * 3, faults=[100] * 3, kernel="6.6.0",
                                      attached=both, not_attached=("kvm_mmu_load",)))
    report = compare(load_side("base", base), load_side("candidate", cand))
    [gone] = [f for f in report.figures if f.figure == "events.kvm_mmu_load"]
    assert gone.only_in == "base" and gone.verdict == "not enough data" and gone.n_candidate == 0
    assert report.exit_status == 0
    changed = {c.field for c in report.what_changed}
    assert "vm vm1: probes attached" in changed
    assert not report.unfair  # same selection; the program differs only by what attached
    assert "Measured on one side only" in render.markdown(report)


def test_another_probe_selection_is_unfair(tmp_path: Path) -> None:
    base = save(tmp_path, run_result("b", [1000.0] * 3, attached=("kvm_exit",)))
    cand = save(tmp_path, run_result("c", [1000.0] * 3, attached=("kvm_exit", "kvm_cr")))
    report = compare(load_side("base", base), load_side("candidate", cand))
    assert report.exit_status == 2
    assert "vm vm1: probe selection" in {c.field for c in report.unfair}


def test_a_thp_change_is_unfair_unless_the_host_configurations_set_it(tmp_path: Path) -> None:
    from harness.host.mmuconfig import HostConfigRecord

    base = run_result("b", [1000.0] * 3)
    cand = run_result("c", [1000.0] * 3)
    base.host.thp_enabled, cand.host.thp_enabled = "never", "always"
    report = compare(load_side("b", save(tmp_path, base)), load_side("c", save(tmp_path, cand)))
    assert report.exit_status == 2 and report.unfair[0].field == "host.thp_enabled"
    # The MMU matrix: each side ran under its own [[host_configs]] entry.
    base.host_config = HostConfigRecord(name="thp-never", settings=[], commands=[])
    cand.host_config = HostConfigRecord(name="thp-always", settings=[], commands=[])
    report = compare(load_side("b", save(tmp_path, base)), load_side("c", save(tmp_path, cand)))
    assert report.exit_status == 0 and not report.unfair
    changed = {c.field for c in report.what_changed}
    assert {"host config", "host.thp_enabled"} <= changed
