"""The tracefs peer (tests/bench/peer_tracefs.py) recording the micro guest for real."""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.image.micro import (
    MARKER_LEAF,
    QEMU_EXIT_STATUS,
    MicroImage,
    MicroPhase,
    build_micro_image,
)
from tests.bench.peer_tracefs import INSTANCE_PREFIX, TRACEFS, TracefsRecorder
from tests.conftest import requires
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
    assert stats.read_events > 1000  # ~25 k expected on PVM (each instruction)
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
