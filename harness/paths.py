"""Where the harness finds its own files and keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path

#: The project checkout (holds workloads/, vm-images/, results/).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
WORKLOADS_DIR = PROJECT_ROOT / "workloads"
SUITES_DIR = WORKLOADS_DIR / "suites"
GUEST_TOOLS_DIR = WORKLOADS_DIR / "guest-tools"
VM_IMAGES_DIR = PROJECT_ROOT / "vm-images"
RESULTS_DIR = PROJECT_ROOT / "results"


def cache_dir() -> Path:
    """Root of built images and per-run state; ``HARNESS_CACHE`` overrides it.

    libvirt runs QEMU as ``libvirt-qemu``, so everything under it must be
    world-traversable; the default sits under /var/cache, not a home directory.
    """
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_root() -> Path:
    """Where :func:`cache_dir` is, without creating it (for commands that only look)."""
    return Path(os.environ.get("HARNESS_CACHE", "/var/cache/kvm-harness"))
