"""Exit-reason tables, their agreement with the live kvm_exit format, and PFERR decoding."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.trace.exit_reasons import (
    MMU_FAULT_EXITS,
    SVM_EXIT_REASONS,
    VMX_EXIT_REASONS,
    decode_exit_reason,
    decode_fault_error_code,
    ept_qualification_to_error_code,
    fault_kind,
    mmu_fault_exit,
    page_fault_event_kind,
)
from tests.conftest import requires

KVM_EXIT_FORMAT = Path("/sys/kernel/tracing/events/kvm/kvm_exit/format")


def _symbolic_tables(fmt: str) -> list[dict[int, str]]:
    """Every ``__print_symbolic(value, {code, "name"}, ...)`` table in a print fmt, in order."""
    tables: list[dict[int, str]] = []
    for start in (m.end() for m in re.finditer(r"__print_symbolic\(", fmt)):
        depth, i = 1, start
        while depth:
            depth += {"(": 1, ")": -1}.get(fmt[i], 0)
            i += 1
        body = fmt[start : i - 1]
        table: dict[int, str] = {}
        for m in re.finditer(r'\{\s*([-+0-9a-fA-FxX\s]+?)\s*,\s*"([^"]*)"\s*\}', body):
            code = sum(int(term, 0) for term in m.group(1).replace("-", "+-").split("+") if term)
            table[code & 0xFFFFFFFF] = m.group(2)
        tables.append(table)
    return tables


def test_symbolic_parser_on_sample() -> None:
    sample = (
        '(REC->isa == 1) ? __print_symbolic(REC->exit_reason & 0xffff, { 0, "EXCEPTION_NMI" }, '
        '{ 48, "EPT_VIOLATION" }) : __print_symbolic(REC->exit_reason, { 0x040 + 14, "PF excp" },'
        ' { 0x400, "npf" }, { -1, "invalid_guest_state" }), REC->guest_rip'
    )
    assert _symbolic_tables(sample) == [
        {0: "EXCEPTION_NMI", 48: "EPT_VIOLATION"},
        {0x4E: "PF excp", 0x400: "npf", 0xFFFFFFFF: "invalid_guest_state"},
    ]


def test_tables_match_live_tracepoint_format() -> None:
    # Unmounted tracefs or no root: a prerequisite (fails on CI); no kvm_exit: another kernel.
    requires(root=True, tracepoints=("kvm/kvm_exit",))
    text = KVM_EXIT_FORMAT.read_text()
    fmt = text.split("print fmt:", 1)[1]
    vmx, svm = _symbolic_tables(fmt)[:2]
    assert len(vmx) > 40
    assert len(svm) > 80
    # Every (code, name) the running kernel prints must be in our tables, spelled the same.
    assert {c: VMX_EXIT_REASONS.get(c) for c in vmx} == vmx
    assert {c: SVM_EXIT_REASONS.get(c) for c in svm} == svm


def test_decode_vmx() -> None:
    assert decode_exit_reason(1, 48) == "EPT_VIOLATION"
    assert decode_exit_reason(1, 49) == "EPT_MISCONFIG"
    assert decode_exit_reason(1, 10) == "CPUID"
    assert decode_exit_reason(1, 30) == "IO_INSTRUCTION"
    # Only the basic reason (low 16 bits) selects the name; bit 31 is reported as a flag.
    assert decode_exit_reason(1, 0x80000021) == "INVALID_STATE FAILED_VMENTRY"
    assert decode_exit_reason(1, 0x0800_0000 | 12) == "HLT"
    assert decode_exit_reason(1, 0x7F) == "VMX_UNKNOWN_0x7f"


def test_decode_svm() -> None:
    assert decode_exit_reason(2, 0x400) == "npf"
    assert decode_exit_reason(2, 0x72) == "cpuid"
    assert decode_exit_reason(2, 0x4E) == "PF excp"
    assert decode_exit_reason(2, 0xFFFFFFFF) == "invalid_guest_state"
    assert decode_exit_reason(2, -1) == "invalid_guest_state"
    assert decode_exit_reason(2, 0x8E) == "SVM_UNKNOWN_0x8e"  # RDPRU: defined, not printed


def test_decode_rejects_unknown_isa() -> None:
    with pytest.raises(ValueError, match="isa=3"):
        decode_exit_reason(3, 0)


def test_mmu_fault_exits() -> None:
    assert MMU_FAULT_EXITS == {
        (1, 48): "ept_violation",
        (1, 49): "ept_misconfig",
        (2, 0x400): "npf",
    }
    assert mmu_fault_exit(1, 48) == "ept_violation"
    assert mmu_fault_exit(1, 0x80000000 | 48) == "ept_violation"
    assert mmu_fault_exit(2, 0x400) == "npf"
    assert mmu_fault_exit(2, 48) is None
    assert mmu_fault_exit(1, 10) is None


def test_decode_fault_error_code() -> None:
    assert decode_fault_error_code(0) == []
    assert decode_fault_error_code(0x7) == ["present", "write", "user"]
    # A typical AMD NPF EXITINFO1: write to a not-present GPA at the final translation.
    assert decode_fault_error_code((1 << 32) | 0x6) == ["write", "user", "guest_final"]
    assert decode_fault_error_code(1 << 33 | 1) == ["present", "guest_page"]
    assert decode_fault_error_code(1 << 20) == ["bit20"]
    with pytest.raises(ValueError):
        decode_fault_error_code(-1)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (0x0, "read|kernel|not-present"),
        (0x2, "write|kernel|not-present"),
        (0x7, "write|user"),
        (0x11, "fetch|kernel"),
        (0x15, "fetch|user"),
        (0x9, "read|kernel|rsvd"),
        (0x21, "read|kernel|pk"),
        ((1 << 32) | 0x6, "write|user|not-present|guest-final"),
        ((1 << 33) | 0x1, "read|kernel|guest-page"),
    ],
)
def test_fault_kind(code: int, kind: str) -> None:
    assert fault_kind(code) == kind


def test_ept_qualification_conversion() -> None:
    # Write (bit 1) to a GPA not mapped at all (bits 3-5 clear), linear address translated (7, 8).
    q = 0x2 | (1 << 7) | (1 << 8)
    assert ept_qualification_to_error_code(q) == 0x2 | (1 << 32)
    # Read of a readable-but-not-writable page during a guest page walk (bit 8 clear).
    q = 0x1 | (1 << 3) | (1 << 7)
    assert ept_qualification_to_error_code(q) == 0x4 | 0x1 | (1 << 33)
    assert page_fault_event_kind("ept", 0x182) == "write|kernel|not-present|guest-final"
    assert page_fault_event_kind("npt", (1 << 32) | 0x6) == "write|user|not-present|guest-final"
    assert page_fault_event_kind("shadow", 0x7) == "write|user"
