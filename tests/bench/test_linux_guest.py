"""Boot-to-SSH time and the harness's own overhead per phase, on the default image.

Goals (checked by reading the saved benchmark, not asserted as timings):
boot-to-SSH at most 15 s under TCG; the per-phase overhead is the time a
phase costs beyond its command, compared with a bare SSH exec in the same run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from harness.image.linux import LinuxImage
from harness.platform.linux import run_linux_phase
from harness.spec import PhaseSpec, WorkloadSpec
from harness.trace import probes
from harness.trace.program import TraceTarget
from harness.trace.runner import Tracer
from tests.integration.conftest import Booted, booted_guest, vm_workdir

pytestmark = pytest.mark.integration

NOOP = WorkloadSpec(name="noop", guest="linux", phases=[PhaseSpec(name="noop", command="true")])


@pytest.fixture
def workdir() -> Iterator[Path]:
    with vm_workdir("bench-") as path:
        yield path


def test_boot_to_ssh(benchmark: BenchmarkFixture, linux_image: LinuxImage, workdir: Path) -> None:
    """Domain start to SSH answering, through libvirtd, under the auto accelerator."""
    boots = iter(range(100))

    def boot() -> None:
        Booted(linux_image, workdir, f"boot{next(boots)}").close()

    benchmark.pedantic(boot, rounds=3, iterations=1, warmup_rounds=0)


@pytest.fixture(scope="module")
def booted(linux_image: LinuxImage) -> Iterator[Booted]:
    with booted_guest(linux_image, "phase") as b:
        yield b


@pytest.mark.benchmark(group="phase-overhead")
def test_bare_ssh_exec(benchmark: BenchmarkFixture, booted: Booted) -> None:
    """The floor: one `true` over the open SSH connection."""
    result = benchmark(booted.guest.run, "true", timeout_s=30)
    assert result.exit_status == 0


@pytest.mark.benchmark(group="phase-overhead")
def test_harness_phase_untraced(benchmark: BenchmarkFixture, booted: Booted) -> None:
    """A `true` phase through the harness's path: markers around it, metrics, KVM stats."""
    target = TraceTarget(vm="bench", pid=booted.vm.pid, token=0x0BE0)
    numbers = iter(range(1, 60000))
    phase = benchmark(
        lambda: run_linux_phase(
            booted.guest, NOOP, NOOP.phases[0], {}, next(numbers), target, None, lambda: None
        )
    )
    assert phase.status == "ok"


@pytest.mark.benchmark(group="phase-overhead")
def test_harness_phase_traced(benchmark: BenchmarkFixture, booted: Booted, tmp_path: Path) -> None:
    """The same with the tracer attached: host markers plus one aggregate dump per phase."""
    target = TraceTarget(vm="bench", pid=booted.vm.pid, token=0x0BE1)
    numbers = iter(range(1, 60000))
    with Tracer(probes.select(["default"]), [target], workdir=tmp_path) as tracer:
        tracer.start()

        def one_phase() -> None:
            phase = run_linux_phase(
                booted.guest, NOOP, NOOP.phases[0], {}, next(numbers), target, tracer, lambda: None
            )
            assert phase.status == "ok"
            tracer.snapshot()

        benchmark(one_phase)
        tracer.stop()
