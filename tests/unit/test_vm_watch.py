"""Watching a VM while a phase runs: what a gone, stopped or panicked guest looks like,
against libvirt's test driver (test:///default) and a console log file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from harness.platform.linux import ConsoleWatch
from harness.vm import lifecycle
from harness.vm.lifecycle import RunningVm, why_not_running

DOMAIN = """<domain type='test'><name>{name}</name><memory>65536</memory>
<os><type>hvm</type></os></domain>"""


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    c = libvirt.open("test:///default")
    yield c
    c.close()


def running(conn: libvirt.virConnect, name: str, tmp_path: Path) -> RunningVm:
    dom = conn.createXML(DOMAIN.format(name=name), 0)
    return RunningVm(name, dom, 999999, tmp_path / "console.log", None, None, 0)


def test_a_running_domain_is_fine(conn: libvirt.virConnect, tmp_path: Path) -> None:
    assert why_not_running(running(conn, "kvmh-watch-ok", tmp_path)) is None


def test_a_destroyed_transient_domain_is_gone_with_libvirts_reason(
    conn: libvirt.virConnect, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = running(conn, "kvmh-watch-gone", tmp_path)
    (tmp_path / "kvmh-watch-gone.log").write_text(
        "starting up\n2026-12-02 06:42:53.0+0000: shutting down, reason=destroyed\n"
    )
    monkeypatch.setattr(lifecycle, "QEMU_LOG_DIR", tmp_path)
    vm.domain.destroy()
    why = why_not_running(vm)
    assert why is not None
    assert "kvmh-watch-gone is gone: destroyed from outside the harness" in why
    assert "reason=destroyed" in why


def test_a_paused_domain_is_not_running(conn: libvirt.virConnect, tmp_path: Path) -> None:
    vm = running(conn, "kvmh-watch-paused", tmp_path)
    vm.domain.suspend()
    assert "is paused" in (why_not_running(vm) or "")


def test_console_watch_finds_a_panic_split_across_reads(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("[    1.0] booting\nharness-init: ready\n")
    watch = ConsoleWatch(log)
    assert watch.panic() is None
    with log.open("a") as f:
        f.write("[    5.8] Kernel panic - not sy")
    assert watch.panic() is None  # half a line so far
    with log.open("a") as f:
        f.write("ncing: sysrq triggered crash\n")
    why = watch.panic()
    assert why is not None and "Kernel panic - not syncing: sysrq triggered crash" in why
    assert watch.panic() == why  # once seen, always


def test_console_watch_without_a_file(tmp_path: Path) -> None:
    assert ConsoleWatch(tmp_path / "missing.log").panic() is None


def test_a_domain_caught_shutting_down_on_its_way_out_is_reported_gone(
    conn: libvirt.virConnect, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `virsh destroy` from outside: libvirt shows the transient domain as "shutting down"
    # for a moment (seen in a fault test under load), then it is gone. The report must be
    # the end state, not the moment in between.
    vm = running(conn, "kvmh-watch-going", tmp_path)
    real = vm.domain
    asked = {"n": 0}

    class Passing:
        def state(self) -> list[int]:
            asked["n"] += 1
            if asked["n"] < 3:
                return [libvirt.VIR_DOMAIN_SHUTDOWN, 0]
            if real.isActive():
                real.destroy()
            return list(real.state())  # raises: no domain

    monkeypatch.setattr(vm, "domain", Passing())
    why = why_not_running(vm)
    assert why is not None and "kvmh-watch-going is gone" in why and asked["n"] == 3
