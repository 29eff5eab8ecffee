"""Windows guests: a built Windows image, OVMF + TPM + Hyper-V, WinRM on a loopback forward.

Built for bare-metal runners (docs/WINDOWS.md): no Windows image can be had
on the project's own machines. The seam is the Linux one: readiness is the
guest's WinRM HTTPS listener answering with the certificate pinned at image
build time, and each phase is one guest command (cmd.exe) bracketed by
``kvm-marker.exe`` and run through the same phase runner as Linux guests
(:func:`harness.platform.linux._run_workload`), so timeouts, failures, a lost
connection and a VM gone away are handled and recorded the same way.

What the result says about the guest: ``image = "windows"``; its
``image_packages`` carry the OS, edition and build, the settings the image
build turned off, and the Hyper-V enlightenments this accelerator refused.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Literal

from harness import tracing
from harness.guest.base import GuestError
from harness.guest.winrm import Secret, WinrmGuest, WinrmTarget
from harness.host.facts import choose_accelerator
from harness.image import cache as image_cache
from harness.image.windows import (
    IMAGE_NAME,
    WindowsImage,
    WindowsImageError,
    cached_windows_image,
    read_password,
)
from harness.platform.base import (
    BootPlan,
    ChooseAccelerator,
    RunContext,
    WorkItem,
    boot_items,
    boot_name,
)
from harness.platform.linux import ConsoleWatch, _copy_if_exists, _run_workload
from harness.results import VmRecord, WorkloadRun
from harness.runstate import Teardown
from harness.spec import RunSpec, Suite, VmSpec
from harness.trace.parse import TraceSnapshot
from harness.trace.program import TraceTarget
from harness.trace.runner import Tracer
from harness.vm import lifecycle
from harness.vm.domain import DomainConfig, UefiBoot
from harness.vm.windows import WindowsDomain, dropped_note, remove_run_files

#: Placeholder ports `harness vm xml` shows (a run picks free ones).
PREVIEW_WINRM_PORT, PREVIEW_RDP_PORT = 5986, 3389


def windows_domain(
    vm: VmSpec,
    *,
    name: str,
    accelerator: str,
    run_dir: Path,
    boot: str,
    disk: Path,
    winrm_port: int,
    rdp_port: int | None,
) -> DomainConfig:
    """The domain config of one boot of a Windows VM (its files under ``run_dir``)."""
    accel: Literal["kvm", "tcg"] = "kvm" if accelerator == "kvm" else "tcg"
    win = WindowsDomain(
        name=name,
        accelerator=accel,
        memory_mib=vm.memory_mib,
        vcpus=vm.vcpus,
        disk=disk,
        nvram=run_dir / f"{boot}.VARS.fd",
        console_log=run_dir / f"{boot}.console.log",
        winrm_port=winrm_port,
        rdp_port=rdp_port if vm.rdp else None,
        secure_boot=vm.secure_boot,
        vcpu_pins=tuple(vm.pin_vcpus) if vm.pin_vcpus else None,
        emulator_pins=tuple(vm.pin_emulator) if vm.pin_emulator else None,
    )
    return DomainConfig(
        name=name,
        domain_type="kvm" if accel == "kvm" else "qemu",
        memory_mib=vm.memory_mib,
        vcpus=vm.vcpus,
        boot=UefiBoot(win),
        console_log=win.console_log,
        disk=disk,
    )


class WindowsPlatform:
    """Windows guests over WinRM. One boot per VM runs all of its workloads."""

    kind = "windows"

    def plan(
        self, suite: Suite, vm: VmSpec, runs: list[RunSpec], group: str | None
    ) -> list[BootPlan]:
        """``boots`` boots, each running every repetition of every run, in suite order."""
        items = tuple(boot_items(suite, runs))
        if not items:
            return []
        n = suite.boots(vm)
        return [
            BootPlan(vm=vm, items=items, name=boot_name(vm, i, n), group=group)
            for i in range(1, n + 1)
        ]

    def session(self, ctx: RunContext, plan: BootPlan) -> WindowsSession:
        """A session that boots ``plan.vm`` and runs its workloads over WinRM."""
        return WindowsSession(ctx, plan)

    def preview_config(
        self, vm: VmSpec, domain: str, run_dir: Path, accelerator: ChooseAccelerator
    ) -> tuple[DomainConfig, str]:
        """The Windows domain; the disk is a placeholder (with a comment) until it is built."""
        image = cached_windows_image()
        note = ""
        if image is None:
            note = (
                "<!-- no Windows image built here: `harness image build windows` with the "
                "Windows and virtio-win ISOs makes one (docs/WINDOWS.md) -->\n"
            )
            base = image_cache.images_root() / f"{IMAGE_NAME}-NOTBUILT" / "disk.qcow2"
        else:
            base = image.disk
        cfg = windows_domain(
            vm,
            name=domain,
            accelerator=accelerator(vm.accelerator),
            run_dir=run_dir,
            boot=vm.name,
            disk=run_dir / f"{vm.name}.qcow2" if image is not None else base,
            winrm_port=PREVIEW_WINRM_PORT,
            rdp_port=PREVIEW_RDP_PORT,
        )
        assert isinstance(cfg.boot, UefiBoot)
        return cfg, note + dropped_note(cfg.boot.domain)


class WindowsSession:
    """One boot of a Windows guest: overlay, NVRAM, TPM, domain, WinRM, then its workloads."""

    needs_tracer = False

    def __init__(self, ctx: RunContext, plan: BootPlan) -> None:
        self.ctx, self.plan = ctx, plan
        self.record: VmRecord | None = None
        self.target: TraceTarget | None = None
        self._guest: WinrmGuest | None = None
        self._running: lifecycle.RunningVm | None = None

    def boot(self, teardown: Teardown) -> None:
        """Image and password checked first (nothing boots without them), then the domain;
        ready once WinRM answers with the pinned certificate."""
        state, vm = self.ctx.state, self.plan.vm
        image = cached_windows_image()
        if image is None:
            raise WindowsImageError(
                f"VM {vm.name}: no Windows image is built on this host (fix: `harness image "
                "build windows --iso PATH --virtio-iso PATH`, see docs/WINDOWS.md)"
            )
        password = Secret(read_password())
        accel, reason = choose_accelerator(vm.accelerator, self.ctx.facts)
        token = state.new_token()
        win_domain = lifecycle.domain_name(state.result.run_id, self.plan.name)
        overlay = state.run_dir / f"{self.plan.name}.qcow2"
        cfg = windows_domain(
            vm, name=win_domain, accelerator=accel, run_dir=state.run_dir,
            boot=self.plan.name, disk=overlay, winrm_port=lifecycle.free_port(),
            rdp_port=lifecycle.free_port(),
        )
        assert isinstance(cfg.boot, UefiBoot)
        win = cfg.boot.domain
        _, dropped = win.enlightenments()
        record = VmRecord(
            name=vm.name,
            boot=self.plan.name,
            domain=win_domain,
            image="windows",
            image_digest=image.digest,
            image_packages=_guest_facts(image, dropped),
            accelerator=accel,
            accelerator_reason=reason,
            vcpus=vm.vcpus,
            memory_mib=vm.memory_mib,
            marker_token=token,
            group=self.plan.group,
        )
        with state.lock:
            state.result.vms.append(record)
        self.record = record
        state.check_cancel()
        lifecycle.create_overlay(image.disk, overlay)
        teardown.callback(overlay.unlink, missing_ok=True)
        kept = state.path.with_name(f"{state.path.stem}.{win.console_log.name}")
        record.console_log = str(kept)
        state.reporter.step(f"vm {vm.name}: starting {win_domain} (OVMF, TPM 2.0, {accel})")
        running, cfg = _start(self.ctx, cfg)
        assert isinstance(cfg.boot, UefiBoot)
        win = cfg.boot.domain
        teardown.callback(_forget_files, win)  # after the domain is gone (callbacks unwind)
        teardown.callback(_copy_if_exists, win.console_log, kept)
        teardown.callback(lifecycle.destroy, running)
        record.qemu_pid = running.pid
        target = WinrmTarget(
            "127.0.0.1", win.winrm_port, image.username, password, image.winrm_cert_sha256
        )
        try:
            guest = WinrmGuest.connect(target, time.monotonic() + vm.boot_timeout_s)
        except GuestError as exc:
            state.check_cancel()
            raise GuestError(
                f"{vm.name} did not answer WinRM within {vm.boot_timeout_s:.0f} s: {exc}"
            ) from exc
        teardown.callback(guest.close)
        self._guest, self._running = guest, running
        with state.lock:
            record.boot_to_ready_s = round((time.monotonic_ns() - running.started_ns) / 1e9, 3)
            state.save()
        state.reporter.step(f"vm {vm.name}: WinRM ready after {record.boot_to_ready_s:.1f} s")
        self.target = TraceTarget(vm=vm.name, pid=running.pid, token=token)

    def drive(self, tracer: Tracer | None) -> None:
        """Every repetition of every workload, phase by phase, in order (as Linux guests)."""
        assert self._guest is not None and self._running is not None
        assert self.record is not None and self.target is not None
        state, running = self.ctx.state, self._running
        domain = running.domain
        console = ConsoleWatch(running.console_log)  # no kernel panic line: VM state counts

        def health() -> str | None:
            return lifecycle.why_not_running(running) or console.panic()

        for i, item in enumerate(self.plan.items):
            state.check_cancel()
            ended = _run_workload(
                state, self._guest, item, self.target, tracer, self.plan.name, self.record,
                lambda: tracing.kvm_stats(domain), None, health,
            )
            if ended is not None:
                self._end_early(ended, self.plan.items[i + 1 :])
                return

    def _end_early(self, why: str, rest: tuple[WorkItem, ...]) -> None:
        """Record why this boot ends here and every work item it will not run."""
        state = self.ctx.state
        assert self.record is not None
        state.reporter.step(f"vm {self.plan.name}: ending this boot: {why}")
        with state.lock:
            self.record.ended_early = why
            for item in rest:
                state.result.runs.append(
                    WorkloadRun(
                        workload=item.workload.name,
                        vm=item.run.vm,
                        repetition=item.repetition,
                        params={**item.workload.defaults(), **item.run.params},
                        boot=self.plan.name,
                        warmup=item.warmup,
                        status="skipped",
                        reason=f"not run: its boot ended early: {why}",
                    )
                )
            state.save()

    def collect(self, snapshot: TraceSnapshot | None) -> None:
        """Nothing left: every phase fetched its trace when it ended."""


def _guest_facts(image: WindowsImage, dropped: dict[str, str]) -> dict[str, str]:
    facts = {
        "os": "windows",
        "edition": image.edition,
        "build": image.build,
        "iso_sha256": image.iso_sha256,
        "settings_off": ", ".join(image.settings),
    }
    if dropped:
        facts["hyperv_dropped"] = "; ".join(f"{k}: {v}" for k, v in dropped.items())
    return facts


def _start(ctx: RunContext, cfg: DomainConfig) -> tuple[lifecycle.RunningVm, DomainConfig]:
    """Start ``cfg``; if a forwarded port was taken meanwhile, again on new ports."""
    for attempt in range(1, 5):
        try:
            return lifecycle.start(ctx.conn, cfg), cfg
        except lifecycle.VmError as exc:
            if lifecycle.PORT_TAKEN not in str(exc) or attempt == 4:
                raise
            assert isinstance(cfg.boot, UefiBoot)
            win = dataclasses.replace(
                cfg.boot.domain, winrm_port=lifecycle.free_port(),
                rdp_port=lifecycle.free_port() if cfg.boot.domain.rdp_port else None,
            )
            cfg = dataclasses.replace(cfg, boot=UefiBoot(win))
    raise AssertionError("unreachable")


def _forget_files(win: WindowsDomain) -> None:
    """The per-run NVRAM is removed; the TPM state went with the transient domain."""
    left = remove_run_files(win)
    if left:
        raise lifecycle.VmError(
            f"{win.name}: left behind after teardown: {', '.join(map(str, left))}"
        )
