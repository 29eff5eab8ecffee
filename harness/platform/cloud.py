"""Cloud guests (``image = "cloud"``): a Linux disk image the user brings, set up by cloud-init.

What a kernel or cloud engineer benchmarks is their own guest: a
distribution's cloud image or their production image. The harness boots it
as it is, through the image's own bootloader (SeaBIOS, or OVMF with a
per-boot NVRAM) or with a guest kernel under test booted directly (``kernel``,
``initrd``, ``cmdline``: the Linux platform's copy-and-hash), on a qcow2
overlay (the disk is never written), with a
per-boot cloud-init NoCloud seed as a read-only virtio disk (cloudinit.py): a
fresh SSH key for ``os_user``, passwordless sudo, and a host key made on the
host, the only one accepted. Readiness is SSH answering with that key, then
cloud-init done (``cloud-init status --wait``), so nothing of cloud-init runs
while a phase measures.

The guest runs the Linux platform's phases (same phase runner, same failure
handling). The login user is not root, while the workloads need root (drop
caches, hugetlbfs, THP settings, killing a phase's process group), so every
command goes through ``sudo -n`` with the harness's PATH (its own programs,
copied in at boot, first). The harness's own programs are copied in and
checked by sha256 (harness/image/guest_tools.py); a workload that needs a
package program the guest lacks is recorded as skipped with the reason.

Recorded per boot: the disk's sha256 (``image_digest``), path, format and the
firmware (``image_packages``), and the guest's identity (OS release, kernel).
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import shlex
import shutil
import time
from pathlib import Path

from harness.guest.base import GuestError, GuestTimeout
from harness.guest.identity import try_read_identity
from harness.guest.ssh import SshGuest
from harness.host.facts import choose_accelerator
from harness.image import guest_tools
from harness.image.cloud_disk import DiskError, DiskInfo, check_disk, disk_sha256
from harness.image.cloudinit import CloudSeed, write_seed
from harness.platform.base import (
    BootPlan,
    ChooseAccelerator,
    RunContext,
    with_host_memory,
    with_pinning,
)
from harness.platform.linux import (
    BootKernel,
    LinuxPlatform,
    LinuxSession,
    _copy_if_exists,
    user_kernel,
)
from harness.results import VmRecord, WorkloadRun
from harness.runstate import Teardown
from harness.spec import VmSpec
from harness.trace.program import TraceTarget
from harness.trace.runner import Tracer
from harness.vm import configs, lifecycle
from harness.vm.domain import DomainConfig, KernelBoot

#: Console lines that are cloud-init's own errors (its log lines and Python tracebacks).
CLOUD_INIT_ERROR = re.compile(
    r"cloud-init.*(ERROR|CRITICAL|WARNING|Traceback|[Ff]ailed)|(ERROR|CRITICAL).*cloud-init"
    r"|No (DataSource|datasource) found|datasource used was: None"
)
#: At least this long for cloud-init to finish once SSH answers, whatever is left of the
#: boot timeout (it usually ends within a minute of SSH under TCG; packages take longer).
CLOUD_INIT_MIN_S = 30.0


class CloudError(GuestError):
    """A cloud VM that cannot boot or did not come up; the message says why and the fix."""


def sudo_wrap(command: str) -> str:
    """``command`` as root through sudo, with the harness's programs first on its PATH.

    ``sudo -n`` never prompts: a user without passwordless sudo fails at once.
    """
    return f"sudo -n env PATH={guest_tools.GUEST_PATH} sh -c {shlex.quote(command)}"


def cloud_init_errors(text: str, limit: int = 8) -> list[str]:
    """cloud-init's error lines in a console log, each as ``cloud-init: ...``."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if CLOUD_INIT_ERROR.search(line):
            found.append("cloud-init: " + re.sub(r"^.*?cloud-init(\[\d+\])?:\s*", "", line))
    return found[-limit:]


def console_report(console: Path) -> str:
    """cloud-init's errors picked out of the console, then its last lines."""
    try:
        text = console.read_text(errors="replace")
    except OSError:
        text = ""
    errors = cloud_init_errors(text)
    head = ("\n".join(errors) + "\n") if errors else "cloud-init: no error line on the console\n"
    return f"{head}last console lines ({console}):\n{lifecycle.console_tail(console)}"


