"""The tracefs peer (tests/bench/peer_tracefs.py) recording the micro guest for real."""

from __future__ import annotations

import mmap
import struct
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.image.micro import (
    MARKER_LEAF,
    QEMU_EXIT_STATUS,
    MicroImage,
    MicroPhase,
    build_micro_image,
    expected_emulated_insns,
)
from tests.bench.peer_tracefs import INSTANCE_PREFIX, TRACEFS, TracefsRecorder
from tests.conftest import host_mmu_mode, requires
from tests.integration.micro_qemu import PausedMicroVM, micro_vm
from tests.integration.test_micro_guest import require_micro_host

pytestmark = pytest.mark.integration

# Small on purpose: ~25 k kvm events, far below what the ring buffer holds,
# so nothing may be lost and every marker must be in the recording.
PHASES = (MicroPhase("one", 1), MicroPhase("two", 2))


@pytest.fixture()
def image(tmp_path: Path) -> MicroImage:
    require_micro_host()
    return build_micro_image(tmp_path / "img", PHASES, token=0x5EE5)


@pytest.fixture()
def qemu(image: MicroImage, tmp_path: Path) -> Iterator[PausedMicroVM]:
    with micro_vm(image, tmp_path) as vm:
        yield vm


def _marker_records(image: MicroImage) -> list[bytes]:
    # kvm_cpuid's payload starts with `function` then `index` (u32 each, see its format).
    ks = [*range(1, len(image.phases) + 1), 0]
    return [struct.pack("<II", MARKER_LEAF, (image.token << 16) | k) for k in ks]


def event_types(raw: bytes, page_size: int = mmap.PAGESIZE) -> Counter[int]:
    """Events per type id in raw ring-buffer pages, as trace_pipe_raw gives them.

    A page: u64 timestamp, u64 commit (low 20 bits: bytes of events), then
    events, each a u32 header (type_len: low 5 bits) as kernel/trace/ring_buffer.c
    writes them: type_len 1..28: that many 4-byte words of data follow; 0: the
    next u32 is the length (itself included), data after it; 29: padding of
    that length (with no time delta: the page's end); 30 and 31: a time
    extension or stamp, 8 bytes in all. Data starts with the u16 common_type.
    """
    assert len(raw) % page_size == 0, "trace_pipe_raw is read in whole pages"
    counts: Counter[int] = Counter()
    for start in range(0, len(raw), page_size):
        page = raw[start : start + page_size]
        pos, end = 16, 16 + (int.from_bytes(page[8:16], "little") & 0xFFFFF)
        while pos < end:
            (header,) = struct.unpack_from("<I", page, pos)
            type_len, delta = header & 0x1F, header >> 5
            if type_len in (30, 31):
                pos += 8
                continue
            if type_len == 29 and delta == 0:
                break
            if type_len in (0, 29):
                (length,) = struct.unpack_from("<I", page, pos + 4)
                data, pos = pos + 8, pos + 4 + length
            else:
                data, pos = pos + 4, pos + 4 + 4 * type_len
            if type_len != 29:
                counts[struct.unpack_from("<H", page, data)[0]] += 1
    return counts


def event_id(event: str) -> int:
    """The type id of tracepoint ``system/name`` (the same in every tracefs instance)."""
    return int((TRACEFS / "events" / event / "id").read_text())


def _instances() -> list[str]:
    return sorted(p.name for p in (TRACEFS / "instances").glob(f"{INSTANCE_PREFIX}*"))


@pytest.mark.timeout(120)
def test_records_the_guests_kvm_events(
    image: MicroImage, qemu: PausedMicroVM, tmp_path: Path
) -> None:
    out = tmp_path / "rec"
    before = _instances()
    with TracefsRecorder(out, ("kvm", "kvmmmu"), pid=qemu.pid) as rec:
        assert rec.stats().pids and qemu.pid in rec.stats().pids
        qemu.cont()
        status = qemu.wait()
    stats = rec.stats()
    assert status == QEMU_EXIT_STATUS
    data = b"".join(p.read_bytes() for p in sorted(out.glob("cpu*.raw")))
    assert len(data) == stats.bytes_written > 0
    assert stats.lost == 0, stats
    by_type = event_types(data)
    assert sum(by_type.values()) == stats.read_events
    # Each guest marker and the exit once; on PVM every instruction the guest ran.
    assert by_type[event_id("kvm/kvm_cpuid")] == len(image.phases) + 1
    assert by_type[event_id("kvm/kvm_pio")] == 1
    if host_mmu_mode() == "pvm":
        whole_run = sum(expected_emulated_insns(image.phases).values())
        assert by_type[event_id("kvm/kvm_emulate_insn")] == whole_run
    for record in _marker_records(image):
        assert data.count(record) == 1, record.hex()
    assert _instances() == before, "the recorder must remove its tracefs instance"


@pytest.mark.timeout(120)
def test_pid_filter_excludes_other_processes(
    image: MicroImage, qemu: PausedMicroVM, tmp_path: Path
) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with TracefsRecorder(tmp_path / "rec", ("kvm",), pid=sleeper.pid) as rec:
            qemu.cont()
            assert qemu.wait() == QEMU_EXIT_STATUS
    finally:
        sleeper.kill()
        sleeper.wait()
    data = b"".join(p.read_bytes() for p in (tmp_path / "rec").glob("cpu*.raw"))
    assert rec.stats().read_events == 0
    for record in _marker_records(image):
        assert record not in data


def test_bad_system_is_named(tmp_path: Path) -> None:
    requires(tracepoints=("kvm/kvm_cpuid",))
    with pytest.raises(ValueError, match="no event system 'kvmx'"):
        TracefsRecorder(tmp_path, ("kvmx",))
