"""``harness doctor``: one check per host prerequisite, and ``--fix`` to repair what it can.

Every check returns a :class:`Check`; ``apply_fixes`` installs missing Debian
packages, starts virtlogd/libvirtd, mounts tracefs/debugfs and opens /dev/kvm
to group ``kvm``.  It never starts libvirt's ``default`` network or any bridge:
guests reach the host only through ports forwarded on 127.0.0.1.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from harness.host.facts import bpftrace_version, collect_host_facts, qemu_version

LIBVIRT_URI = "qemu:///system"
#: The cloud-image stand-in's build (harness/image/cloud_standin.py): a Debian package ->
#: the tool or file of it that the build uses (GPT, ESP, grub for BIOS and for UEFI).
CLOUD_STANDIN_FILES = {
    "fdisk": "sfdisk",
    "dosfstools": "mkfs.fat",
    "mtools": "mcopy",
    "grub-pc-bin": "/usr/lib/grub/i386-pc/boot.img",
    "grub-efi-amd64-bin": "/usr/lib/grub/x86_64-efi/modinfo.sh",
}
#: Everything the harness needs from Debian 12, installed by ``--fix``.
APT_PACKAGES = (
    "qemu-system-x86",
    "qemu-utils",
    "libvirt-daemon-system",
    "libvirt-clients",
    "libvirt-dev",
    "pkg-config",
    "bpftrace",
    # the libbpf tracer backend (harness.trace.libbpf), built on first use
    "clang",
    "llvm",
    "bpftool",
    "libbpf-dev",
    "libelf-dev",
    "zlib1g-dev",
    "debootstrap",
    "dnsmasq-base",
    "libxml2-utils",
    "nasm",
    "gcc",
    "libc6-dev",
    "e2fsprogs",
    "busybox-static",
    *CLOUD_STANDIN_FILES,
)
TRACEFS = Path("/sys/kernel/tracing")
DEBUGFS = Path("/sys/kernel/debug")
DEV_KVM = Path("/dev/kvm")
#: sbin directories are searched too: debootstrap and mkfs.ext4 live there.
_TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


@dataclass(frozen=True)
class Check:
    """The outcome of one prerequisite check."""

    name: str
    ok: bool
    required: bool
    detail: str
    fix: str | None = None


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=_TOOL_PATH)


def _tool_check(name: str, tool: str, package: str, required: bool, why: str) -> Check:
    path = _which(tool)
    if path:
        return Check(name, True, required, f"{path} ({why})")
    return Check(name, False, required, f"{tool} not found ({why})", f"apt-get install {package}")


def _running(comm: str) -> bool:
    """True when a process whose command name is ``comm`` runs (any user)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == comm:
                    return True
            except OSError:
                continue  # exited while we looked
    return False


def systemd_is_init() -> bool:
    """True when systemd is PID 1 (then daemons are started through systemctl)."""
    return Path("/run/systemd/system").is_dir()


def _libvirt_open_error(uri: str = LIBVIRT_URI) -> str | None:
    """None when libvirt at ``uri`` answers, else the error text."""
    try:
        import libvirt
    except ImportError as e:
        return f"libvirt-python not importable: {e}"
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        return str(e)
    try:
        return None if conn.getLibVersion() > 0 else "no version from daemon"
    finally:
        conn.close()


def check_qemu() -> Check:
    """qemu-system-x86_64 is installed; detail carries its version."""
    c = _tool_check(
        "qemu-system-x86_64", "qemu-system-x86_64", "qemu-system-x86", True, "runs guests"
    )
    return Check(c.name, c.ok, c.required, f"version {qemu_version()}", c.fix) if c.ok else c


def check_qemu_img() -> Check:
    """qemu-img is installed (qcow2 base images and per-VM overlays)."""
    return _tool_check("qemu-img", "qemu-img", "qemu-utils", True, "disk overlays")


def check_virtlogd() -> Check:
    """virtlogd runs (libvirt's QEMU driver refuses to start domains without it)."""
    if _running("virtlogd"):
        return Check("virtlogd", True, True, "running")
    start = "systemctl start virtlogd" if systemd_is_init() else "virtlogd -d"
    return Check("virtlogd", False, True, "not running", start)


