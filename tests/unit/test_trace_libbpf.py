"""The libbpf backend's pure parts: catalogue <-> C sources, availability, configuration, choice."""

from __future__ import annotations

import dataclasses
import re
import struct
from pathlib import Path

import pytest

from harness.trace import backend as B
from harness.trace import libbpf as L
from harness.trace import probes as P
from harness.trace.parse import parse_stack_key, strip_tracer_frames
from harness.trace.program import ProgramError, TraceTarget, collected_depth, generate
from tests.unit.test_trace_probes import RICH

T1 = TraceTarget("vm-a", 1111, 7)
T2 = TraceTarget("vm-b", 2222, 0xFFFF)
BTF_TYPES = frozenset(f"btf_trace_{p.name}" for p in P.CATALOGUE if p.kind == "tracepoint")
BUILT = L.LibbpfBuild(loader=Path("/nonexistent/kvmtrace"), digest="d" * 64,
                      btf=Path("/sys/kernel/btf/vmlinux"))


def lb_status(names: list[str] | None = None) -> list[P.ProbeStatus]:
    probes = P.CATALOGUE if names is None else [P.get(n) for n in names]
    return L.availability(probes, RICH, BTF_TYPES, None)


def test_every_catalogue_probe_has_a_bpf_program_and_a_loader_name() -> None:
    """The C sources and the catalogue name the same probes (ids come from the catalogue)."""
    bpf = (L.SOURCE_DIR / "kvmtrace.bpf.c").read_text()
    loader = (L.SOURCE_DIR / "loader.c").read_text()
    programs = set(re.findall(r"COUNT_(?:TP|FN)\((\w+)\)", bpf))
    programs |= set(re.findall(r"int (?:BPF_PROG\()?tp_(\w+)[,(]", bpf))
    assert programs - {"name"} == {p.name for p in P.CATALOGUE}  # "name": the macros
    assert set(re.findall(r"P\((\w+)\)", loader)) - {"n"} == {p.name for p in P.CATALOGUE}
    # The maps the loader prints are the ones the parser and correlator read.
    printed = set(re.findall(r'print_(?:counter_map|stacks)\("(\w+)"', loader)) | {
        "gphase", "hphase", "evt", "lat", "dump_done"}
    from harness.trace.program import RESULT_MAPS
    assert set(RESULT_MAPS) | {"dump_done"} == printed


def test_probe_ids_header_is_the_catalogue_order() -> None:
    lines = L.probe_ids_header().splitlines()[1:]
    assert lines == [f"#define PROBE_{p.name} {i}" for i, p in enumerate(P.CATALOGUE)]


def test_attach_specs() -> None:
    assert L.attach_spec(P.get("kvm_emulate_insn")) == "tp_btf/kvm_emulate_insn"
    assert L.attach_spec(P.get("kvm_mmu_get_page")) == "tp_btf/kvm_mmu_get_page"
    # Its exit reason is not a raw tracepoint argument: the formatted record has it.
    assert L.attach_spec(P.get("kvm_exit")) == "tracepoint/kvm/kvm_exit"
    assert L.attach_spec(P.get("kvm_mmu_load")) == "fentry/kvm_mmu_load"


def test_availability_on_a_rich_host_attaches_everything() -> None:
    sts = lb_status()
    assert all(s.available for s in sts), [s.reason for s in sts if not s.available]
    assert {s.attach for s in sts if s.probe.kind != "tracepoint"} == {
        f"fentry/{p.target}" for p in P.CATALOGUE if p.kind != "tracepoint"}


def test_availability_says_why_not() -> None:
    no_btf_tp = L.availability([P.get("kvm_cr")], RICH, frozenset(), None)[0]
    assert not no_btf_tp.available and "btf_trace_kvm_cr" in no_btf_tp.reason
    # kvm_exit is a classic tracepoint: no raw tracepoint type needed.
    assert L.availability([P.get("kvm_exit")], RICH, frozenset(), None)[0].available
    refused = L.availability([P.get("kvm_mmu_load")], RICH, BTF_TYPES, "EPERM")[0]
    assert not refused.available and "refused" in refused.reason and "EPERM" in refused.reason
    no_fn = dataclasses.replace(RICH, btf_functions=frozenset())
    missing = L.availability([P.get("vmx_load_mmu_pgd")], no_fn, BTF_TYPES, None)[0]
    assert not missing.available and "not in kernel or module BTF" in missing.reason
    no_tp = dataclasses.replace(RICH, tracepoints=frozenset())
    assert "not on this kernel" in L.availability([P.get("kvm_cr")], no_tp, BTF_TYPES,
                                                  None)[0].reason
    user = dataclasses.replace(RICH, is_root=False)
    assert "not root" in L.availability([P.get("kvm_cr")], user, BTF_TYPES, None)[0].reason
    pvm = dataclasses.replace(RICH, mmu_mode="pvm")
    assert "does not fire" in L.availability([P.get("kvm_exit")], pvm, BTF_TYPES, None)[0].reason


