"""KVM statistics parsing: debugfs directory layout, QMP query-stats replies, diffs."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.trace.kvmstats import (
    EXACT_EQUIVALENTS,
    TRACE_EQUIVALENTS,
    debugfs_unavailable_reason,
    diff,
    parse_query_stats,
    parse_stat_value,
    read_stat_dir,
    read_vm_stats,
    vm_stat_dirs,
)

# Trimmed from a real QEMU 7.2 reply on the PVM host (tiny guest, one vCPU).
QMP_VM = {
    "return": [
        {
            "provider": "kvm",
            "stats": [
                {"name": "max_mmu_rmap_size", "value": 0},
                {"name": "pages_4k", "value": 0},
                {"name": "mmu_cache_miss", "value": 20},
                {"name": "mmu_shadow_zapped", "value": 32},
                {"name": "remote_tlb_flush_requests", "value": 4},
            ],
        }
    ]
}
QMP_VCPU = {
    "return": [
        {
            "provider": "kvm",
            "qom-path": "/machine/unattached/device[0]",
            "stats": [
                {"name": "guest_mode", "value": False},
                {"name": "insn_emulation", "value": 3064652},
                {"name": "exits", "value": 7290},
                {"name": "mmio_exits", "value": 376},
                {"name": "blocking", "value": True},
                {"name": "halt_wait_hist", "value": [0, 0, 3, 0]},
                {"name": "halt_wait_ns", "value": 0},
            ],
        },
        {
            "provider": "kvm",
            "qom-path": "/machine/unattached/device[1]",
            "stats": [
                {"name": "insn_emulation", "value": 10},
                {"name": "exits", "value": 5},
                {"name": "blocking", "value": True},
            ],
        },
    ]
}


def test_parse_query_stats_sums_vcpus_and_skips_histograms() -> None:
    stats = parse_query_stats(QMP_VM, QMP_VCPU)
    assert stats["insn_emulation"] == 3064662
    assert stats["exits"] == 7295
    assert stats["mmu_cache_miss"] == 20
    assert stats["blocking"] == 2  # booleans count 0/1 per vCPU, as debugfs sums them
    assert stats["guest_mode"] == 0
    assert "halt_wait_hist" not in stats
    assert parse_query_stats(QMP_VCPU["return"]) == parse_query_stats(QMP_VCPU)


def test_parse_query_stats_ignores_other_providers_and_rejects_errors() -> None:
    other = {"return": [{"provider": "cryptodev", "stats": [{"name": "exits", "value": 9}]}]}
    assert parse_query_stats(other) == {}
    with pytest.raises(ValueError, match="no 'return' list"):
        parse_query_stats({"error": {"class": "GenericError", "desc": "x"}})


def test_diff() -> None:
    before = {"exits": 10, "pages_4k": 50}
    after = {"exits": 25, "pages_4k": 40, "pf_taken": 3}
    assert diff(before, after) == {"exits": 15, "pages_4k": -10, "pf_taken": 3}


def test_parse_stat_value() -> None:
    assert parse_stat_value("1234\n") == 1234
    assert parse_stat_value("0") == 0
    assert parse_stat_value("") is None
    assert parse_stat_value("1 2 3\n") is None
    assert parse_stat_value("Y\n") is None


def _vm_dir(root: Path, name: str, stats: dict[str, str]) -> Path:
    d = root / name
    (d / "vcpu0").mkdir(parents=True)
    (d / "vcpu0" / "tsc-offset").write_text("-123\n")
    for k, v in stats.items():
        (d / k).write_text(v)
    return d


def test_debugfs_layout_sums_vm_dirs_of_one_pid(tmp_path: Path) -> None:
    _vm_dir(tmp_path, "4242-11", {"exits": "100\n", "insn_emulation": "7\n", "hist": "1 2\n"})
    _vm_dir(tmp_path, "4242-15", {"exits": "5\n", "insn_emulation": "1\n"})
    _vm_dir(tmp_path, "42420-9", {"exits": "999\n"})  # another pid sharing the prefix
    (tmp_path / "exits").write_text("1104\n")  # host-wide totals live beside the dirs
    assert [d.name for d in vm_stat_dirs(4242, tmp_path)] == ["4242-11", "4242-15"]
    assert read_stat_dir(tmp_path / "4242-11") == {"exits": 100, "insn_emulation": 7}
    assert read_vm_stats(4242, tmp_path) == {"exits": 105, "insn_emulation": 8}
    assert debugfs_unavailable_reason(4242, tmp_path) is None


def test_debugfs_absent_or_no_vm(tmp_path: Path) -> None:
    assert read_vm_stats(1, tmp_path / "nope") is None
    assert "mount -t debugfs" in (debugfs_unavailable_reason(1, tmp_path / "nope") or "")
    assert read_vm_stats(1, tmp_path) is None
    assert "no VM of pid 1" in (debugfs_unavailable_reason(1, tmp_path) or "")


def test_equivalence_tables_are_consistent() -> None:
    assert TRACE_EQUIVALENTS.keys() >= EXACT_EQUIVALENTS
    for stat in EXACT_EQUIVALENTS:
        assert "approximate" not in TRACE_EQUIVALENTS[stat]
    assert TRACE_EQUIVALENTS["insn_emulation"].startswith("kvm:kvm_emulate_insn")
    assert TRACE_EQUIVALENTS["exits"].startswith("kvm:kvm_exit")
