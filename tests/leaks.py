"""What harness runs leave on the host, and which of it is a leak (shared by the leak checks).

A check that only follows the run ids of result files misses a run that died
before its first save, and an absolute check fails on a host where other
sessions run the harness at the same time. :func:`leaks_since` looks at
everything harness-named that appeared since a snapshot (libvirt domains,
their QEMU processes, tracer processes, run directories with their overlays)
and counts what outlived the process that made it. On CI nothing else runs,
and it is the absolute check.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness.host.process import pid_alive
from harness.paths import cache_dir
from harness.vm.lifecycle import DOMAIN_PREFIX, OWNER_FILE
from tests.conftest import harness_domains, stray_tracers


def _owner_gone(pid: int | None) -> bool:
    """A leak's maker is gone, or is this very test process (its runs have all ended)."""
    return pid is None or pid == os.getpid() or not pid_alive(pid)


def leaked_domains(names: set[str]) -> set[str]:
    """Of ``names``, the harness domains still there whose harness process is gone (or unknown).

    A domain whose owner process is alive belongs to a run that is still going
    (another user of a shared host); this test's own harness processes have all
    exited when it ends, and a run inside this process counts as ended.
    """
    from harness.vm import lifecycle

    conn = lifecycle.connect()
    try:
        leaked = set()
        for name in names:
            try:
                dom = conn.lookupByName(name)
            except Exception:  # gone meanwhile
                continue
            if _owner_gone(lifecycle.domain_owner(dom)):
                leaked.add(name)
        return leaked
    finally:
        conn.close()


def orphaned_tracers(lines: set[str]) -> set[str]:
    """Of ``pgrep -a`` lines, the tracer processes whose parent is gone (reparented)."""
    orphans = set()
    for line in lines:
        pid = line.split()[0]
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == 1 or not Path(f"/proc/{ppid}").exists():
            orphans.add(line)
    return orphans


def harness_qemus() -> list[str]:
    """``pgrep -a`` lines of every QEMU started for a harness domain (``guest=kvmh-...``)."""
    out = subprocess.run(
        ["pgrep", "-a", "-f", f"guest={DOMAIN_PREFIX}"], capture_output=True, text=True,
        check=False,
    ).stdout
    return [ln for ln in out.splitlines() if ln.strip() and "pgrep" not in ln]


@dataclass(frozen=True)
class HostState:
    """What harness runs have on the host at one moment: domains, tracers, QEMUs, run dirs."""

    domains: frozenset[str]
    tracers: frozenset[str]
    qemus: frozenset[str]
    run_dirs: frozenset[str]


def host_state(runs_dir: Path | None = None) -> HostState:
    """The harness's footprint now; ``runs_dir`` defaults to the shared cache's ``runs``."""
    runs = runs_dir or cache_dir() / "runs"
    return HostState(
        domains=frozenset(harness_domains()),
        tracers=frozenset(stray_tracers()),
        qemus=frozenset(harness_qemus()),
        run_dirs=frozenset(d.name for d in runs.iterdir()) if runs.is_dir() else frozenset(),
    )


def _qemu_domain(line: str) -> str:
    found = re.search(rf"guest=({DOMAIN_PREFIX}[^,\s]+)", line)
    return found.group(1) if found else ""


def _run_dir_owner(run_dir: Path) -> int | None:
    if run_dir.name.startswith(".claim-"):  # being claimed: the owner pid ends the name
        pid_text = run_dir.name.rsplit("-", 1)[-1]
        return int(pid_text) if pid_text.isdigit() else None
    try:
        return int((run_dir / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None


def leaks_since(before: HostState, runs_dir: Path | None = None) -> list[str]:
    """What appeared since ``before`` and outlived the process that made it, one line each.

    Every harness domain, tracer, QEMU and run directory (overlays and consoles
    live in it) is looked at, whether or not its run ever saved a result file.
    What a live process other than this one still owns is another session's
    run that is still going, not a leak; a QEMU whose domain libvirt no longer
    lists is a leak whoever started it.
    """
    runs = runs_dir or cache_dir() / "runs"
    now = host_state(runs)
    domains = leaked_domains(set(now.domains - before.domains))
    listed = set(harness_domains())
    leaks = [f"libvirt domain {d}" for d in sorted(domains)]
    leaks += [f"tracer {t}" for t in sorted(orphaned_tracers(set(now.tracers - before.tracers)))]
    leaks += [
        f"QEMU {q}"
        for q in sorted(now.qemus - before.qemus)
        if _qemu_domain(q) not in listed or _qemu_domain(q) in domains
    ]
    for name in sorted(now.run_dirs - before.run_dirs):
        path = runs / name
        if path.is_dir() and _owner_gone(_run_dir_owner(path)):
            leaks.append(f"run directory {path}: {sorted(p.name for p in path.iterdir())}")
    return leaks
