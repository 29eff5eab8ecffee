"""Process liveness on this host, for reaping what a killed harness left behind,
and children that die with the thread that started them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from pathlib import Path

_libc_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGKILL when the thread that forked it ends.

    It runs in the child between fork and exec, where another thread of the
    parent may have held any lock: so no imports, no allocation-heavy Python,
    no dlopen (the prctl function was resolved at import). PDEATHSIG follows
    the forking *thread*, so use it from a thread that outlives the child.
    """
    _libc_prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, but belongs to someone else
    return True


def users_of(root: Path) -> dict[Path, int]:
    """Files under ``root`` that a live process holds open or runs, each with one such pid.

    Read from ``/proc/PID/fd`` and ``/proc/PID/exe``: QEMU holds its base disk
    open through the overlay's backing chain, a tracer runs its loader.
    Processes this user may not inspect are skipped (root sees them all).
    """
    base = root.resolve()
    found: dict[Path, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        links = [proc / "exe"]
        with contextlib.suppress(OSError):
            links += list((proc / "fd").iterdir())
        for link in links:
            try:
                target = Path(os.readlink(link))
            except OSError:
                continue
            if target.is_relative_to(base):
                found.setdefault(target, int(proc.name))
    return found
