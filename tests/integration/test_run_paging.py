"""The paging micro guest through the real orchestrator and libvirt: known answers, exactly.

`harness run workloads/suites/paging-kvm.toml` boots the paging ROM as a
transient libvirt domain (type kvm) once per run (K = 2, 3, 4, 5, 8),
traces it, and writes the result file; every per-phase count in that file
must equal what harness.image.paging.expected_answers derives from KVM's
source (see tests/integration/test_paging_guest.py for the derivation).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from harness.image.paging import KVM_MMU_NUM_PREV_ROOTS, expected_answers
from harness.paths import RESULTS_DIR, SUITES_DIR
from harness.spec import load_suite
from tests.conftest import harness_domains, stray_tracers

pytestmark = [
    pytest.mark.integration,
    pytest.mark.requires(
        root=True, tools=("bpftrace", "nasm"), mmu_modes=("pvm",),
        why="the known answers assume KVM emulates every guest instruction",
    ),
]


def test_paging_suite_through_libvirt_matches_kvm_source(tmp_path: Path) -> None:
    suite = load_suite(SUITES_DIR / "paging-kvm.toml")
    workload = suite.workloads["paging-cr3"]
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(suite.path),
         "--results-dir", str(results), "--quiet"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = results.glob("*.json")
    data: dict[str, Any] = json.loads(path.read_text())
    jsonschema.validate(data, json.loads((RESULTS_DIR / "schema.json").read_text()))
    assert data["status"] == "complete"
    assert data["host"]["mmu_mode"] == "pvm"
    assert len(data["runs"]) == len(suite.spec.runs)
    for vm in data["vms"]:
        assert vm["image"] == "paging" and vm["accelerator"] == "kvm"
        assert vm["trace"]["tracer_status"] == "ok" and vm["trace"]["lost_events"] == 0

    seen_k: set[int] = set()
    for wrun, run in zip(data["runs"], suite.spec.runs, strict=True):
        k, phases = workload.paging_phases(run.params)
        seen_k.add(k)
        want = expected_answers(k, phases)
        assert [p["name"] for p in wrun["phases"]] == [p.name for p in phases]
        for number, p in enumerate(wrun["phases"], start=1):
            tr, a = p["trace"], want[number]
            where = (k, p["name"])
            assert p["status"] == "ok" and tr["markers_seen"] == 1, where
            assert tr["attribution"] == "guest-marker", where
            assert tr["shadow_pages_created"] == a.roots_created, where
            assert tr["shadow_pages_found"] == a.roots_found, where
            assert tr["mmu_events"].get("kvm_mmu_get_page", 0) == a.root_lookups, where
            assert tr["mmu_events"].get("kvm_mmu_set_accessed_bit", 0) == a.accessed_bits, where
            assert tr["mmu_events"].get("kvm_mmu_set_dirty_bit", 0) == a.dirty_bits, where
            assert tr["emulated_insns"] == a.emulated_insns, where
            # kvm_cr cannot see the emulated MOV CR3 here; the result says so.
            assert tr["cr3_writes"] == 0 and "PVM" in (tr["cr3_writes_note"] or ""), where
            if a.cr3_writes:
                assert p["metrics"]["cr3_writes"] == a.cr3_writes, where
            # Call paths (the suite stacks kvm_mmu_get_page): every root lookup has its
            # stack, and each was made by kvm_mmu_load allocating a shadow root, the path
            # mmu.c gives (kvm_mmu_load -> mmu_alloc_shadow_roots -> mmu_alloc_root;
            # the middle one is inlined in this host's build, so its frame never shows).
            st = tr["stacks"].get("kvm_mmu_get_page")
            if a.root_lookups == 0:
                assert st is None or st["stacked"] == 0, where
            else:
                assert st["stacked"] == st["events"] == a.root_lookups, where
                for fn in ("kvm_mmu_load", "mmu_alloc_root", "__kvm_mmu_get_shadow_page"):
                    assert st["paths"].get(fn) == a.root_lookups, (where, fn, st["paths"])
        rr = wrun["phases"][1]["trace"]
        n = phases[1].count
        assert rr["shadow_pages_found"] == (n if k > 1 + KVM_MMU_NUM_PREV_ROOTS else 0)
    assert {2, 3, 4, 5} <= seen_k, "K on both sides of the root cache"

    run_id = data["run_id"]
    assert not [d for d in harness_domains() if run_id in d]
    assert not [t for t in stray_tracers() if run_id in t]
