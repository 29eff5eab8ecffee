"""Which process owns something left on disk, whether that process still lives, and an
exclusive lock that names its holder.

A pid alone does not name a process: after the owner dies its pid may be given to
another one. A :class:`ProcessId` adds the process's start time (field 22 of
``/proc/PID/stat``, clock ticks since boot) and the boot id, so a reused pid, or a
record from before a reboot, is not taken for the living owner.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

PROC: Path = Path("/proc")


class ProcessId(BaseModel):
    """A process as it can be recognised later: pid, start time and boot."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pid: int = Field(ge=1, le=2**22)
    start_time: int | None = Field(
        default=None, ge=0, description="field 22 of /proc/PID/stat (clock ticks since boot)"
    )
    boot_id: str | None = Field(default=None, pattern=r"^[0-9a-f-]{1,64}$")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/PID/stat`` (after the command name, which may hold spaces)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    _, sep, rest = text.rpartition(")")
    return rest.split() if sep else None


def boot_id() -> str | None:
    """This boot's id (``/proc/sys/kernel/random/boot_id``), or None where unreadable."""
    try:
        return (PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_id(pid: int) -> ProcessId | None:
    """The identity of the live process ``pid``, or None when there is none."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    return ProcessId(pid=pid, start_time=int(fields[19]), boot_id=boot_id())


def this_process() -> ProcessId:
    """The identity of the calling process."""
    me = process_id(os.getpid())
    return me if me is not None else ProcessId(pid=os.getpid())


def is_alive(owner: ProcessId | None) -> bool:
    """Whether ``owner`` is still running: same pid, same start time, same boot, not a zombie.

    An owner recorded without a start time (or boot id) is compared on what it has.
    """
    if owner is None:
        return False
    fields = _stat_fields(owner.pid)
    if fields is None or len(fields) < 20 or fields[0] in ("Z", "X"):
        return False
    if owner.start_time is not None and int(fields[19]) != owner.start_time:
        return False  # the pid was given to another process
    here = boot_id()
    return owner.boot_id is None or here is None or owner.boot_id == here


class LockHeld(RuntimeError):
    """Another live process holds the lock; ``holder`` is who it said it was (or None)."""

    def __init__(self, path: Path, holder: ProcessId | None) -> None:
        self.path, self.holder = path, holder
        who = f"pid {holder.pid}" if holder is not None else "another process"
        super().__init__(f"{path} is held by {who}")


def read_holder(path: Path) -> ProcessId | None:
    """Who last wrote itself into the lock file ``path`` (it may have died since)."""
    try:
        return ProcessId.model_validate_json(path.read_text()[:4096])
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[ProcessId]:
    """Hold ``flock(LOCK_EX)`` on ``path`` for the block, or raise :class:`LockHeld` at once.

    The holder writes its identity into the file so that a refused process can
    name it. The kernel drops the lock when the holder dies, whatever the way;
    the descriptor is close-on-exec, so children never inherit it.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(path, read_holder(path)) from None
        me = this_process()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me.model_dump()).encode(), 0)
        try:
            yield me
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