def test_configuration_lists_targets_probes_stacks_and_latencies() -> None:
    prog = L.generate(lb_status(), [T1, T2], BUILT, session=42,
                      stacks=["kvm_mmu_get_page"], stack_depth=20)
    lines = prog.text.splitlines()
    assert "session 42" in lines
    assert "target 1111 7" in lines and "target 2222 65535" in lines
    assert {ln.split()[1] for ln in lines if ln.startswith("probe ")} == {
        p.name for p in P.CATALOGUE}
    assert "stack kvm_mmu_get_page" in lines
    assert f"stack_depth {collected_depth(20)}" in lines
    assert "latency 0" in lines and "latency 1" in lines
    assert prog.backend == "libbpf" and prog.stack_depth == 20
    assert prog.latencies == (0, 1)


def test_template_digest_ignores_identity_but_not_shape_or_backend() -> None:
    sts = lb_status(["kvm_cpuid", "kvm_exit"])
    a = L.generate(sts, [T1], BUILT, session=1)
    b = L.generate(sts, [TraceTarget("other", 999, 3)], BUILT, session=777)
    assert a.sha256 != b.sha256 and a.template_sha256 == b.template_sha256
    assert L.generate(sts, [T1, T2], BUILT).template_sha256 != a.template_sha256
    other_build = dataclasses.replace(BUILT, digest="e" * 64)
    assert L.generate(sts, [T1], other_build, session=1).template_sha256 != a.template_sha256
    bt = generate([P.ProbeStatus(s.probe, True, "", f"tracepoint:{s.probe.target}")
                   for s in sts], [T1], session=1)
    assert bt.template_sha256 != a.template_sha256


def test_configuration_refuses_bad_input() -> None:
    many = [TraceTarget(f"v{i}", 100 + i, 1 + i) for i in range(L.MAX_TARGETS + 1)]
    with pytest.raises(ProgramError, match="at most 16"):
        L.generate(lb_status(), many, BUILT)
    with pytest.raises(ProgramError, match="not one of the selected probes"):
        L.generate(lb_status(["kvm_cpuid"]), [T1], BUILT, stacks=["kvm_exit"])
    with pytest.raises(ProgramError, match="is listed twice"):
        L.generate(lb_status(), [T1, T1], BUILT)


def test_unavailable_probes_are_listed_not_configured() -> None:
    sts = L.availability([P.get("kvm_cpuid"), P.get("kvm_mmu_load")], RICH, BTF_TYPES, "EPERM")
    prog = L.generate(sts, [T1], BUILT)
    assert "probe kvm_mmu_load" not in prog.text
    assert [s.probe.name for s in prog.not_attached] == ["kvm_mmu_load"]


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def test_kernel_build_id_from_notes(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.write_bytes(_note(b"Xen\0", 6, b"\1\2\3") + _note(b"GNU\0", 3, bytes(range(20))))
    assert L.kernel_build_id(notes) == bytes(range(20)).hex()
    assert L.kernel_build_id(tmp_path / "missing") == ""


def test_tracer_frames_are_dropped_and_the_rest_kept() -> None:
    bt = ("__traceiter_kvm_cpuid+114", "kvm_cpuid+496", "em_cpuid+209")
    lb = ("bpf_prog_d5d9_tp_kvm_cpuid+1020", "bpf_trace_run8+313", "kvm_cpuid+496",
          "em_cpuid+209")
    assert strip_tracer_frames(bt) == strip_tracer_frames(lb) == ("kvm_cpuid+496",
                                                                   "em_cpuid+209")
    assert strip_tracer_frames(lb, depth=1) == ("kvm_cpuid+496",)
    # Only leading (innermost) frames: a BPF helper deeper in a real path stays.
    assert strip_tracer_frames(("f+1", "bpf_prog_x+2")) == ("f+1", "bpf_prog_x+2")
    key, frames = parse_stack_key("1,2,0,3,\n    bpf_prog_ab+1\n    bpf_trace_run2+3\n    f+4\n")
    assert key == (1, 2, 0, 3) and frames == ("f+4",)


def test_choose_falls_back_to_bpftrace_without_btf(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    missing = tmp_path / "no-btf"
    monkeypatch.setenv("HARNESS_LIBBPF_BTF", str(missing))
    choice = B.choose("auto")
    assert choice.backend.name == "bpftrace"
    assert "libbpf unavailable" in choice.reason and str(missing) in choice.reason
    with pytest.raises(L.LibbpfUnavailable, match="not found"):
        B.choose("libbpf")
    assert B.choose("bpftrace").reason == "bpftrace was asked for"
    with pytest.raises(ValueError, match="choose one of auto, bpftrace, libbpf"):
        B.choose("perf")


def test_missing_build_tools_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(L.shutil, "which", lambda tool: None)
    assert {"clang", "bpftool", "gcc"} <= set(L.missing_tools())
    monkeypatch.setenv("HARNESS_LIBBPF_BTF", __file__)  # exists; the tools do not
    with pytest.raises(L.LibbpfUnavailable, match=r"apt-get install .*clang"):
        L.build()