def check_libvirtd() -> Check:
    """libvirtd answers at qemu:///system."""
    err = _libvirt_open_error()
    if err is None:
        return Check("libvirtd", True, True, f"{LIBVIRT_URI} answers")
    start = "systemctl start libvirtd" if systemd_is_init() else "libvirtd -d"
    return Check("libvirtd", False, True, f"{LIBVIRT_URI}: {err}", start)


def check_dev_kvm(dev: Path = DEV_KVM) -> Check:
    """/dev/kvm exists and group ``kvm`` may read and write it (libvirt's QEMU runs in it)."""
    fix = "chgrp kvm /dev/kvm; chmod 660 /dev/kvm"
    try:
        st = dev.stat()
    except OSError:
        return Check("/dev/kvm", False, True, f"{dev} does not exist (KVM not available)", None)
    try:
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        return Check("/dev/kvm", False, True, "group kvm does not exist", "groupadd --system kvm")
    group_rw = st.st_mode & (stat.S_IRGRP | stat.S_IWGRP) == stat.S_IRGRP | stat.S_IWGRP
    mode = stat.filemode(st.st_mode)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    if st.st_gid == kvm_gid and group_rw:
        return Check("/dev/kvm", True, True, f"{mode} group {group}")
    return Check("/dev/kvm", False, True, f"{mode} group {group}: libvirt-qemu cannot open it", fix)


def check_kvm_facts() -> list[Check]:
    """Informational: can KVM run a stock guest here, and which MMU mode / CPU vendor."""
    f = collect_host_facts()
    tdp = "absent" if f.tdp_mmu is None else ("Y" if f.tdp_mmu else "N")
    return [
        Check("kvm-stock-guest", f.stock_guest_kvm, False, f.stock_guest_reason),
        Check(
            "mmu-mode",
            True,
            False,
            f"{f.mmu_mode} (cpu {f.cpu_vendor}, tdp_mmu={tdp}): {f.mmu_reason}",
        ),
    ]


def check_bpftrace() -> Check:
    """bpftrace is installed; detail carries its version."""
    c = _tool_check("bpftrace", "bpftrace", "bpftrace", True, "host tracing")
    return Check(c.name, True, True, f"version {bpftrace_version()}") if c.ok else c


def check_libbpf() -> Check:
    """The libbpf tracer backend builds here (not required: ``auto`` falls back to bpftrace)."""
    from harness.trace import libbpf  # builds with clang and bpftool: only when checked

    missing = libbpf.missing_tools()
    if missing:
        return Check("libbpf-backend", False, False,
                     f"{', '.join(missing)} not installed (the libbpf tracer backend)",
                     f"apt-get install {' '.join(missing)}")
    try:
        built = libbpf.build()
    except libbpf.LibbpfUnavailable as exc:
        return Check("libbpf-backend", False, False, str(exc).splitlines()[0],
                     "a kernel with CONFIG_DEBUG_INFO_BTF, or use [trace] backend = \"bpftrace\"")
    return Check("libbpf-backend", True, False,
                 f"kvmtrace loader built for this kernel ({built.loader})")


def check_tracefs(root: Path = TRACEFS) -> Check:
    """tracefs is mounted and exposes the kvm tracepoints."""
    events = root / "events" / "kvm"
    if events.is_dir():
        return Check("tracefs", True, True, f"{events} present")
    if (root / "events").is_dir():
        return Check("tracefs", False, True, "tracefs mounted but no kvm events (KVM not built?)")
    return Check("tracefs", False, True, f"{events} missing", f"mount -t tracefs nodev {root}")


def check_debugfs(root: Path = DEBUGFS) -> Check:
    """Optional: debugfs with /sys/kernel/debug/kvm, for KVM's own statistics."""
    kvm = root / "kvm"
    if not kvm.is_dir():
        return Check(
            "debugfs-kvm", False, False, f"{kvm} missing", f"mount -t debugfs nodev {root}"
        )
    try:
        (kvm / "exits").read_text()
    except PermissionError:
        return Check(
            "debugfs-kvm",
            False,
            False,
            f"{kvm} present but its stat files are unreadable (kernel lockdown restricts "
            "debugfs); KVM stats come from QEMU's query-stats instead",
        )
    except OSError as e:
        return Check("debugfs-kvm", False, False, f"{kvm}/exits unreadable: {e}")
    return Check("debugfs-kvm", True, False, f"{kvm} readable")