class CloudPlatform(LinuxPlatform):
    """Cloud images over SSH, set up per boot by cloud-init. One boot runs all workloads."""

    kind = "cloud"

    def session(self, ctx: RunContext, plan: BootPlan) -> CloudSession:
        """A session that boots ``plan.vm``'s disk and runs its workloads over SSH."""
        return CloudSession(self, ctx, plan)

    def preview_config(
        self, vm: VmSpec, domain: str, run_dir: Path, accelerator: ChooseAccelerator
    ) -> tuple[DomainConfig, str]:
        """The cloud domain; seed, overlay and NVRAM paths are those of a run's boot."""
        kernel = (KernelBoot(vm.kernel, vm.initrd, vm.cmdline or "")
                  if vm.kernel is not None else None)
        cfg = _config(vm, domain, accelerator(vm.accelerator), run_dir, vm.name, 2222,
                      "52:54:00:00:00:01", kernel)
        note = f"<!-- overlay on {vm.disk}; the seed and MAC address are made per boot -->\n"
        return with_pinning(cfg, vm), note


def _config(
    vm: VmSpec, domain: str, accel: str, run_dir: Path, boot: str, port: int, mac: str,
    kernel: KernelBoot | None = None,
) -> DomainConfig:
    return configs.cloud_config(
        name=domain,
        accelerator="kvm" if accel == "kvm" else "tcg",
        memory_mib=vm.memory_mib,
        vcpus=vm.vcpus,
        firmware=vm.firmware,
        nvram=run_dir / f"{boot}.VARS.fd",
        overlay=run_dir / f"{boot}.qcow2",
        seed=run_dir / f"{boot}.cloud-init" / "seed.iso",
        mac=mac,
        console_log=run_dir / f"{boot}.console.log",
        ssh_port=port,
        network=vm.network,
        kernel=kernel,
    )


