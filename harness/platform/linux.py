"""Linux guests: the cached Debian image, direct kernel boot, SSH on a loopback forward.

Readiness is SSH answering. Each phase is one guest command bracketed by
host markers (the harness's getpriority) and guest markers (``kvm-marker``,
a cpuid); its trace is fetched from the tracer right after it ends.

While a command runs, the harness watches the VM (its libvirt state and the
console for a kernel panic). What happens after a phase that did not
succeed (docs/RELIABILITY.md):

* ``failed`` (non-zero exit): the rest of that repetition is not run (listed
  in ``not_run``); the boot goes on with its next work item.
* ``timeout``: what is left of the phase's command (its whole process group:
  a flood, a process ignoring SIGTERM) is killed in the guest and the boot
  goes on with its next work item; where that kill cannot be made sure of, the
  guest's state is unknown, so the rest of the boot is skipped (recorded
  ``skipped`` with the reason) and the VM destroyed; the suite goes on with
  its next boot.
* ``error`` with the VM gone (destroyed, crashed, kernel panic) or the SSH
  connection dropped and the guest not answering again: as a timeout.
* ``error`` with the SSH connection dropped but the guest answering again
  (reconnect, bounded): what is left of the phase's command is killed and the
  boot goes on with its next work item.
* libvirtd lost: as a timeout, and the run stops (no VM can be started or
  destroyed on the lost connection; ``lifecycle.destroy`` destroys the domain
  through a new connection, or kills its QEMU if no libvirtd answers).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import libvirt

from harness import metrics, tracing
from harness.guest.base import AbortCheck, Guest, GuestError, GuestGone, GuestLost, GuestTimeout
from harness.guest.identity import GuestIdentity, try_read_identity
from harness.guest.ssh import SshGuest
from harness.host.facts import choose_accelerator
from harness.image import cache as image_cache
from harness.image.kernel import (
    KernelVariant,
    build_kernel_variant,
    cached_variant,
    file_sha256,
    kernel_release,
)
from harness.image.linux import (
    IMAGE_NAME,
    ImageBuildError,
    LinuxImage,
    build_linux_image,
    cached_linux_image,
    load_recipe,
    recipe_digest,
)
from harness.platform.base import (
    BootPlan,
    ChooseAccelerator,
    RunContext,
    WorkItem,
    boot_items,
    boot_name,
    with_host_memory,
    with_pinning,
)
from harness.results import PhaseResult, VmRecord, WorkloadRun
from harness.runstate import RunState, Teardown
from harness.spec import PhaseSpec, RunSpec, Suite, VmSpec, WorkloadSpec
from harness.trace import kvmstats
from harness.trace.parse import TraceSnapshot
from harness.trace.program import TraceTarget
from harness.trace.runner import Tracer
from harness.vm import configs, lifecycle
from harness.vm.domain import DomainConfig
from harness.vm.lifecycle import make_private_dir

TAIL_CHARS = 2000
#: How long a guest whose SSH connection dropped gets to answer again; ``HARNESS_RECONNECT_S``
#: (seconds, > 0) sets another, e.g. for a test whose guest is known never to answer.
RECONNECT_S = 20.0
RECONNECT_ENV = "HARNESS_RECONNECT_S"


def reconnect_s() -> float:
    """RECONNECT_S, or ``$HARNESS_RECONNECT_S`` where that is a positive number."""
    try:
        value = float(os.environ.get(RECONNECT_ENV, ""))
    except ValueError:
        return RECONNECT_S
    return value if value > 0 else RECONNECT_S


#: After a dropped connection, how long the VM's state gets to show why (a destroyed
#: domain closes its sockets a moment before libvirt reports it gone).
GONE_GRACE_S = 3.0
#: What a guest kernel prints on the console when it panics (at any loglevel).
PANIC_LINE = "Kernel panic - not syncing"


class LinuxPlatform:
    """Linux guests over SSH. One boot per VM runs all of its workloads."""

    kind = "linux"

    def __init__(self) -> None:
        self._image_lock = threading.Lock()
        self._ports_lock = threading.Lock()
        self._ports: set[int] = set()

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

    def session(self, ctx: RunContext, plan: BootPlan) -> LinuxSession:
        """A session that boots ``plan.vm`` and runs its workloads over SSH."""
        return LinuxSession(self, ctx, plan)

    def image(
        self, progress: Callable[[str], None], cancel: threading.Event | None = None
    ) -> LinuxImage:
        """The default image, built once even when several VMs boot at the same time;
        a build stops once ``cancel`` is set (the run is being torn down)."""
        with self._image_lock:
            return build_linux_image(progress=progress, cancel=cancel)

    def kernel_variant(
        self, package: str, progress: Callable[[str], None], cancel: threading.Event | None
    ) -> KernelVariant:
        """The default image's variant for a Debian kernel package, built on first use."""
        with self._image_lock:
            return build_kernel_variant(package, progress=progress, cancel=cancel)

    def ssh_port(self) -> int:
        """A free loopback port no other VM of this process was given (they boot at once)."""
        with self._ports_lock:
            while (port := lifecycle.free_port()) in self._ports:
                pass
            self._ports.add(port)
            return port

    def preview_config(
        self, vm: VmSpec, domain: str, run_dir: Path, accelerator: ChooseAccelerator
    ) -> tuple[DomainConfig, str]:
        """The Linux domain; image paths are placeholders (with a comment) until it is built."""
        image = cached_linux_image()
        if image is not None:
            kernel, initrd, cmdline, note = image.kernel, image.initrd, image.cmdline, ""
        else:
            where = image_cache.entry_dir(IMAGE_NAME, recipe_digest())
            kernel, initrd = where / "vmlinuz", where / "initrd.cpio"
            cmdline = load_recipe().cmdline
            note = "<!-- image not built yet: `harness image build linux` creates these paths -->\n"
        if vm.kernel is not None:
            kernel, initrd = vm.kernel, vm.initrd  # copied into the run directory at boot
        elif vm.kernel_package is not None:
            try:
                variant = cached_variant(vm.kernel_package)
            except ImageBuildError as exc:
                variant, note = None, f"{note}<!-- {exc} -->\n"
            if variant is not None:
                kernel, initrd = variant.kernel, variant.initrd
            else:
                kernel, initrd = Path("KERNEL-VARIANT/vmlinuz"), Path("KERNEL-VARIANT/initrd.cpio")
                note += (f"<!-- kernel variant not built yet: `harness image build linux "
                         f"--kernel-package {vm.kernel_package}` makes it -->\n")
        cmdline = vm.cmdline or cmdline
        cfg = configs.linux_config(
            name=domain,
            accelerator=accelerator(vm.accelerator),
            memory_mib=vm.memory_mib,
            vcpus=vm.vcpus,
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
            overlay=run_dir / f"{vm.name}.qcow2",
            console_log=run_dir / f"{vm.name}.console.log",
            ssh_port=2222,
            balloon=vm.balloon,
        )
        return with_pinning(cfg, vm), note


