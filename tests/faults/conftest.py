"""Fixtures of the fault-injection suite: each test injects one real fault into a
real run (libvirtd, QEMU, guest, bpftrace) and checks the result file, what is
left on the host, and that the next run succeeds. See docs/RELIABILITY.md."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from harness.image.linux import LinuxImage, build_linux_image
from tests.conftest import harness_domains, stray_tracers

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def nothing_left_behind_by_fault() -> Iterator[None]:
    """After every fault test: no harness domain and no tracer process that it added.

    Compared with what existed before the test, so that other harness users of
    a shared development host do not fail it; on CI nothing else runs.
    """
    domains, tracers = set(harness_domains()), set(stray_tracers())
    yield
    deadline = time.monotonic() + 10  # libvirtd reaps an autodestroy domain asynchronously
    while True:
        new_domains = set(harness_domains()) - domains
        new_tracers = set(stray_tracers()) - tracers
        if not (new_domains or new_tracers) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not new_domains, f"the fault left libvirt domains behind: {sorted(new_domains)}"
    assert not new_tracers, f"a tracer process outlived the fault: {sorted(new_tracers)}"


@pytest.fixture(scope="session")
def guest_image() -> LinuxImage:
    """The default Linux image, built once (cached by recipe digest): for the guest,
    SSH and libvirtd fault tests (tests/faults/helpers_b.py)."""
    return build_linux_image(progress=print)