def check_root() -> Check:
    """Running as root (bpftrace, debootstrap, mounts)."""
    if os.geteuid() == 0:
        return Check("root", True, True, "euid 0")
    return Check("root", False, True, f"euid {os.geteuid()}", "run as root (sudo)")


#: swtpm's local certificate authority: libvirt runs swtpm_setup (and so swtpm_localca) as
#: its swtpm_user, tss by default. A file there owned by someone else (swtpm_setup once run
#: by hand as root) makes every TPM-equipped domain (Windows guests) fail to start with
#: "Need read/write rights on .../.lock.swtpm-localca for user tss".
SWTPM_LOCALCA = Path("/var/lib/swtpm-localca")
SWTPM_USER = "tss"


def check_swtpm_localca(root: Path = SWTPM_LOCALCA, user: str = SWTPM_USER) -> Check:
    """Every file of swtpm's local CA belongs to libvirt's swtpm user."""
    if not root.is_dir():
        return Check("swtpm-localca", True, False, f"{root} absent (made on first TPM use)")
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        return Check("swtpm-localca", False, False, f"user {user} does not exist",
                     "apt-get install swtpm-tools")
    wrong = sorted(p.name for p in [root, *root.iterdir()] if p.lstat().st_uid != uid)
    if not wrong:
        return Check("swtpm-localca", True, False, f"{root} owned by {user}")
    return Check("swtpm-localca", False, False,
                 f"{root}: {', '.join(wrong)} not owned by {user}: TPM domains cannot start",
                 f"chown -R {user}:{user} {root}")


def fix_swtpm_localca(log: Callable[[str], None], root: Path = SWTPM_LOCALCA,
                      user: str = SWTPM_USER) -> None:
    """``chown -R tss:tss /var/lib/swtpm-localca`` (links are changed, never followed)."""
    pw = pwd.getpwnam(user)
    log(f"chown -R {user}:{user} {root}")
    for p in [root, *root.iterdir()]:
        os.chown(p, pw.pw_uid, pw.pw_gid, follow_symlinks=False)


def check_cloud_standin_tools(files: dict[str, str] = CLOUD_STANDIN_FILES) -> Check:
    """Partitioning, FAT and grub's BIOS and EFI images for ``harness image build
    cloud-standin`` (not required: only that image and its tests use them)."""
    missing = [
        pkg for pkg, what in files.items()
        if not (Path(what).is_file() if what.startswith("/") else _which(what))
    ]  # fmt: skip
    why = "the cloud-image stand-in: GPT, ESP and grub for BIOS and UEFI"
    if missing:
        return Check("cloud-standin-tools", False, False, f"{', '.join(missing)} missing ({why})",
                     f"apt-get install {' '.join(missing)}")
    return Check("cloud-standin-tools", True, False, f"sfdisk, mkfs.fat, mcopy, grub ({why})")


def run_checks() -> list[Check]:
    """Run every check, in the order a person would fix them."""
    return [
        check_root(),
        check_qemu(),
        check_qemu_img(),
        check_virtlogd(),
        check_libvirtd(),
        check_dev_kvm(),
        *check_kvm_facts(),
        check_bpftrace(),
        check_libbpf(),
        check_tracefs(),
        check_debugfs(),
        _tool_check("debootstrap", "debootstrap", "debootstrap", True, "Linux image builds"),
        _tool_check("mkfs.ext4", "mkfs.ext4", "e2fsprogs", True, "Linux image builds"),
        _tool_check("gcc", "gcc", "gcc libc6-dev", True, "guest tools"),
        _tool_check("nasm", "nasm", "nasm", True, "micro guest boot sectors"),
        _tool_check("busybox", "busybox", "busybox-static", False, "micro guest initramfs"),
        _tool_check(
            "virt-xml-validate", "virt-xml-validate", "libvirt-clients", False, "XML validation"
        ),
        _tool_check("xmllint", "xmllint", "libxml2-utils", False, "needed by virt-xml-validate"),
        check_cloud_standin_tools(),
        check_swtpm_localca(),
    ]


