"""Start, watch and tear down the harness's VMs through libvirt.

Domains are transient and started with AUTODESTROY: libvirtd destroys them
when the harness's connection closes, so even a SIGKILLed harness leaves no
running VM. Names carry a fixed prefix and the run id so that a later run can
find and reap anything a killed run left (overlays, run directories).
"""

from __future__ import annotations

import contextlib
import grp
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import libvirt

from harness.host.process import pid_alive
from harness.vm.domain import DomainConfig, domain_xml

DOMAIN_PREFIX = "kvmh-"
OWNER_FILE = "owner.pid"
#: The result file a run writes, so whoever reaps the run can say what happened to it.
RESULT_FILE = "result.path"
#: Namespace of the <metadata> element naming the process that started a domain.
OWNER_NS = "https://kvm-mmu-harness.invalid/owner"


#: The group libvirt runs QEMU with (its DAC label): Debian's, then Fedora's name.
QEMU_GROUPS = ("libvirt-qemu", "qemu")
#: Run and image directories: root lists and writes them; QEMU's group only passes through
#: to the files libvirt relabels for it (dynamic_ownership chowns each disk, kernel,
#: initrd and console file to QEMU's user while the domain runs, and back afterwards).
PRIVATE_DIR_MODE = 0o710
#: Files that hold a guest's disk (and so its SSH host private key): root only.
PRIVATE_FILE_MODE = 0o600


class VmError(Exception):
    """A VM could not be started or managed."""


def qemu_gid() -> int | None:
    """The group id QEMU runs with under libvirt, None where no such group exists."""
    for name in QEMU_GROUPS:
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            continue
    return None


def make_private_dir(path: Path) -> None:
    """Close ``path`` to other local users; QEMU may still pass through it.

    Mode 0710 owned by root and QEMU's group. Where that group does not exist,
    0711: anyone may pass through but nobody list it, and the files inside are
    0600 (PRIVATE_FILE_MODE) anyway.
    """
    gid = qemu_gid()
    if gid is None:
        path.chmod(0o711)
        return
    os.chown(path, os.geteuid(), gid)
    path.chmod(PRIVATE_DIR_MODE)


def domain_name(run_id: str, vm: str) -> str:
    """The libvirt name of VM ``vm`` in run ``run_id``."""
    return f"{DOMAIN_PREFIX}{run_id}-{vm}"


def connect(uri: str = "qemu:///system") -> libvirt.virConnect:
    """Open libvirt, with an error that says how to get it running."""
    # libvirt's default handler prints every error to stderr, even ones the
    # harness expects and handles (a transient domain gone after it stopped).
    libvirt.registerErrorHandler(_ignore_libvirt_error, None)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise VmError(
            f"cannot reach libvirtd at {uri}: {exc} "
            "(fix: `harness doctor --fix` starts virtlogd and libvirtd)"
        ) from exc
    if conn is None:  # pragma: no cover - older bindings returned None
        raise VmError(f"cannot reach libvirtd at {uri}")
    return conn


def _ignore_libvirt_error(ctx: object, err: object) -> None:
    """Errors still raise libvirtError; this only stops the duplicate stderr line."""