class LinuxSession:
    """One boot of a Linux guest: overlay, domain, SSH, then its workloads phase by phase."""

    needs_tracer = False

    def __init__(self, platform: LinuxPlatform, ctx: RunContext, plan: BootPlan) -> None:
        self.platform, self.ctx, self.plan = platform, ctx, plan
        self.record: VmRecord | None = None
        self.target: TraceTarget | None = None
        self._guest: SshGuest | None = None
        self._running: lifecycle.RunningVm | None = None

    def boot(self, teardown: Teardown) -> None:
        """Overlay, domain, SSH: ready once the guest answers SSH."""
        state, vm = self.ctx.state, self.plan.vm
        rep = state.reporter
        accel, reason = choose_accelerator(vm.accelerator, self.ctx.facts)
        rep.step(
            f"vm {vm.name}: image linux: checking cache (builds from Debian packages on first use)"
        )
        image = self.platform.image(rep.step, state.cancel)
        kernel = self._kernel(image)
        token = state.new_token()
        record = VmRecord(
            name=vm.name,
            boot=self.plan.name,
            domain=lifecycle.domain_name(state.result.run_id, self.plan.name),
            image="linux",
            # The root file system's recipe: a guest kernel under test is not a different
            # image (compare lists it under "what changed", from guest_identity).
            image_digest=image.digest,
            image_packages={**image.packages, "kernel": kernel.release},
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
        running = self._start(image, kernel, record, teardown)
        guest = _wait_for_ssh(running, image, vm, state, kernel)
        teardown.callback(guest.close)
        self._guest, self._running = guest, running
        ready_s = round((time.monotonic_ns() - running.started_ns) / 1e9, 3)
        identity = guest_identity(guest, kernel, image)
        with state.lock:
            record.boot_to_ready_s = ready_s
            record.guest_identity = identity
            state.save()
        rep.step(
            f"vm {vm.name}: SSH ready after {record.boot_to_ready_s:.1f} s ({accel}: {reason})"
        )
        self.target = TraceTarget(vm=vm.name, pid=running.pid, token=token)

    def _kernel(self, image: LinuxImage) -> BootKernel:
        """The kernel this boot runs: the image's, a Debian package's variant, or a file."""
        vm, state = self.plan.vm, self.ctx.state
        if vm.kernel_package is not None:
            state.reporter.step(
                f"vm {vm.name}: kernel package {vm.kernel_package}: checking the cache "
                "(downloaded and built on first use)"
            )
            variant = self.platform.kernel_variant(
                vm.kernel_package, state.reporter.step, state.cancel
            )
            return BootKernel(
                kernel=variant.kernel, initrd=variant.initrd,
                cmdline=vm.cmdline or image.cmdline, release=variant.release,
                sha256=variant.kernel_sha256, package=variant.package,
                package_version=variant.package_version,
            )
        if vm.kernel is not None:
            return user_kernel(vm.kernel, vm.initrd, vm.cmdline, image,
                               state.run_dir / f"{self.plan.name}.kernel")
        package = image_kernel_package(image)
        return BootKernel(
            kernel=image.kernel, initrd=image.initrd, cmdline=vm.cmdline or image.cmdline,
            release=image.kernel_release,
            sha256=image_cache.recorded_sha256(
                image.directory, image.kernel.relative_to(image.directory).as_posix()),
            package=package, package_version=image.packages.get(package or ""),
        )

    def _start(
        self, image: LinuxImage, kernel: BootKernel, record: VmRecord, teardown: Teardown
    ) -> lifecycle.RunningVm:
        state, vm = self.ctx.state, self.plan.vm
        if kernel.copied is not None:
            teardown.callback(shutil.rmtree, kernel.copied, ignore_errors=True)
        overlay = state.run_dir / f"{self.plan.name}.qcow2"
        lifecycle.create_overlay(image.disk, overlay)
        teardown.callback(overlay.unlink, missing_ok=True)
        console = state.run_dir / f"{self.plan.name}.console.log"
        kept = state.path.with_name(f"{state.path.stem}.{console.name}")
        record.console_log = str(kept)
        cfg = configs.linux_config(
            name=record.domain,
            accelerator=record.accelerator,
            memory_mib=vm.memory_mib,
            vcpus=vm.vcpus,
            kernel=kernel.kernel,
            initrd=kernel.initrd,
            cmdline=kernel.cmdline,
            overlay=overlay,
            console_log=console,
            ssh_port=self.platform.ssh_port(),
            balloon=vm.balloon,
        )
        state.reporter.step(f"vm {vm.name}: starting {record.domain}")
        cfg = with_pinning(with_host_memory(cfg, self.ctx), self.plan.vm)
        running = lifecycle.start_forwarded(self.ctx.conn, cfg, self.platform.ssh_port)
        # The run directory is deleted at the end; the console log is evidence.
        teardown.callback(_copy_if_exists, console, kept)
        teardown.callback(lifecycle.destroy, running)
        record.qemu_pid = running.pid
        return running

    def drive(self, tracer: Tracer | None) -> None:
        """Every repetition of every workload, phase by phase, in order.

        A work item that ends the boot (see the module docstring) leaves the
        rest recorded as skipped; the teardown then destroys the VM.
        """
        assert self._guest is not None and self._running is not None
        assert self.record is not None and self.target is not None
        state, running = self.ctx.state, self._running
        domain = running.domain
        memory_kib = self.plan.vm.memory_mib * 1024
        console = ConsoleWatch(running.console_log)

        def health() -> str | None:
            return lifecycle.why_not_running(running) or console.panic()

        for i, item in enumerate(self.plan.items):
            state.check_cancel()
            ended = _run_workload(
                state,
                self._guest,
                item,
                self.target,
                tracer,
                self.plan.name,
                self.record,
                lambda: tracing.kvm_stats(domain),
                lambda percent: resize_memory(domain, memory_kib * percent // 100),
                health,
            )
            if ended is not None:
                self._end_early(ended, self.plan.items[i + 1 :])
                if lifecycle.LIBVIRTD_LOST in ended:
                    raise lifecycle.VmError(
                        f"VM {self.plan.name}: {ended}; the run stops: no VM can be started "
                        "or destroyed on the lost connection (the harness destroys this "
                        "domain through a new connection, or kills its QEMU if no libvirtd "
                        "answers)"
                    )
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


class ConsoleWatch:
    """Reads a guest's serial console log as it grows, looking for a kernel panic."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._tail = ""  # the last partial line, so a line split between reads is seen
        self._found: str | None = None

    def panic(self) -> str | None:
        """None, or the panic line the guest kernel printed (once seen, always)."""
        if self._found is None:
            try:
                with self.path.open("rb") as f:
                    f.seek(self._offset)
                    chunk = f.read().decode(errors="replace")
                    self._offset = f.tell()
            except OSError:
                return None
            text = self._tail + chunk
            lines = text.split("\n")
            self._tail = lines.pop()
            for line in [*lines, self._tail]:
                if PANIC_LINE in line:
                    self._found = line.strip()
                    break
        if self._found is None:
            return None
        return f"the guest kernel panicked: console says {self._found!r}"


@dataclass(frozen=True)
class BootKernel:
    """The kernel a boot runs, and what the result says of it."""

    kernel: Path
    initrd: Path | None
    cmdline: str
    release: str  # from the bzImage header ("" when it names none)
    sha256: str | None
    package: str | None = None
    package_version: str | None = None
    #: A user's files copied into the run directory (removed with the boot), else None.
    copied: Path | None = None
    #: Booted without an initramfs: the kernel must build in virtio and ext4.
    no_initrd: bool = False


def image_kernel_package(image: LinuxImage) -> str | None:
    """The Debian kernel package the image was built with (its recipe names one)."""
    return next((p for p in image.packages if p.startswith("linux-image-")), None)


def user_kernel(
    kernel: Path, initrd: Path | None, cmdline: str | None, image: LinuxImage | None, into: Path
) -> BootKernel:
    """A user's kernel (and initrd), copied into the run directory (QEMU reads it from
    there as the run's files, and a rebuild of the file mid-run cannot change what was
    booted), its digest taken of the copy.

    Without an initrd of the user's, the image's own tiny initramfs is used when the
    kernel is the image's release (its modules fit); any other kernel boots with no
    initramfs, straight onto root=/dev/vda: it must build in virtio_pci, virtio_blk,
    virtio_net and ext4 (docs/GUEST-KERNELS.md). ``image`` None: a cloud disk's kernel,
    with the initrd and cmdline given (spec validation requires the cmdline).
    """
    release = kernel_release(kernel)
    into.mkdir(mode=0o750, exist_ok=True)
    make_private_dir(into)
    kcopy = into / "vmlinuz"
    shutil.copyfile(kernel, kcopy)
    kcopy.chmod(0o640)
    icopy: Path | None = None
    if initrd is not None:
        icopy = into / "initrd"
        shutil.copyfile(initrd, icopy)
        icopy.chmod(0o640)
    elif image is not None and release and release == image.kernel_release:
        icopy = image.initrd
    boot_cmdline = cmdline or (image.cmdline if image is not None else "")
    return BootKernel(
        kernel=kcopy, initrd=icopy, cmdline=boot_cmdline, release=release,
        sha256=file_sha256(kcopy), copied=into, no_initrd=icopy is None,
    )


def guest_identity(guest: Guest, kernel: BootKernel, image: LinuxImage) -> GuestIdentity:
    """What the guest says it is, with what the host booted: the kernel file's digest and
    package, the base disk's digest (from the image entry's SHA256SUMS: no hashing)."""
    identity = try_read_identity(guest)
    return identity.model_copy(update={
        "kernel_sha256": kernel.sha256,
        "kernel_package": kernel.package,
        "kernel_package_version": kernel.package_version,
        "disk_sha256": image_cache.recorded_sha256(
            image.directory, image.disk.relative_to(image.directory).as_posix()),
    })


def _copy_if_exists(src: Path, dest: Path) -> None:
    # Never through a symlink or hard link planted at ``dest`` (results dirs may be shared).
    lifecycle.copy_console_log(src, dest)


def _wait_for_ssh(
    running: lifecycle.RunningVm,
    image: LinuxImage,
    vm: VmSpec,
    state: RunState,
    kernel: BootKernel | None = None,
) -> SshGuest:
    assert running.ssh_port is not None
    console = ConsoleWatch(running.console_log)
    try:
        return SshGuest.connect(
            "127.0.0.1",
            running.ssh_port,
            user=image.ssh_user,
            key_file=image.ssh_private_key,
            host_key=image.host_key,
            deadline_s=vm.boot_timeout_s,
            # A kernel that panicked while booting never answers: say so at once.
            stop_if=lambda: state.cancel.is_set() or console.panic() is not None,
        )
    except GuestError as exc:
        state.check_cancel()  # torn down meanwhile: not a boot failure
        panicked = console.panic()
        why = (f": while booting, {panicked}" if panicked is not None
               else f" did not answer SSH within {vm.boot_timeout_s:.0f} s: {exc}")
        raise GuestError(
            f"{vm.name}{why}{_kernel_hint(kernel)}\n"
            f"last console lines ({running.console_log}):\n"
            f"{lifecycle.console_tail(running.console_log)}"
        ) from exc


def _kernel_hint(kernel: BootKernel | None) -> str:
    """What to check when a guest kernel under test does not come up."""
    if kernel is None or kernel.copied is None:
        return ""
    if kernel.no_initrd:
        return (
            f" (the kernel {kernel.release or '(release unknown)'} booted with no initramfs, "
            "straight onto the root disk: it must build in virtio_pci, virtio_blk, virtio_net "
            "and ext4 (=y), or give initrd = PATH with those modules; a console that ends "
            "in 'VFS: Unable to mount root fs' means /dev/vda never appeared)"
        )
    return (" (a kernel under test with its own initrd: check that the initrd loads virtio_pci, "
            "virtio_blk, virtio_net and mounts root= from the command line)")


def _run_workload(
    state: RunState,
    guest: Guest,
    item: WorkItem,
    target: TraceTarget,
    tracer: Tracer | None,
    boot_id: str,
    record: VmRecord,
    stats: Callable[[], dict[str, int] | None],
    resize: Callable[[int], None] | None = None,
    health: AbortCheck | None = None,
) -> str | None:
    """Run one repetition, phase by phase; None, or why the rest of the boot must not run."""
    workload, run = item.workload, item.run
    params = {**workload.defaults(), **run.params}
    wrun = WorkloadRun(
        workload=workload.name,
        vm=run.vm,
        repetition=item.repetition,
        params=params,
        boot=boot_id,
        warmup=item.warmup,
        status="incomplete",
    )
    with state.lock:
        state.result.runs.append(wrun)
        state.save()  # the file shows what is running, not only what finished
    for i, spec in enumerate(workload.phases):
        number = state.next_phase(boot_id)
        phase = run_linux_phase(
            guest, workload, spec, params, number, target, tracer, stats, resize, health=health
        )
        # A phase cut short by the teardown is not a measurement: leave it out.
        state.check_cancel()
        ended = None
        if phase.status != "ok":
            ended = _after_failed_phase(state, guest, phase, target, number, record, health)
        if tracer is not None:
            tracing.trace_phase(state, tracer, target, phase, record)
        with state.lock:
            wrun.phases.append(phase)
            if phase.status != "ok":
                wrun.status = "failed"
                # Later phases of this repetition depend on this one.
                wrun.not_run = [p.name for p in workload.phases[i + 1 :]]
                wrun.reason = f"phase {spec.name} {phase.status}: {phase.error}"
            state.save()
        state.reporter.phase(wrun, phase)
        if phase.status != "ok":
            return ended
    with state.lock:
        wrun.status = "ok"
        state.save()
    return None


def _after_failed_phase(
    state: RunState,
    guest: Guest,
    phase: PhaseResult,
    target: TraceTarget,
    number: int,
    record: VmRecord,
    health: AbortCheck | None,
) -> str | None:
    """After a phase that did not succeed: may this boot go on? None, or why not.

    May add to ``phase.error`` what was found (the console log, a reconnect).
    """
    if phase.status == "failed":
        return None  # the command ran and said no: the guest is as good as before
    gone = health() if health is not None else None
    if gone is not None:
        phase.error = f"{phase.error} (console log: {record.console_log})"
        return f"phase {phase.name}: the VM is gone: {gone}"
    if phase.status == "timeout":
        # The command may still run (and print, or hold memory): kill all that is left of it.
        try:
            killed = guest.kill_phase(target.token, number)
        except GuestError as exc:
            state.check_cancel()
            return (
                f"phase {phase.name} timed out: the guest's state is unknown (its command may "
                f"still run: {exc}), so this boot's remaining work is skipped and the VM "
                "destroyed"
            )
        phase.error = (
            f"{phase.error}; killed {killed} process group(s) left of the phase's command; "
            "the boot goes on"
        )
        return None
    # An error with the VM still there: the transport failed, the command's fate unknown.
    wait_s = reconnect_s()
    try:
        try:
            guest.run("true", timeout_s=10)
            how = "the SSH connection still worked"
        except GuestError:
            state.check_cancel()
            guest.reconnect(wait_s)
            how = "reconnected over SSH"
        killed = guest.kill_phase(target.token, number)
    except GuestError as exc:
        state.check_cancel()
        return (
            f"phase {phase.name}: the SSH connection dropped and the guest did not answer "
            f"SSH again within {wait_s:g} s ({exc})"
        )
    phase.error = (
        f"{phase.error}; {how}, killed {killed} process group(s) left of the phase's "
        "command; the boot goes on"
    )
    return None


def _wait_for_reason(health: AbortCheck | None, grace_s: float) -> str | None:
    """What ``health`` says within ``grace_s`` (None: the VM still looks fine)."""
    if health is None:
        return None
    deadline = time.monotonic() + grace_s
    while (why := health()) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    # "Shutting down" is libvirt on its way to "gone": wait a little for the final word.
    settle = time.monotonic() + 5
    while why is not None and "is shutting down" in why and time.monotonic() < settle:
        time.sleep(0.2)
        why = health() or why
    return why


def resize_memory(domain: libvirt.virDomain, kib: int, timeout_s: float = 180.0) -> None:
    """Set the guest's memory to ``kib`` through its balloon; return once the guest got there.

    Raises GuestError if the balloon has not reached the target (within 1 MiB)
    after ``timeout_s``: the guest cannot give up that much, or has no driver.
    """
    try:
        domain.setMemoryFlags(kib, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as exc:
        raise GuestError(f"setMemory({kib} KiB) failed: {exc}") from exc
    deadline = time.monotonic() + timeout_s
    while True:
        actual = domain.memoryStats().get("actual")
        if actual is not None and abs(actual - kib) <= 1024:
            return
        if time.monotonic() > deadline:
            raise GuestError(
                f"the balloon is at {actual} KiB after {timeout_s:.0f} s, asked for {kib} KiB "
                "(is virtio_balloon loaded in the guest, and can it give up that much?)"
            )
        time.sleep(0.2)


def run_linux_phase(
    guest: Guest,
    workload: WorkloadSpec,
    spec: PhaseSpec,
    params: dict[str, str | int | float],
    number: int,
    target: TraceTarget,
    tracer: Tracer | None,
    stats: Callable[[], dict[str, int] | None],
    resize: Callable[[int], None] | None = None,
    *,
    health: AbortCheck | None = None,
) -> PhaseResult:
    """Run one phase: host marker, guest command between guest markers, host marker.

    ``health`` (None while the VM is fine, else what happened to it) is polled
    while the command runs: a VM that went away ends the phase at once, as
    ``error`` with that reason, not as a phase timeout or an SSH error.

    A phase with ``balloon_percent`` first has ``resize`` set the guest's memory
    (inside the phase, so the host's work for it is attributed to the phase).
    Returns the phase record without its trace (fetched by the caller) so the
    benchmark can time exactly this path.
    """
    command = workload.render(spec, params)
    phase = PhaseResult(
        index=number, name=spec.name, command=command, started_at=datetime.now(UTC), status="error"
    )
    stats_before = stats()
    lost: GuestLost | None = None
    start_ns = tracer.mark_phase(target, number) if tracer else time.monotonic_ns()
    try:
        if spec.balloon_percent is not None:
            if resize is None:
                raise GuestError(f"phase {spec.name} resizes memory, but this VM cannot")
            resize(spec.balloon_percent)
        out = guest.run(
            guest.phase_command(command, target.token, number),
            timeout_s=spec.timeout_s,
            abort_if=health,
        )
    except GuestTimeout as exc:
        phase.status, phase.error = "timeout", str(exc)
        phase.stdout_tail, phase.stderr_tail = exc.stdout[-TAIL_CHARS:], exc.stderr[-TAIL_CHARS:]
    except GuestGone as exc:
        phase.status, phase.error = "error", f"the VM went away mid-phase: {exc}"
    except GuestLost as exc:
        phase.status, phase.error, lost = "error", str(exc), exc
    except GuestError as exc:
        phase.status, phase.error = "error", str(exc)
    else:
        phase.exit_status = out.exit_status
        phase.status = "ok" if out.exit_status == 0 else "failed"
        phase.stdout_tail, phase.stderr_tail = out.stdout[-TAIL_CHARS:], out.stderr[-TAIL_CHARS:]
        if out.dropped is not None:  # the tail alone would not show that output went missing
            phase.stdout_tail = f"[harness: {out.dropped}]\n{phase.stdout_tail}"
        got = metrics.extract_checked(spec, out.stdout + "\n" + out.stderr)
        phase.metrics, phase.metrics_missing, phase.metric_problems = (
            got.values, got.missing, got.problems)
        if out.exit_status != 0:
            phase.error = f"exit status {out.exit_status}"
    end_ns = tracer.mark_phase(target, 0) if tracer else time.monotonic_ns()
    # A destroyed domain drops the connection a moment before libvirt says so.
    if lost is not None and (why := _wait_for_reason(health, GONE_GRACE_S)) is not None:
        phase.error = f"the VM went away mid-phase: {why} ({lost})"
    phase.start_ns, phase.end_ns = start_ns, end_ns
    phase.duration_s = round((end_ns - start_ns) / 1e9, 6)
    stats_after = stats()
    if stats_before is not None and stats_after is not None:
        phase.kvm_stats = kvmstats.diff(stats_before, stats_after)
    return phase
