"""Shared test setup: integration tests need root and the real host stack.

Two kinds of "cannot run here", told apart on purpose:

* :func:`prerequisite_missing`: something ``./bootstrap`` installs or
  ``harness doctor --fix`` sets up (root, bpftrace, nasm, QEMU, clang and
  bpftool, a mounted tracefs, a read-writable /dev/kvm). On CI (CI=true)
  that fails the test: a green run that tested nothing is worse than a red one.
* :func:`host_difference_skip`: the host is genuinely another kind of host (no
  /dev/kvm at all, another MMU mode than the known answers are for, a kernel
  without a tracepoint). That stays a skip, everywhere, and every such skip
  is listed with its reason at the end of the run.

On CI, an integration test that skips any other way (a bare ``pytest.skip``
or ``skipif``) fails too, naming the two helpers: every skip the summary
counts there is a listed host difference.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Generator, Iterable
from pathlib import Path
from typing import NoReturn

import pytest

#: Where the kernel's tracepoints are listed once tracefs is mounted.
TRACEFS_EVENTS = Path("/sys/kernel/tracing/events")

#: Skip-reason prefixes; the summary and the CI rule read them back.
HOST_DIFFERENCE = "host difference: "
PREREQUISITE = "prerequisite missing: "


def on_ci() -> bool:
    """Whether this run is CI's (``CI=true``), where prerequisites must all be there."""
    return os.environ.get("CI") == "true"


def prerequisite_missing(reason: str) -> NoReturn:
    """Something this project's bootstrap provides is missing: fail on CI, skip elsewhere."""
    if on_ci():
        pytest.fail(
            f"{PREREQUISITE}{reason}. ./bootstrap (or `harness doctor --fix`) provides it on "
            "every CI machine, so the test must run, not skip",
            pytrace=False,
        )
    pytest.skip(f"{PREREQUISITE}{reason}")


def host_difference_skip(reason: str) -> NoReturn:
    """This host is of another kind than the test is for: skip, listed in the run's summary."""
    pytest.skip(f"{HOST_DIFFERENCE}{reason}")


@functools.cache
def host_mmu_mode() -> str:
    """The MMU mode KVM uses on this host (ept/npt/shadow/pvm/none), from the harness's facts."""
    from harness.host.facts import collect_host_facts

    return collect_host_facts().mmu_mode


def requires(
    *,
    root: bool = False,
    tools: Iterable[str] = (),
    kvm: bool = False,
    tracepoints: Iterable[str] = (),
    mmu_modes: Iterable[str] = (),
    why: str = "",
) -> None:
    """Skip or fail the running test unless the host has all of these, each by its kind.

    ``tools`` are commands ./bootstrap installs; ``kvm``: a read-writable
    /dev/kvm (its absence is a host difference, its permissions a
    prerequisite); ``tracepoints`` as ``system/event`` (an unmounted tracefs is
    a prerequisite, a kernel without the event a host difference);
    ``mmu_modes``: the modes the test's known answers hold for (``why`` says why).
    Also usable as ``pytest.mark.requires(...)`` with the same keywords.
    """
    if root and os.geteuid() != 0:
        prerequisite_missing("root (libvirt's system instance, bpftrace, /sys)")
    for tool in tools:
        if shutil.which(tool) is None:
            prerequisite_missing(f"{tool} is not installed")
    if kvm or mmu_modes:
        if not Path("/dev/kvm").exists():
            host_difference_skip("no /dev/kvm: this host has no KVM")
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            prerequisite_missing("/dev/kvm is not read-writable (chgrp kvm; chmod 660)")
    events = list(tracepoints)
    if events and not TRACEFS_EVENTS.is_dir():
        prerequisite_missing(f"tracefs is not mounted on {TRACEFS_EVENTS.parent}")
    for event in events:
        if not (TRACEFS_EVENTS / event).is_dir():
            host_difference_skip(f"this kernel has no tracepoint {event.replace('/', ':')}")
    modes = set(mmu_modes)
    if modes and host_mmu_mode() not in modes:
        host_difference_skip(
            f"MMU mode {host_mmu_mode()}; this test's known answers are for "
            f"{'/'.join(sorted(modes))}{f' ({why})' if why else ''}"
        )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires(**kw): host prerequisites of the test, see tests/conftest.py requires"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0 or on_ci():
        return
    skip = pytest.mark.skip(
        reason=f"{PREREQUISITE}root (integration tests drive libvirt, bpftrace, debootstrap)"
    )
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires"):
        requires(**mark.kwargs)


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not (report.skipped and on_ci() and "integration" in item.keywords):
        return
    if hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if reason.startswith(HOST_DIFFERENCE):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped on CI: {reason}\nOn CI an integration test runs or fails; skip through "
        "tests/conftest.py host_difference_skip() only for a genuinely different host."
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """List every host-difference skip with its reason (the other kinds fail on CI)."""
    listed = [
        (r.nodeid, _skip_reason(r))
        for r in terminalreporter.stats.get("skipped", [])
        if isinstance(r, pytest.TestReport)
    ]
    differences = [(n, why) for n, why in listed if why.startswith(HOST_DIFFERENCE)]
    if not differences:
        return
    terminalreporter.section("skipped: host differences")
    for nodeid, why in differences:
        terminalreporter.write_line(f"{nodeid}: {why.removeprefix(HOST_DIFFERENCE)}")


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
