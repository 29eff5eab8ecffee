"""Shared test setup: integration tests need root and the real host stack.

On CI (CI=true) a missing prerequisite fails the run instead of skipping
quietly: a green run that tested nothing is worse than a red one.
"""

from __future__ import annotations

import os
import subprocess

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0 or os.environ.get("CI") == "true":
        return
    skip = pytest.mark.skip(reason="integration tests need root (libvirt, bpftrace, debootstrap)")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


def harness_domains() -> list[str]:
    """Every libvirt domain the harness may have created (prefix kvmh-)."""
    out = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [n for n in out.split() if n.startswith("kvmh-")]


def stray_tracers() -> list[str]:
    """Tracer processes (bpftrace, the libbpf backend's kvmtrace loader) still running."""
    out = subprocess.run(
        ["pgrep", "-a", "-x", "bpftrace|kvmtrace"], capture_output=True, text=True, check=False
    ).stdout
    return [line for line in out.splitlines() if line.strip()]