@dataclass
class RunningVm:
    """A started domain and the host-side files that belong to it."""

    name: str
    domain: libvirt.virDomain
    pid: int  # the QEMU process: what the tracer filters on
    console_log: Path
    overlay: Path | None
    ssh_port: int | None
    started_ns: int


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def create_overlay(base: Path, overlay: Path, base_format: str = "qcow2") -> None:
    """A qcow2 overlay on ``base`` (qcow2 or raw): the guest writes there, the base stays
    pristine.

    Mode 0600: libvirt hands it to QEMU's user while the domain runs.
    """
    proc = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base),
         str(overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise VmError(f"qemu-img create {overlay} failed: {proc.stderr.strip()}")
    overlay.chmod(PRIVATE_FILE_MODE)


def start(conn: libvirt.virConnect, cfg: DomainConfig, *, paused: bool = False) -> RunningVm:
    """Create the transient domain of ``cfg``; paused, it has a QEMU pid but runs nothing."""
    cfg.console_log.touch(mode=PRIVATE_FILE_MODE)
    flags = libvirt.VIR_DOMAIN_START_AUTODESTROY
    if paused:
        flags |= libvirt.VIR_DOMAIN_START_PAUSED
    try:
        dom = conn.createXML(with_owner(domain_xml(cfg), os.getpid()), flags)
    except libvirt.libvirtError as exc:
        raise VmError(f"libvirt refused to start {cfg.name}: {exc}") from exc
    return RunningVm(
        cfg.name,
        dom,
        qemu_pid(cfg.name),
        cfg.console_log,
        cfg.disk,
        cfg.ssh_port,
        time.monotonic_ns(),
    )


#: QEMU's words when the forward's host port is bound by somebody else.
PORT_TAKEN = "Could not set up host forwarding rule"


def start_forwarded(
    conn: libvirt.virConnect,
    cfg: DomainConfig,
    port: Callable[[], int] = free_port,
    *,
    attempts: int = 4,
    paused: bool = False,
) -> RunningVm:
    """Start ``cfg``; if its SSH forward's port was taken meanwhile, again on ``port()``.

    Finding a free port and QEMU binding it are not one step: another run on
    the host may bind the port in between, and QEMU then exits at start
    (PORT_TAKEN). A port is cheap, so try another; any other error is raised.
    """
    for attempt in range(1, attempts + 1):
        try:
            return start(conn, cfg, paused=paused)
        except VmError as exc:
            if PORT_TAKEN not in str(exc) or attempt == attempts:
                raise
            cfg = replace(cfg, ssh_port=port())
    raise AssertionError("unreachable")  # the loop returns or raises


def with_owner(xml: str, pid: int) -> str:
    """``xml`` with a <metadata> element naming ``pid`` as the domain's owner.

    The reaper then spares every domain whose owner is alive, also those that
    tests and benchmarks start outside any run directory.
    """
    root = ET.fromstring(xml)
    meta = root.find("metadata")
    if meta is None:
        meta = ET.SubElement(root, "metadata")
    ET.SubElement(meta, f"{{{OWNER_NS}}}owner", pid=str(pid))
    return ET.tostring(root, encoding="unicode")


def domain_owner(dom: libvirt.virDomain) -> int | None:
    """The pid in a domain's owner metadata; None when it has none."""
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, OWNER_NS)
        return int(ET.fromstring(text).attrib["pid"])
    except (libvirt.libvirtError, ET.ParseError, KeyError, ValueError):
        return None


def qemu_pid(name: str) -> int:
    """The QEMU process id libvirt recorded for domain ``name``."""
    pidfile = Path("/run/libvirt/qemu") / f"{name}.pid"
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError) as exc:
        raise VmError(f"cannot read the QEMU pid of {name} from {pidfile}: {exc}") from exc


def resume(vm: RunningVm) -> None:
    """Let a paused domain's vCPUs run."""
    vm.domain.resume()


def is_running(vm: RunningVm) -> bool:
    """Whether the domain still exists and is active."""
    try:
        return bool(vm.domain.isActive())
    except libvirt.libvirtError:
        return False  # transient domains vanish once they stop


def wait_stopped(
    vm: RunningVm, timeout_s: float, stop: threading.Event | None = None
) -> bool:
    """Wait for a guest that ends itself (the micro guest); False on timeout or ``stop``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_running(vm):
            return True
        if stop is not None and stop.wait(0.05):
            return False
        if stop is None:
            time.sleep(0.05)
    return False


def connection_lost(exc: libvirt.libvirtError) -> bool:
    """Whether ``exc`` says the connection to libvirtd is gone (not the domain)."""
    return exc.get_error_domain() == libvirt.VIR_FROM_RPC or "client socket is closed" in str(exc)


#: How a reason from ``why_not_running`` starts when libvirtd itself is gone.
LIBVIRTD_LOST = "lost the connection to libvirtd"
#: Where libvirt's QEMU driver logs each domain's start and end ("shutting down, reason=...").
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")


def shutdown_reason(name: str) -> str | None:
    """libvirt's own word for how domain ``name`` ended (destroyed, crashed, shutdown ...)."""
    try:
        text = (QEMU_LOG_DIR / f"{name}.log").read_text(errors="replace")
    except OSError:
        return None
    found = re.findall(r"shutting down, reason=(\w+)", text)
    return found[-1] if found else None


