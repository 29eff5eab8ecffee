"""What the micro guests' ROM builds share: parameter checks, nasm, readable files.

micro.py (real mode) and paging.py (long mode) differ in their source and
their phase tables; how a token and phase names are checked, how nasm is run
and how the ROM lands where libvirt's QEMU (user libvirt-qemu) can read it
is the same, and lives here. Errors are raised as the caller's own class.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

#: Marker tokens are 16 bits (ECX = token << 16 | phase).
MAX_TOKEN = 0xFFFF


class _Named(Protocol):
    @property
    def name(self) -> str: ...


def check_token(token: object, error: type[Exception]) -> None:
    """Raise ``error`` unless ``token`` is an integer in 1..MAX_TOKEN."""
    if isinstance(token, bool) or not isinstance(token, int) or not 1 <= token <= MAX_TOKEN:
        raise error(f"token: {token!r} is not an integer in 1..{MAX_TOKEN}")


def check_phases(
    phases: Sequence[object],
    phase_type: type[_Named],
    *,
    guest: str,
    max_phases: int,
    error: type[Exception],
) -> None:
    """Raise ``error`` for a phase count out of range, a wrong type, or an empty or repeated
    name; ``guest`` names the guest in the message ("micro", "paging")."""
    if not 1 <= len(phases) <= max_phases:
        raise error(f"phases: {len(phases)} given; the {guest} guest runs 1..{max_phases} phases")
    seen: set[str] = set()
    for i, ph in enumerate(phases):
        where = f"phases[{i}]"
        if not isinstance(ph, phase_type):
            raise error(f"{where}: expected {phase_type.__name__}, got {type(ph).__name__}")
        if not isinstance(ph.name, str) or not ph.name.strip():
            raise error(f"{where}.name: must be a non-empty string")
        if ph.name in seen:
            raise error(f"{where}.name: {ph.name!r} is used twice; names must be unique")
        seen.add(ph.name)


def run_nasm(
    source: Path, args: Sequence[str], *, guest: str, error: type[Exception]
) -> bytes:
    """Assemble ``source`` as a flat binary with ``args`` (``-D...``); return its bytes."""
    nasm = shutil.which("nasm")
    if nasm is None:
        raise error(
            f"nasm not found on PATH; the {guest} guest is assembled with it: apt-get install nasm"
        )
    with tempfile.TemporaryDirectory(prefix=f"{guest}-nasm-") as tmp:
        out = Path(tmp) / f"{guest}.rom"
        cmd = [nasm, "-f", "bin", *args, "-o", str(out), str(source)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise error(f"{source}: nasm failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return out.read_bytes()


def readable_dir(out_dir: Path) -> None:
    """Create ``out_dir`` traversable by everyone (libvirt's QEMU must reach the files)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir.chmod(out_dir.stat().st_mode | 0o755)


def write_readable(path: Path, data: bytes) -> None:
    """Write ``data`` atomically, mode 0644 (libvirt's QEMU runs as libvirt-qemu)."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
