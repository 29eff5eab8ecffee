"""Fixtures of the fault-injection suite: each test injects one real fault into a
real run (libvirtd, QEMU, guest, bpftrace) and checks the result file, what is
left on the host, and that the next run succeeds. See docs/RELIABILITY.md."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from harness.image.linux import LinuxImage, build_linux_image
from tests.leaks import host_state, leaks_since

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def nothing_left_behind_by_fault() -> Iterator[None]:
    """After every fault test: no harness domain, QEMU, tracer or run directory that it left.

    Counted from what existed before the test and what outlived the process
    that made it (tests/leaks.py), so that other harness users of a shared
    development host do not fail it; on CI nothing else runs.
    """
    before = host_state()
    yield
    deadline = time.monotonic() + 10  # libvirtd reaps an autodestroy domain asynchronously
    while (leaks := leaks_since(before)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not leaks, f"the fault left these behind: {leaks}"


@pytest.fixture(scope="session")
def guest_image() -> LinuxImage:
    """The default Linux image, built once (cached by recipe digest): for the guest,
    SSH and libvirtd fault tests (tests/faults/helpers_b.py)."""
    return build_linux_image(progress=print)