#: How long a domain "shutting down" is watched for where it goes (a transient domain
#: destroyed from outside passes through that state for a moment before it is gone).
SHUTTING_DOWN_WAIT_S = 3.0


def why_not_running(vm: RunningVm) -> str | None:
    """None while the domain runs; else what happened to it, in words, for a result file.

    Tells a lost libvirtd connection (the domain's state is then unknown) from a
    domain that is gone (destroyed from outside, QEMU exited) or stopped.
    """
    deadline = time.monotonic() + SHUTTING_DOWN_WAIT_S
    while True:
        said, passing = _why_not_running(vm)
        if not passing or time.monotonic() > deadline:
            return said
        time.sleep(0.1)


def _why_not_running(vm: RunningVm) -> tuple[str | None, bool]:
    """What happened to the domain, and whether that is a state it only passes through."""
    try:
        state, reason = vm.domain.state()
    except libvirt.libvirtError as exc:
        if connection_lost(exc):
            return (
                f"{LIBVIRTD_LOST} ({exc}): libvirtd stopped or restarted; "
                f"the state of domain {vm.name} is unknown"
            ), False
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            said = shutdown_reason(vm.name)
            how = f"libvirt logged 'shutting down, reason={said}'" if said else "no libvirt log"
            return (
                f"domain {vm.name} is gone: destroyed from outside the harness, or QEMU "
                f"(pid {vm.pid}) exited ({how})"
            ), False
        return f"cannot ask libvirt about domain {vm.name}: {exc}", False
    if state == libvirt.VIR_DOMAIN_RUNNING:
        return None, False
    names = {
        libvirt.VIR_DOMAIN_PAUSED: "paused",
        libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
        libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
        libvirt.VIR_DOMAIN_CRASHED: "crashed",
        libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended by the guest",
    }
    said = f"domain {vm.name} is {names.get(state, f'in state {state}')} (reason code {reason})"
    # A transient domain destroyed from outside is "shutting down" for a moment, then gone.
    return said, state == libvirt.VIR_DOMAIN_SHUTDOWN


def destroy(vm: RunningVm) -> None:
    """Stop the domain and delete its overlay; safe to call twice.

    If the libvirtd connection was lost (libvirtd restarted: its AUTODESTROY no
    longer applies, and a restarted libvirtd re-adopts the running QEMU), a new
    connection destroys the domain; with no libvirtd answering, QEMU is killed.
    """
    try:
        if vm.domain.isActive():
            vm.domain.destroy()
    except libvirt.libvirtError as exc:
        # Otherwise already gone: transient domains disappear when QEMU exits.
        if connection_lost(exc):
            _destroy_without_connection(vm)
    if vm.overlay is not None:
        vm.overlay.unlink(missing_ok=True)


