"""Guest tools for Windows guests, cross-built with Debian's mingw-w64 toolchain.

No Windows image can be built on these machines; what can be built is the
phase-marker tool a Windows guest runs (over WinRM) to bracket its phases,
from the same source as the Linux one: ``cpuid`` is the same instruction
there and traps to KVM the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from harness.image import cache as image_cache
from harness.paths import GUEST_TOOLS_DIR

CROSS_CC = "x86_64-w64-mingw32-gcc"
MARKER_SOURCE = GUEST_TOOLS_DIR / "kvm-marker.c"


class CrossBuildError(RuntimeError):
    """The Windows tools could not be built; the message says how to fix it."""


def build_marker_exe(out_dir: Path, cc: str = CROSS_CC) -> Path:
    """Compile ``kvm-marker.exe`` (a static PE32+ console program) into ``out_dir``."""
    if shutil.which(cc) is None:
        raise CrossBuildError(f"{cc} not found (fix: apt-get install gcc-mingw-w64-x86-64-win32)")
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = out_dir / "kvm-marker.exe"
    proc = subprocess.run(
        [cc, "-O2", "-static", "-Wall", "-Werror", "-o", str(exe), str(MARKER_SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise CrossBuildError(f"{MARKER_SOURCE}: {cc} failed:\n{proc.stderr.strip()}")
    return exe


# -- the Windows image: built on bare metal from a user-supplied ISO (docs/WINDOWS.md) --

#: The image cache's name for Windows entries (``<cache>/images/windows-<digest12>``).
IMAGE_NAME = "windows"
#: Where the administrator password is read from, at build and at run time; never stored.
PASSWORD_ENV = "HARNESS_WINDOWS_PASSWORD"
PASSWORD_FILE_ENV = "HARNESS_WINDOWS_PASSWORD_FILE"
MANIFEST = "manifest.json"


class WindowsImageError(RuntimeError):
    """A Windows image cannot be built or used; the message names the input and a fix."""


@dataclass(frozen=True)
class WindowsImage:
    """A built Windows image: its base disk and what the harness needs to reach it."""

    directory: Path
    digest: str
    disk: Path
    username: str
    winrm_cert_sha256: str  # the listener certificate made at build time: pinned
    edition: str
    iso_sha256: str
    build: str  # Windows build number, read over WinRM at the end of the build
    settings: tuple[str, ...]  # what the build turned off that would perturb measurements

    @classmethod
    def from_manifest(cls, directory: Path) -> WindowsImage:
        """The image whose manifest is in ``directory``; WindowsImageError if it is unusable."""
        path = directory / MANIFEST
        try:
            m = json.loads(path.read_text())
            return cls(
                directory=directory,
                digest=str(m["digest"]),
                disk=directory / str(m["disk"]),
                username=str(m["username"]),
                winrm_cert_sha256=str(m["winrm_cert_sha256"]),
                edition=str(m["edition"]),
                iso_sha256=str(m["iso_sha256"]),
                build=str(m.get("build", "")),
                settings=tuple(str(s) for s in m.get("settings", [])),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WindowsImageError(
                f"{path}: not a Windows image manifest ({type(exc).__name__}: {exc}) "
                "(fix: rebuild with `harness image build windows --iso ... --virtio-iso ...`)"
            ) from None


def cached_windows_image(cache: Path | None = None) -> WindowsImage | None:
    """The newest complete Windows image whose files verify, or None (none built here)."""
    root = image_cache.images_root(cache)
    found: list[WindowsImage] = []
    for d in root.glob(f"{IMAGE_NAME}-*"):
        if not d.is_dir() or image_cache.verify_entry(d) is not None:
            continue
        try:
            found.append(WindowsImage.from_manifest(d))
        except WindowsImageError:
            continue
    return max(found, key=lambda i: (i.directory / MANIFEST).stat().st_mtime, default=None)


def read_password(env: Mapping[str, str] | None = None) -> str:
    """The administrator password, from $HARNESS_WINDOWS_PASSWORD or the file named by
    $HARNESS_WINDOWS_PASSWORD_FILE (mode 0600 or stricter). Never logged or stored."""
    env = os.environ if env is None else env
    if value := env.get(PASSWORD_ENV):
        return value
    file = env.get(PASSWORD_FILE_ENV)
    if not file:
        raise WindowsImageError(
            f"no Windows administrator password: set {PASSWORD_ENV}, or {PASSWORD_FILE_ENV} "
            "to a file holding it (fix: export HARNESS_WINDOWS_PASSWORD_FILE=/root/win.pw "
            "after `install -m 600 /dev/null /root/win.pw` and writing the password there)"
        )
    path = Path(file)
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip("\r\n")
    except OSError as exc:
        raise WindowsImageError(
            f"{PASSWORD_FILE_ENV}={file}: cannot read it ({exc.strerror}) "
            "(fix: point it at an existing file holding the password)"
        ) from None
    if mode & 0o077:
        raise WindowsImageError(
            f"{PASSWORD_FILE_ENV}={file}: other users may read it (mode {mode & 0o777:o}) "
            f"(fix: chmod 600 {file})"
        )
    if not text:
        raise WindowsImageError(f"{PASSWORD_FILE_ENV}={file}: the file is empty (fix: write "
                                "the password into it)")
    return text


#: The Windows workload programs (workloads/*-win.toml), installed in the image.
WORKLOAD_PROGRAMS = ("page-touch-win", "membw-win", "proc-churn-win", "cr3-pingpong-win")


def build_phase_exe(out_dir: Path, cc: str = CROSS_CC) -> Path:
    """Cross-build ``kvm-phase.exe``, the phase runner beside ``kvm-marker.exe``."""
    if shutil.which(cc) is None:
        raise CrossBuildError(f"{cc} not found (fix: apt-get install gcc-mingw-w64-x86-64-win32)")
    out_dir.mkdir(parents=True, exist_ok=True)
    src, exe = GUEST_TOOLS_DIR / "kvm-phase-win.c", out_dir / "kvm-phase.exe"
    proc = subprocess.run(
        [cc, "-O2", "-static", "-municode", "-Wall", "-Werror", "-o", str(exe), str(src)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise CrossBuildError(f"{src}: {cc} failed:\n{proc.stderr.strip()}")
    return exe


def build_workload_exes(out_dir: Path, cc: str = CROSS_CC) -> list[Path]:
    """Cross-build every Windows workload program into ``out_dir`` (static PE32+ console)."""
    if shutil.which(cc) is None:
        raise CrossBuildError(f"{cc} not found (fix: apt-get install gcc-mingw-w64-x86-64-win32)")
    out_dir.mkdir(parents=True, exist_ok=True)
    built = []
    for name in WORKLOAD_PROGRAMS:
        src, exe = GUEST_TOOLS_DIR / f"{name}.c", out_dir / f"{name}.exe"
        proc = subprocess.run(
            [cc, "-O2", "-static", "-Wall", "-Werror", "-o", str(exe), str(src), "-lpsapi"],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise CrossBuildError(f"{src}: {cc} failed:\n{proc.stderr.strip()}")
        built.append(exe)
    return built
