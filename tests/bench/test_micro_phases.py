"""How long the micro guest's phases take, marker to marker (moved out of the integration tests).

The integration tests check what is exact (markers, instruction counts); a
phase's duration depends on the host's load, so it is recorded here, under
``tox -e bench``: the rounds are whole boots (bpftrace attached, ROM start
to isa-debug-exit); extra_info holds every phase's duration per boot and the
duration ratio of the 4x-memory phase to phase 1 (about 4 on a quiet host).
"""

from __future__ import annotations

import secrets
import statistics
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from harness.image.micro import QEMU_EXIT_STATUS, build_micro_image
from tests.integration.test_micro_guest import (
    PHASES,
    _durations_ms,
    require_micro_host,
    run_micro,
)

pytestmark = pytest.mark.integration


def test_micro_phase_durations(benchmark: BenchmarkFixture, tmp_path: Path) -> None:
    """Five boots of the micro guest (ROM, markers traced); phase durations in extra_info."""
    require_micro_host()
    image = build_micro_image(tmp_path / "img", PHASES, token=secrets.randbelow(0xFFFF) + 1)
    per_boot: list[list[float]] = []

    def boot() -> None:
        work = tmp_path / f"run{len(per_boot)}"
        work.mkdir()
        run = run_micro(image, work, boot="rom", count_insns=False)
        assert run.exit_status == QEMU_EXIT_STATUS
        per_boot.append(_durations_ms(run))

    benchmark.pedantic(boot, rounds=5, iterations=1, warmup_rounds=0)
    ratios = [d[2] / d[0] for d in per_boot]
    benchmark.extra_info["phase_ms"] = {
        ph.name: [d[k] for d in per_boot] for k, ph in enumerate(PHASES)
    }
    benchmark.extra_info["ratio_4x_to_1x"] = ratios
    benchmark.extra_info["ratio_4x_to_1x_median"] = statistics.median(ratios)
