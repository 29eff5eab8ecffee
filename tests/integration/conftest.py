"""Fixtures for tests against real libvirtd, QEMU, SSH and bpftrace."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.image.linux import LinuxImage, build_linux_image
from tests.conftest import harness_domains, stray_tracers

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def linux_image() -> LinuxImage:
    """The default guest image, built once (cached across sessions by recipe digest)."""
    return build_linux_image(progress=print)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After all integration tests: no harness domain and no bpftrace may remain."""
    yield
    assert harness_domains() == [], "the harness left libvirt domains behind"
    assert stray_tracers() == [], "a bpftrace process outlived its test"


SUITE = """\
name = "{name}"
repetitions = {reps}

[[vms]]
name = "linux"
image = "linux"
vcpus = 2
memory_mib = 768
accelerator = "auto"
boot_timeout_s = 90

{runs}

[trace]
enabled = {trace}
probes = ["default"]
"""


def write_suite(
    dir_: Path, runs: str, *, name: str = "itest", reps: int = 1, trace: bool = True
) -> Path:
    """A suite file in ``dir_`` using the shipped workloads."""
    path = dir_ / f"{name}.toml"
    path.write_text(SUITE.format(name=name, reps=reps, runs=runs, trace=str(trace).lower()))
    return path
