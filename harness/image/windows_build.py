"""`harness image build windows`: a user's Windows ISO + the virtio-win ISO -> a cached base disk.

Steps (docs/WINDOWS.md shows each one's output):

1. inputs checked before anything boots: both ISOs exist and are ISO 9660,
   the Windows ISO has the digest asked for (``--iso-sha256``), a password is
   given (environment variable or file, never an option: options end up in
   shell history and process lists), the tools are installed;
2. the cache key: the ISOs' digests, the edition and this recipe's files;
3. in a staging directory: the WinRM listener certificate (its SHA-256 goes
   into the manifest, for pinning), ``autounattend.xml`` from its template,
   the tools cross-built with mingw-w64 (kvm-marker, kvm-phase, the workloads), all on
   an answer CD;
4. the installer boots (OVMF, TPM, virtio, the three CDs) and runs unattended;
   it shuts itself down once ``setup-winrm.ps1`` has run;
5. the answer CD and the certificate's private key are deleted, the manifest
   (no secret in it) and SHA256SUMS written, the entry renamed into place.

Step 4 needs a Windows ISO and hours of TCG or minutes of KVM; it is the one
step these machines cannot run (no ISO). It is passed in as ``install`` so
that everything around it is tested with a double.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from string import Template
from xml.sax.saxutils import escape

from harness.image import cache as image_cache
from harness.image.windows import (
    IMAGE_NAME,
    MANIFEST,
    WindowsImage,
    WindowsImageError,
    build_marker_exe,
    build_phase_exe,
    build_workload_exes,
    read_password,
)
from harness.paths import GUEST_TOOLS_DIR, VM_IMAGES_DIR

RECIPE_DIR = VM_IMAGES_DIR / "windows"
TEMPLATE = RECIPE_DIR / "autounattend.xml.in"
SETUP_SCRIPT = RECIPE_DIR / "setup-winrm.ps1"
#: What setup-winrm.ps1 turns off or changes that would perturb measurements (manifest).
SETTINGS_OFF = (
    "windows-update", "defender", "sysmain", "search-indexer", "scheduled-defrag",
    "high-performance-power-plan", "autologon-after-setup",
)
ADMIN_USER = "Administrator"
DISK_GIB = 64
#: A marker file on the answer CD: the first-logon command finds the CD's drive by it.
ANSWER_MARK = "kvm-harness-answer.txt"
#: virtio-win driver folders Setup loads in windowsPE (disk, SCSI, network).
VIRTIO_DRIVERS = ("viostor", "vioscsi", "NetKVM")
#: Drive letters the virtio-win CD may get in windowsPE (the install CD takes one).
DRIVE_LETTERS = ("D", "E", "F", "G")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildInputs:
    """Checked inputs of one build; the password is held, never printed (repr hides it)."""

    iso: Path
    virtio_iso: Path
    edition: str
    iso_sha256: str
    virtio_sha256: str
    password: str

    def __repr__(self) -> str:
        return (f"BuildInputs(iso={self.iso}, virtio_iso={self.virtio_iso}, "
                f"edition={self.edition!r})")


#: Boots the installer with the answer CD; returns the Windows build once Windows has
#: installed, shut down, and answered WinRM with the pinned certificate (or raises).
#: Arguments: inputs, staging directory, disk, answer CD, listener sha256, progress.
Install = Callable[[BuildInputs, Path, Path, Path, str, Progress], str]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_iso(path: Path | None, option: str) -> Path:
    if path is None:
        raise WindowsImageError(f"{option} is required (fix: {option} PATH to the ISO file)")
    if not path.is_file():
        raise WindowsImageError(
            f"{option} {path}: no such file (fix: download it and give its path; "
            "docs/WINDOWS.md says where)"
        )
    with path.open("rb") as f:
        f.seek(0x8001)
        if f.read(5) != b"CD001":
            raise WindowsImageError(
                f"{option} {path}: not an ISO 9660 image (no CD001 volume descriptor) "
                "(fix: give the .iso file itself, not an archive or a mounted folder)"
            )
    return path


def check_inputs(
    iso: Path | None,
    virtio_iso: Path | None,
    edition: str,
    *,
    iso_sha256: str | None = None,
    env: Mapping[str, str] | None = None,
) -> BuildInputs:
    """Every input of a build checked, before anything is made or booted."""
    iso = _check_iso(iso, "--iso")
    virtio_iso = _check_iso(virtio_iso, "--virtio-iso")
    if not edition.strip() or any(c in edition for c in "<>&\r\n"):
        raise WindowsImageError(
            f"--edition {edition!r}: not an image name (fix: the NAME column of "
            "`wiminfo sources/install.wim` on the ISO, e.g. 'Windows 11 Pro')"
        )
    password = read_password(env)
    for tool, package in (("xorriso", "xorriso"), ("qemu-img", "qemu-utils")):
        if shutil.which(tool) is None:
            raise WindowsImageError(f"{tool} not found (fix: apt-get install {package})")
    digest = _sha256(iso)
    if iso_sha256 is not None and digest != iso_sha256.lower():
        raise WindowsImageError(
            f"--iso {iso}: sha256 {digest}, expected {iso_sha256.lower()} (fix: download the "
            "ISO again, or pass the digest the vendor publishes for this file)"
        )
    return BuildInputs(iso, virtio_iso, edition.strip(), digest, _sha256(virtio_iso), password)


def recipe_digest(inputs: BuildInputs) -> str:
    """The cache key: both ISOs, the edition, the recipe and the tools' sources."""
    h = hashlib.sha256()
    for part in (inputs.iso_sha256, inputs.virtio_sha256, inputs.edition):
        h.update(part.encode() + b"\0")
    files = [TEMPLATE, SETUP_SCRIPT, *sorted(GUEST_TOOLS_DIR.glob("*-win.c")),
             GUEST_TOOLS_DIR / "kvm-marker.c"]
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _encoded(password: str, suffix: str) -> str:
    """Windows Setup's encoding of a password field (base64 of UTF-16LE password+suffix)."""
    return base64.b64encode((password + suffix).encode("utf-16-le")).decode()