class CloudSession(LinuxSession):
    """One boot of a cloud image: seed, overlay, domain, SSH, cloud-init, tools, workloads."""

    def __init__(self, platform: CloudPlatform, ctx: RunContext, plan: BootPlan) -> None:
        super().__init__(platform, ctx, plan)
        self.cloud = platform
        self.missing: dict[str, list[str]] = {}  # workload -> package programs the guest lacks

    def boot(self, teardown: Teardown) -> None:
        """Disk checked first (nothing starts without it); ready once SSH answers with the
        seed's host key, cloud-init is done and the harness's programs are in place."""
        state, vm = self.ctx.state, self.plan.vm
        assert vm.disk is not None and vm.os_user is not None, "spec validation"
        try:
            disk = check_disk(vm.disk)
        except DiskError as exc:
            raise CloudError(f"VM {vm.name}: disk: {exc}") from exc
        state.reporter.step(f"vm {vm.name}: disk {disk.path} ({disk.format}): sha256")
        digest = disk_sha256(disk.path)
        kernel: BootKernel | None = None
        if vm.kernel is not None:  # a guest kernel under test, booted directly on the disk
            kernel = user_kernel(vm.kernel, vm.initrd, vm.cmdline, None,
                                 state.run_dir / f"{self.plan.name}.kernel")
            teardown.callback(shutil.rmtree, kernel.copied, ignore_errors=True)
        tools = guest_tools.build_guest_tools()
        accel, reason = choose_accelerator(vm.accelerator, self.ctx.facts)
        token = state.new_token()
        record = VmRecord(
            name=vm.name, boot=self.plan.name,
            domain=lifecycle.domain_name(state.result.run_id, self.plan.name),
            image="cloud", image_digest=digest,
            image_packages={"disk": str(disk.path), "disk_format": disk.format,
                            "firmware": "direct kernel boot" if kernel else vm.firmware,
                            "network": str(vm.network).lower(),
                            **({"kernel": kernel.release} if kernel else {})},
            accelerator=accel, accelerator_reason=reason, vcpus=vm.vcpus,
            memory_mib=vm.memory_mib, marker_token=token, group=self.plan.group,
        )
        with state.lock:
            state.result.vms.append(record)
        self.record = record
        state.check_cancel()
        running, seed = self._start_cloud(disk, record, teardown, kernel)
        guest = self._wait_for_ssh(running, seed)
        teardown.callback(guest.close)
        state.reporter.step(f"vm {vm.name}: SSH answered after "
                            f"{(time.monotonic_ns() - running.started_ns) / 1e9:.1f} s; "
                            "waiting for cloud-init to finish")
        self._guest, self._running = guest, running
        _check_root(guest, vm.os_user)
        deadline = running.started_ns / 1e9 + vm.boot_timeout_s  # monotonic, as started_ns
        record.image_packages["cloud_init"] = _wait_for_cloud_init(guest, running, deadline)
        needs = {n for item in self.plan.items for n in item.workload.needs}
        copied = guest_tools.install(guest, tools, guest_tools.harness_programs(needs))
        lacking = set(guest_tools.missing_programs(
            guest, needs - set(guest_tools.harness_programs(needs))))
        self.missing = {
            item.workload.name: sorted(lacking & set(item.workload.needs))
            for item in self.plan.items if lacking & set(item.workload.needs)
        }
        ready_s = round((time.monotonic_ns() - running.started_ns) / 1e9, 3)
        identity = try_read_identity(guest).model_copy(update={
            "disk_sha256": digest, "kernel_sha256": kernel.sha256 if kernel else None})
        with state.lock:
            record.boot_to_ready_s = ready_s
            record.guest_identity = identity
            state.save()
        state.reporter.step(
            f"vm {vm.name}: ready after {ready_s:.1f} s, cloud-init "
            f"{record.image_packages['cloud_init']} "
            f"({record.image_packages['firmware']}, {accel}: {reason}); "
            f"{identity.os_label()}, kernel {identity.kernel_label()}"
            + (f"; copied {', '.join(copied)}" if copied else "")
        )
        self.target = TraceTarget(vm=vm.name, pid=running.pid, token=token)

    def _start_cloud(
        self, disk: DiskInfo, record: VmRecord, teardown: Teardown, kernel: BootKernel | None
    ) -> tuple[lifecycle.RunningVm, CloudSeed]:
        """Seed, overlay and domain, each undone by ``teardown`` (after the domain is gone)."""
        state, vm, boot = self.ctx.state, self.plan.vm, self.plan.name
        assert vm.os_user is not None
        instance = f"{record.domain}-{secrets.token_hex(4)}"
        seed = write_seed(
            state.run_dir / f"{boot}.cloud-init", user=vm.os_user, hostname=vm.name,
            instance_id=instance, packages=vm.packages if vm.network else [],
        )
        teardown.callback(seed.remove)
        direct = KernelBoot(kernel.kernel, kernel.initrd, kernel.cmdline) if kernel else None
        cfg = _config(vm, record.domain, record.accelerator, state.run_dir, boot,
                      self.cloud.ssh_port(), seed.mac, direct)
        cfg = with_pinning(with_host_memory(cfg, self.ctx), vm)
        assert cfg.disk is not None
        lifecycle.create_overlay(disk.path, cfg.disk, disk.format)
        teardown.callback(cfg.disk.unlink, missing_ok=True)
        nvram = state.run_dir / f"{boot}.VARS.fd"
        teardown.callback(nvram.unlink, missing_ok=True)
        kept = state.path.with_name(f"{state.path.stem}.{cfg.console_log.name}")
        record.console_log = str(kept)
        how = f"kernel {kernel.release or kernel.kernel.name}" if kernel else vm.firmware
        state.reporter.step(f"vm {vm.name}: starting {record.domain} ({how}, cloud-init)")
        try:
            running = lifecycle.start_forwarded(self.ctx.conn, cfg, self.cloud.ssh_port)
        except lifecycle.VmError as exc:
            if "Permission denied" not in str(exc):
                raise
            raise CloudError(
                f"{exc} (fix: QEMU runs as libvirt's QEMU user, which must reach {disk.path}: "
                "make every directory above it traversable, chmod o+x, or move the disk to "
                "such a place)"
            ) from exc
        teardown.callback(_copy_if_exists, cfg.console_log, kept)
        teardown.callback(lifecycle.destroy, running)
        record.qemu_pid = running.pid
        return running, seed

    def _wait_for_ssh(self, running: lifecycle.RunningVm, seed: CloudSeed) -> SshGuest:
        """SSH as ``os_user`` with this boot's key, the seed's host key pinned.

        A host key that is not the seed's is retried until the deadline (sshd
        may start with keys of its own before cloud-init replaces them), never
        accepted. On failure the message says what was seen last and quotes
        cloud-init's errors and the console.
        """
        state, vm = self.ctx.state, self.plan.vm
        assert running.ssh_port is not None and vm.os_user is not None
        deadline = running.started_ns / 1e9 + vm.boot_timeout_s  # monotonic

        def stop() -> bool:
            return state.cancel.is_set() or lifecycle.why_not_running(running) is not None

        last: GuestError | None = None
        while time.monotonic() < deadline and not stop():
            try:
                return SshGuest.connect(
                    "127.0.0.1", running.ssh_port, user=vm.os_user, key_file=seed.client_key,
                    host_key=seed.host_key, deadline_s=max(1.0, deadline - time.monotonic()),
                    stop_if=stop, wrap=sudo_wrap, marker=guest_tools.MARKER,
                )
            except GuestError as exc:
                last = exc
                if "host key mismatch" not in str(exc):
                    break
                time.sleep(2)
        state.check_cancel()  # torn down meanwhile: not a boot failure
        gone = lifecycle.why_not_running(running)
        raise CloudError(
            f"{vm.name} did not answer SSH within {vm.boot_timeout_s:.0f} s: "
            f"{gone or _ssh_diagnosis(last, vm.os_user)}\n{console_report(running.console_log)}"
        )

    def drive(self, tracer: Tracer | None) -> None:
        """Work items whose package programs the guest lacks are recorded as skipped; the
        rest run as on the Linux platform."""
        state = self.ctx.state
        skipped = [i for i in self.plan.items if i.workload.name in self.missing]
        with state.lock:
            for item in skipped:
                lacks = self.missing[item.workload.name]
                state.result.runs.append(WorkloadRun(
                    workload=item.workload.name, vm=item.run.vm, repetition=item.repetition,
                    params={**item.workload.defaults(), **item.run.params},
                    boot=self.plan.name, warmup=item.warmup, status="skipped",
                    reason=f"not run: the guest has no {', '.join(lacks)} (fix: an image that "
                    "has it, or network = true and the packages that provide it in the VM's "
                    f"packages, e.g. packages = {lacks!r}, so cloud-init installs them)",
                ))
            state.save()
        kept = tuple(i for i in self.plan.items if i.workload.name not in self.missing)
        self.plan = dataclasses.replace(self.plan, items=kept)
        super().drive(tracer)