def _destroy_without_connection(
    vm: RunningVm, reconnect_s: float = 5.0, wait_s: float = 10.0
) -> None:
    deadline = time.monotonic() + reconnect_s
    while _is_qemu_of(vm.pid, vm.name):
        try:
            conn = libvirt.open("qemu:///system")
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                break  # no libvirtd answers: QEMU is killed below
            time.sleep(0.5)
            continue
        try:
            dom = conn.lookupByName(vm.name)  # a restarted libvirtd re-adopts running QEMUs
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError:
            pass  # it does not know the domain: QEMU is killed below
        finally:
            conn.close()
        break
    if _is_qemu_of(vm.pid, vm.name):
        os.kill(vm.pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while _is_qemu_of(vm.pid, vm.name) and time.monotonic() < deadline:
        time.sleep(0.1)


def _is_qemu_of(pid: int, name: str) -> bool:
    """Whether ``pid`` is still the QEMU of domain ``name`` (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return f"guest={name},".encode() in cmdline and "State:\tZ" not in status


def console_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a serial console log, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no console output)"
    tail = [ln.rstrip() for ln in text.splitlines() if ln.strip()][-lines:]
    return "\n".join(tail) or "(console empty)"


def claim_run_dir(run_dir: Path, result_path: Path | None = None) -> None:
    """Create ``run_dir`` and mark it as owned by this process, in one atomic step.

    The directory appears under its name only with its owner file inside: a
    concurrent run's reaper must never see it ownerless and delete it.
    """
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = run_dir.with_name(f".claim-{run_dir.name}-{os.getpid()}")
    staging.mkdir(mode=0o700)
    make_private_dir(staging)  # QEMU runs as libvirt-qemu and must reach the files inside
    (staging / OWNER_FILE).write_text(str(os.getpid()))
    if result_path is not None:
        (staging / RESULT_FILE).write_text(str(result_path.resolve()))
    try:
        staging.rename(run_dir)  # fails if run_dir exists: run ids are unique
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def copy_console_log(src: Path, dest: Path) -> bool:
    """Copy a console log to ``dest`` (evidence kept after the run); False if ``src`` is gone.

    Whoever can write ``dest``'s directory may have put a symlink or a hard link
    there: the copy goes to a new file beside it, renamed over ``dest`` (a
    rename replaces a link, never writes through it). ``src`` is opened without
    following a symlink.
    """
    try:
        fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:  # ELOOP: a symlink where QEMU's log file should be
        raise VmError(f"console log {src} not copied: {exc.strerror}") from exc
    with os.fdopen(fd_in, "rb") as fin:
        # mkstemp: O_EXCL under a random name, so nothing planted is written through.
        fd_out, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        try:
            with os.fdopen(fd_out, "wb") as fout:
                os.fchmod(fout.fileno(), 0o644)
                shutil.copyfileobj(fin, fout)
            os.rename(tmp_name, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
    return True


def _tell_dead_run(
    run_dir: Path, on_dead_run: Callable[[Path, Path, str], bool] | None, reaped: list[str]
) -> None:
    if on_dead_run is None:
        return
    try:
        result_file = Path((run_dir / RESULT_FILE).read_text().strip())
        owner = (run_dir / OWNER_FILE).read_text().strip()
    except OSError:
        return  # claimed before result files were recorded, or never finished claiming
    if on_dead_run(run_dir, result_file, owner):
        reaped.append(f"result {result_file} marked killed")


def _owner_alive(run_dir: Path) -> bool:
    if run_dir.name.startswith(".claim-"):  # being claimed: the pid is in its name
        pid_text = run_dir.name.rsplit("-", 1)[-1]
        return pid_text.isdigit() and pid_alive(int(pid_text))
    try:
        pid = int((run_dir / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return pid_alive(pid)


def reap_leftovers(
    conn: libvirt.virConnect,
    runs_dir: Path,
    log: Callable[[str], None],
    on_dead_run: Callable[[Path, Path, str], bool] | None = None,
) -> list[str]:
    """Destroy domains and delete run directories that a killed run left behind.

    Only what belongs to a run whose harness process is gone is touched, so
    two harness runs on one host do not reap each other. Before a dead run's
    directory goes, ``on_dead_run(run_dir, result_file, owner)`` may record
    what happened in that run's result file (see results.mark_killed).
    """
    reaped: list[str] = []
    live_runs = (
        {d.name for d in runs_dir.iterdir() if d.is_dir() and _owner_alive(d)}
        if runs_dir.is_dir()
        else set()
    )
    for dom in conn.listAllDomains():
        name = dom.name()
        if not name.startswith(DOMAIN_PREFIX):
            continue
        if any(name.startswith(f"{DOMAIN_PREFIX}{run}-") for run in live_runs):
            continue
        owner = domain_owner(dom)
        if owner is not None and pid_alive(owner):
            continue  # a live process's domain (another run, a test), not a leftover
        try:
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()
        except libvirt.libvirtError as exc:
            log(f"could not reap domain {name}: {exc}")
            continue
        reaped.append(f"domain {name}")
    if runs_dir.is_dir():
        for d in runs_dir.iterdir():
            if d.is_dir() and d.name not in live_runs:
                _tell_dead_run(d, on_dead_run, reaped)
                shutil.rmtree(d, ignore_errors=True)
                reaped.append(f"run directory {d}")
    for item in reaped:
        log(f"reaped leftover of a killed run: {item}")
    return reaped
