"""Result files: the committed schema is current, writes are atomic, old versions are refused."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest

from harness.host.facts import HostFacts
from harness.paths import RESULTS_DIR
from harness.results import (
    PhaseResult,
    ResultError,
    RunResult,
    SuiteRef,
    VmRecord,
    WorkloadRun,
    json_schema,
    load,
    write_atomic,
)

SCHEMA_FILE = RESULTS_DIR / "schema.json"


def host() -> HostFacts:
    return HostFacts(
        hostname="h",
        kernel_release="6.1.0",
        kernel_cmdline="ro",
        cpu_model="cpu",
        cpu_vendor="intel",
        virt_flags=["vmx"],
        kvm_modules=["kvm", "kvm_intel"],
        kvm_params={"kvm_intel": {"ept": "Y"}},
        mmu_mode="ept",
        tdp_mmu=True,
        mmu_reason="kvm_intel.ept=Y",
        kvm_device=True,
        stock_guest_kvm=True,
        stock_guest_reason="ept",
        qemu_version="7.2",
        libvirt_version="9.0.0",
        bpftrace_version="0.17.0",
    )


def result(status: str = "running") -> RunResult:
    r = RunResult(
        run_id="20261126T000000-abcd",
        status=status,  # type: ignore[arg-type]
        started_at=datetime.now(UTC),
        harness_version="0.1.0",
        command_line=["harness", "run"],
        suite=SuiteRef(name="s", path="/s.toml", sha256="0" * 64),
        host=host(),
    )
    r.vms.append(
        VmRecord(
            name="g",
            domain="kvmh-x-g",
            image="linux",
            image_digest="d",
            accelerator="tcg",
            accelerator_reason="no VMX",
            vcpus=1,
            memory_mib=512,
            marker_token=7,
        )
    )
    run = WorkloadRun(workload="page-touch", vm="g", repetition=1, params={"mib": 64}, status="ok")
    run.phases.append(
        PhaseResult(
            index=1,
            name="touch",
            status="ok",
            start_ns=1,
            end_ns=2,
            duration_s=1e-9,
            metrics={"rate": 1.5},
        )
    )
    r.runs.append(run)
    return r


def test_committed_schema_is_current() -> None:
    committed = json.loads(SCHEMA_FILE.read_text())
    assert committed == json_schema(), (
        "results/schema.json is stale: regenerate it with "
        "`python -m harness.results > results/schema.json`"
    )


def test_written_result_validates_against_committed_schema(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_atomic(result(), path)
    jsonschema.validate(json.loads(path.read_text()), json.loads(SCHEMA_FILE.read_text()))
    assert load(path) == result().model_copy(update={"started_at": load(path).started_at})


def test_schema_rejects_a_result_missing_provenance(tmp_path: Path) -> None:
    data = json.loads(result().model_dump_json())
    del data["host"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, json.loads(SCHEMA_FILE.read_text()))


def test_failed_write_keeps_previous_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "r.json"
    write_atomic(result("running"), path)
    before = path.read_text()

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("harness.results.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(result("complete"), path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_load_refuses_unknown_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    data = json.loads(result().model_dump_json())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ResultError, match="schema_version 99"):
        load(path)
