"""Guest tools for Windows guests, cross-built with Debian's mingw-w64 toolchain.

No Windows image can be built on these machines; what can be built is the
phase-marker tool a Windows guest runs (over WinRM) to bracket its phases,
from the same source as the Linux one: ``cpuid`` is the same instruction
there and traps to KVM the same way.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

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
