"""Cache directories that nothing current needs: what each is, its size, who still uses it.

The image cache (``harness/image/cache.py``) and the libbpf loader builds
(``harness/trace/libbpf.py``) each say which of their directories are
prunable; ``harness cache prune`` removes them, except those a live process
still uses.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Prunable:
    """A cache directory that nothing current needs, and why."""

    path: Path
    size: int
    why: str
    in_use_by: int | None = None  # a live process holds one of its files: it is kept


def tree_size(path: Path) -> int:
    """Bytes of the files under ``path`` (symlinks not followed)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def user_of(path: Path, users: dict[Path, int]) -> int | None:
    """A pid among ``users`` (file -> pid, see process.users_of) using a file under ``path``."""
    base = path.resolve()
    return next((pid for f, pid in users.items() if f.is_relative_to(base)), None)