def render_autounattend(inputs: BuildInputs, computer_name: str = "KVMH-WIN") -> str:
    """``autounattend.xml`` for ``inputs`` (every value XML-escaped)."""
    paths = []
    n = 0
    for driver in VIRTIO_DRIVERS:
        for letter in DRIVE_LETTERS:
            n += 1
            paths.append(
                f'        <PathAndCredentials wcm:action="add" wcm:keyValue="{n}">'
                f"<Path>{letter}:\\{driver}\\w11\\amd64</Path></PathAndCredentials>"
            )
    values = {
        "LOCALE": "en-US",
        "EDITION": escape(inputs.edition),
        "COMPUTER_NAME": escape(computer_name),
        "ADMIN_USER": ADMIN_USER,
        "ADMIN_PASSWORD_ENCODED": _encoded(inputs.password, "AdministratorPassword"),
        "AUTOLOGON_PASSWORD_ENCODED": _encoded(inputs.password, "Password"),
        "DRIVER_PATHS": "\n".join(paths),
    }
    return Template(TEMPLATE.read_text()).substitute(values)


def make_listener_cert(directory: Path, hostname: str = "kvmh-win") -> tuple[Path, Path, str]:
    """The WinRM listener's self-signed certificate: (PFX with its key, PEM, SHA-256 of DER).

    Made fresh per build: each image has its own, so a guest answering with
    another image's certificate is refused.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import pkcs12
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pfx = directory / "listener.pfx"
    pfx.write_bytes(pkcs12.serialize_key_and_certificates(
        hostname.encode(), key, cert, None, serialization.NoEncryption()))
    pfx.chmod(0o600)
    pem = directory / "winrm-listener.crt"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pfx, pem, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def make_answer_cd(staging: Path, inputs: BuildInputs) -> tuple[Path, str]:
    """The answer CD (autounattend.xml, setup script, listener PFX, tools): (ISO, cert sha256)."""
    root = staging / "answer"
    (root / "tools").mkdir(parents=True)
    _pfx, pem, fingerprint = make_listener_cert(root)
    pem.rename(staging / pem.name)  # the public half stays with the image
    (root / "autounattend.xml").write_text(render_autounattend(inputs))
    shutil.copy(SETUP_SCRIPT, root / SETUP_SCRIPT.name)
    (root / ANSWER_MARK).write_text("kvm-harness answer CD\n")
    build_marker_exe(root / "tools")
    build_phase_exe(root / "tools")
    build_workload_exes(root / "tools")
    iso = staging / "answer.iso"
    proc = subprocess.run(
        ["xorriso", "-as", "mkisofs", "-quiet", "-J", "-r", "-V", "KVMH_ANSWER",
         "-o", str(iso), str(root)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise WindowsImageError(f"xorriso could not make the answer CD: {proc.stderr.strip()}")
    iso.chmod(0o600)
    return iso, fingerprint


def build_windows_image(
    inputs: BuildInputs,
    install: Install,
    *,
    progress: Progress = print,
    cache: Path | None = None,
    force: bool = False,
) -> WindowsImage:
    """Build (or find cached) the image of ``inputs``; ``install`` runs Windows Setup."""
    digest = recipe_digest(inputs)
    with image_cache.entry_lock(IMAGE_NAME, digest, cache):
        if not force and image_cache.lookup(IMAGE_NAME, digest, cache) is not None:
            progress(f"windows image {digest[:12]}: cached")
            return WindowsImage.from_manifest(image_cache.entry_dir(IMAGE_NAME, digest, cache))
        with image_cache.staging(IMAGE_NAME, digest, cache) as staging:
            progress("answer CD: listener certificate, autounattend.xml, tools (mingw-w64)")
            answer, fingerprint = make_answer_cd(staging, inputs)
            disk = staging / "disk.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk),
                            f"{DISK_GIB}G"], check=True)
            progress(f"installing {inputs.edition!r} unattended (OVMF, TPM 2.0, virtio)")
            started = time.monotonic()
            try:
                build = install(inputs, staging, disk, answer, fingerprint, progress)
            finally:
                # The answer CD holds the encoded password and the listener's private key.
                answer.unlink(missing_ok=True)
                shutil.rmtree(staging / "answer", ignore_errors=True)
            progress(f"installed in {time.monotonic() - started:.0f} s (build {build})")
            manifest = {
                "name": IMAGE_NAME,
                "digest": digest,
                "disk": disk.name,
                "username": ADMIN_USER,
                "winrm_cert_sha256": fingerprint,
                "winrm_cert": "winrm-listener.crt",
                "edition": inputs.edition,
                "build": build,
                "iso_sha256": inputs.iso_sha256,
                "virtio_iso_sha256": inputs.virtio_sha256,
                "settings": list(SETTINGS_OFF),
                "built_at": datetime.datetime.now(datetime.UTC).isoformat(),
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return WindowsImage.from_manifest(image_cache.entry_dir(IMAGE_NAME, digest, cache))


#: Linux key code of Enter, sent while "Press any key to boot from CD or DVD" waits.
KEY_ENTER = 28


def run_installer(
    inputs: BuildInputs,
    staging: Path,
    disk: Path,
    answer: Path,
    fingerprint: str,
    progress: Progress,
    *,
    install_timeout_s: float = 4 * 3600,
) -> str:
    """Windows Setup from the ISO, unattended, then one boot to read the build over WinRM.

    Not run on the project's machines (no Windows ISO there); docs/WINDOWS.md
    is the procedure on a bare-metal host.
    """
    import libvirt

    from harness.guest.winrm import Secret, WinrmGuest, WinrmTarget
    from harness.host.facts import choose_accelerator, collect_host_facts
    from harness.vm import lifecycle
    from harness.vm.domain import DomainConfig, UefiBoot
    from harness.vm.windows import WindowsDomain, remove_run_files

    accel, why = choose_accelerator("auto", collect_host_facts())
    progress(f"accelerator {accel}: {why}")
    conn = lifecycle.connect()

    def boot(cdroms: tuple[Path, ...], tag: str) -> tuple[lifecycle.RunningVm, WindowsDomain]:
        win = WindowsDomain(
            name=f"kvmh-imagebuild-{tag}-{inputs.iso_sha256[:8]}", accelerator=accel,
            memory_mib=4096, vcpus=2, disk=disk, nvram=staging / "VARS.fd",
            console_log=staging / f"{tag}.console.log", winrm_port=lifecycle.free_port(),
            cdroms=cdroms,
        )
        cfg = DomainConfig(name=win.name, domain_type="kvm" if accel == "kvm" else "qemu",
                           memory_mib=4096, vcpus=2, boot=UefiBoot(win),
                           console_log=win.console_log, disk=disk)
        return lifecycle.start(conn, cfg), win

    vm, win = boot((inputs.iso, inputs.virtio_iso, answer), "install")
    try:
        for _ in range(60):  # the ISO's boot loader waits for a key, then boots the disk
            vm.domain.sendKey(libvirt.VIR_KEYCODE_SET_LINUX, 0, [KEY_ENTER], 1, 0)
            time.sleep(1)
        progress("Windows Setup running; it shuts down when setup-winrm.ps1 has run")
        if not lifecycle.wait_stopped(vm, install_timeout_s):
            raise WindowsImageError(
                f"Windows Setup did not finish within {install_timeout_s / 3600:.1f} h "
                f"(console: {win.console_log}; fix: check --edition names an image of the ISO)"
            )
    finally:
        lifecycle.destroy(vm)
    vm, win = boot((), "check")
    try:
        target = WinrmTarget("127.0.0.1", win.winrm_port, ADMIN_USER, Secret(inputs.password),
                             fingerprint)
        guest = WinrmGuest.connect(target, time.monotonic() + 1800)
        try:
            out = guest.run("cmd /c ver", timeout_s=60).stdout
            guest.run("shutdown /s /t 5", timeout_s=60)
        finally:
            guest.close()
        lifecycle.wait_stopped(vm, 600)
    finally:
        lifecycle.destroy(vm)
        remove_run_files(win)
    return out.strip().rsplit(" ", 1)[-1].rstrip("]") or "unknown"
