"""A disk image the user brings (``image = "cloud"``): checked before anything boots, hashed once.

The disk is never written: each boot runs on a qcow2 overlay whose backing
file it is. So it must be a single self-contained file QEMU opens as qcow2 or
raw. ``qemu-img info`` says which format it is; a qcow2 with a backing file of
its own is refused (the chain would be read from wherever that file points)
with the command that flattens it. Every file is "raw" to qemu-img, so a raw
disk must also start like a disk: a partition table's boot signature, which
firmware (SeaBIOS, OVMF) boots from.

Its sha256 goes into every boot's record; a 2 GiB disk takes seconds to hash,
so the digest is cached under ``<cache>/disk-digests/`` by device, inode,
size and modification time: a changed file is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from harness import paths

#: Offset and value of the boot signature an MBR (and GPT's protective MBR) ends with.
BOOT_SIGNATURE_AT, BOOT_SIGNATURE = 510, b"\x55\xaa"
DIGEST_DIR = "disk-digests"


class DiskError(ValueError):
    """A disk that cannot be booted as given: ``reason`` and the ``fix``."""

    def __init__(self, reason: str, fix: str) -> None:
        self.reason, self.fix = reason, fix
        super().__init__(f"{reason} (fix: {fix})")


@dataclass(frozen=True)
class DiskInfo:
    """What ``qemu-img info`` said about a checked disk."""

    path: Path
    format: Literal["qcow2", "raw"]
    virtual_size: int


def check_disk(path: Path) -> DiskInfo:
    """``path`` as a bootable base for overlays; DiskError saying what is wrong and the fix."""
    if not path.exists():
        raise DiskError(f"{path} does not exist", "give the path of a qcow2 or raw disk image "
                        "(relative paths are read from the suite file's directory)")
    if not path.is_file():
        raise DiskError(f"{path} is not a regular file", "give a disk image file")
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise DiskError(f"{path} cannot be read: {exc.strerror}",
                        f"make it readable by root (chmod u+r {path})") from exc
    proc = subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", str(path)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise DiskError(f"qemu-img info cannot read {path}: {proc.stderr.strip()}",
                        "give a qcow2 or raw disk image")
    info = json.loads(proc.stdout)
    fmt = info.get("format")
    if fmt not in ("qcow2", "raw"):
        raise DiskError(
            f"{path} is a {fmt} image; the harness boots qcow2 or raw",
            f"convert it: qemu-img convert -O qcow2 {path} {path.with_suffix('.qcow2')}",
        )
    if fmt == "qcow2" and (backing := info.get("backing-filename")):
        raise DiskError(
            f"{path} is a qcow2 overlay on {backing}; each boot puts its own overlay on the "
            "disk, which must be one self-contained file",
            f"flatten it: qemu-img convert -O qcow2 {path} FLAT.qcow2, and name FLAT.qcow2",
        )
    if info.get("encrypted"):
        raise DiskError(f"{path} is encrypted", "give an unencrypted copy (qemu-img convert)")
    if fmt == "raw" and head[BOOT_SIGNATURE_AT:BOOT_SIGNATURE_AT + 2] != BOOT_SIGNATURE:
        raise DiskError(
            f"{path} is not a disk image: qemu-img reads any file as raw, and this one has no "
            "partition table (no boot signature 55 aa at byte 510) for the firmware to boot",
            "give the distribution's cloud image (qcow2, or raw with its partition table)",
        )
    return DiskInfo(path, fmt, int(info.get("virtual-size", 0)))


def disk_sha256(path: Path, cache: Path | None = None) -> str:
    """The sha256 of ``path``, from the cache while its device, inode, size and mtime hold."""
    st = path.stat()
    key = {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    where = (cache or paths.cache_dir()) / DIGEST_DIR
    entry = where / (hashlib.sha256(str(path.resolve()).encode()).hexdigest() + ".json")
    try:
        saved = json.loads(entry.read_text())
        if isinstance(saved, dict) and saved.get("key") == key:
            return str(saved["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    if path.stat().st_mtime_ns != st.st_mtime_ns:
        return digest  # changed while hashed: nothing to remember
    where.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=where, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump({"path": str(path.resolve()), "key": key, "sha256": digest}, f)
    os.replace(tmp, entry)
    return digest