def required_failures(checks: list[Check]) -> list[Check]:
    """The required checks that failed (``harness doctor`` exits non-zero when any)."""
    return [c for c in checks if c.required and not c.ok]


def render(checks: list[Check]) -> list[str]:
    """One line per check: ``ok|missing|info  name  detail  (fix: ...)``.

    ``missing`` marks a failed required check, ``info`` a failed optional one.
    """
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        status = "ok" if c.ok else ("missing" if c.required else "info")
        line = f"{status:<7}  {c.name:<{width}}  {c.detail}"
        if c.fix and not c.ok:
            line += f"  (fix: {c.fix})"
        lines.append(line)
    return lines


# --- fixing -----------------------------------------------------------------


def _run(argv: list[str], log: Callable[[str], None], env: dict[str, str] | None = None) -> None:
    log("$ " + " ".join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): " + " | ".join(tail))


def missing_packages(packages: tuple[str, ...] = APT_PACKAGES) -> list[str]:
    """The packages dpkg does not report as installed."""
    missing = []
    for pkg in packages:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0 or "install ok installed" not in proc.stdout:
            missing.append(pkg)
    return missing


def install_packages(log: Callable[[str], None]) -> None:
    """apt-get install whatever of :data:`APT_PACKAGES` is missing (one ``update`` first)."""
    missing = missing_packages()
    if not missing:
        log("all packages installed")
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update"], log, env)
    _run(["apt-get", "install", "-y", "--no-install-recommends", *missing], log, env)


def _start_daemon(name: str, log: Callable[[str], None]) -> None:
    if systemd_is_init():
        _run(["systemctl", "start", name], log)
    else:
        # Without systemd nothing else will start them; -d daemonises.
        _run([name, "-d"], log)


def wait_for_libvirtd(timeout_s: float = 30.0, uri: str = LIBVIRT_URI) -> None:
    """Block until libvirt at ``uri`` answers; ``ConnectionError`` after ``timeout_s``."""
    for attempt in Retrying(
        stop=stop_after_delay(timeout_s),
        wait=wait_fixed(0.5),
        retry=retry_if_exception_type(ConnectionError),
        reraise=True,
    ):
        with attempt:
            err = _libvirt_open_error(uri)
            if err is not None:
                raise ConnectionError(f"libvirtd not answering at {uri}: {err}")


def _mount(fstype: str, target: Path, log: Callable[[str], None]) -> None:
    if os.path.ismount(target):
        return
    _run(["mount", "-t", fstype, "nodev", str(target)], log)


def fix_dev_kvm(log: Callable[[str], None]) -> None:
    """``chgrp kvm /dev/kvm; chmod 660 /dev/kvm`` (what udev would do on a normal host)."""
    if not DEV_KVM.exists():
        log("/dev/kvm does not exist; nothing to fix (KVM unavailable on this host)")
        return
    gid = grp.getgrnam("kvm").gr_gid
    log(f"chgrp kvm {DEV_KVM}; chmod 660 {DEV_KVM}")
    os.chown(DEV_KVM, -1, gid)
    os.chmod(DEV_KVM, 0o660)


def apply_fixes(checks: list[Check], log: Callable[[str], None]) -> None:
    """Repair what the failed ``checks`` point at; ``log`` receives each action.

    Order matters: packages first (they bring the daemons and tools), then
    daemons, then kernel filesystems and /dev/kvm.
    """
    failed = {c.name for c in checks if not c.ok}
    if "root" in failed:
        raise PermissionError("harness doctor --fix must run as root")
    install_packages(log)
    if "virtlogd" in failed and not _running("virtlogd"):
        _start_daemon("virtlogd", log)
    if "libvirtd" in failed:
        if not _running("libvirtd"):
            _start_daemon("libvirtd", log)
        wait_for_libvirtd()
        log(f"libvirtd answers at {LIBVIRT_URI}")
    if "tracefs" in failed:
        _mount("tracefs", TRACEFS, log)
    if "debugfs-kvm" in failed:
        _mount("debugfs", DEBUGFS, log)
    if "/dev/kvm" in failed:
        fix_dev_kvm(log)
    if "swtpm-localca" in failed and SWTPM_LOCALCA.is_dir():
        fix_swtpm_localca(log)