def _ssh_diagnosis(last: GuestError | None, user: str) -> str:
    """What the last SSH attempt says about the guest, in words."""
    text = str(last) if last is not None else "no attempt finished"
    if "host key mismatch" in text:
        return (f"{text}: sshd answered with a host key that is not the seed's (cloud-init did "
                "not install ssh_keys from the seed: did it run, and read the NoCloud seed?)")
    if "Authentication" in text or "auth" in text.lower():
        return (f"{text}: sshd answered but refused this boot's key for {user!r} (cloud-init "
                "did not create the user or install the key: did it read the NoCloud seed?)")
    # What paramiko says when the forward took the TCP connection and nothing spoke SSH.
    silent = ("banner", "no existing session", "eoferror", "reset", "refused")
    if any(word in text.lower() for word in silent):
        return (f"{text}: no SSH server answered in the guest (the port forward took the "
                "connection, but no SSH banner ever came: has the image sshd, enabled at "
                "boot, and did the guest boot at all?)")
    return text


def _check_root(guest: SshGuest, user: str) -> None:
    """Every command runs as root through ``sudo -n``: CloudError if ``user`` cannot."""
    out = guest.run("id -u", timeout_s=60)
    if out.exit_status != 0 or out.stdout.strip() != "0":
        raise CloudError(
            f"{user!r} logged in, but the harness's commands cannot run as root through "
            f"`sudo -n` ({(out.stderr or out.stdout).strip()[-300:] or 'no answer'}): the "
            "workloads need root (fix: an image with sudo whose cloud-init applies the seed's "
            "`sudo: ALL=(ALL) NOPASSWD:ALL` for the user)"
        )


def _wait_for_cloud_init(guest: SshGuest, running: lifecycle.RunningVm, deadline: float) -> str:
    """``cloud-init status --wait``: its final word; CloudError if cloud-init failed."""
    wait_s = max(CLOUD_INIT_MIN_S, deadline - time.monotonic())
    try:
        out = guest.run("cloud-init status --wait --long", timeout_s=wait_s)
    except GuestTimeout as exc:
        raise CloudError(
            f"SSH answered, but cloud-init did not finish within the boot timeout ({wait_s:.0f} "
            "s left of boot_timeout_s); the harness waits for it so that none of it runs while "
            "a phase measures (fix: raise boot_timeout_s; packages take longer)\n"
            f"{console_report(running.console_log)}"
        ) from exc
    status = re.search(r"^status:\s*(\S+)", out.stdout, re.MULTILINE)
    word = status.group(1) if status else "unknown"
    if out.exit_status not in (0, 2) or word == "error":
        raise CloudError(
            f"cloud-init failed in the guest (exit {out.exit_status}):\n"
            f"{out.stdout.strip()[-1500:]}\n{out.stderr.strip()[-500:]}\n"
            f"{console_report(running.console_log)}"
        )
    return word
