"""How busy the host was while a run measured: the noise a timing comparison must know about.

A benchmark's timings on a shared host move with whatever else runs there
(seen here: stress-ng throughput varies up to 3x when another process is
busy). Counts do not. So every run records, beside its provenance:

* the load average at its start and end;
* the share of the host's CPU time that processes *outside the run* used
  while it measured (``other_cpu_share``): /proc/stat's busy time minus the
  run's own processes (the harness, its tracer, the QEMU of its VMs, libvirt's
  daemons), sampled once a second; an interval in which one of the run's own
  processes started or ended is left out, since its share is unknown;
* other VMs (QEMU processes) already running when it started;
* the CPU frequency governor and the THP defrag mode.

`harness compare` warns when a side ran on a busy host (``BUSY_SHARE``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

#: A run is "on a busy host" when others used at least this share of all CPUs.
BUSY_SHARE = 0.20
#: Daemons that work for the run (they also work for others; their share is small).
HELPERS = ("libvirtd", "virtqemud", "virtlogd")
SAMPLE_S = 1.0


class HostLoad(BaseModel):
    """The host's load while a run measured (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    cpus: int
    loadavg_start: list[float] = Field(description="1, 5, 15 minute load averages")
    loadavg_end: list[float] | None = None
    other_cpu_share: float | None = Field(
        default=None,
        description="share of all CPUs' time used by processes outside this run while it "
        "measured (0..1); None: too short to tell",
    )
    peak_other_cpu_share: float | None = Field(
        default=None, description="the largest share seen in one sample interval"
    )
    sampled_s: float = Field(default=0.0, description="seconds of run time the share covers")
    other_vms: list[str] = Field(
        default_factory=list, description="QEMU processes not of this run, at its start"
    )
    cpu_governor: str | None = Field(default=None, description="cpufreq scaling governor(s)")
    thp_defrag: str | None = Field(default=None, description="host THP defrag mode")
    busy: bool = Field(default=False, description=f"other_cpu_share >= {BUSY_SHARE}")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def loadavg(proc: Path = Path("/proc")) -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    text = _read(proc / "loadavg") or "0 0 0"
    return [float(x) for x in text.split()[:3]]


def busy_jiffies(stat_text: str) -> tuple[int, int]:
    """(busy, total) CPU jiffies summed over all CPUs, from /proc/stat's ``cpu`` line.

    Busy is everything but idle and iowait; guest time is already inside user.
    """
    for line in stat_text.splitlines():
        if line.startswith("cpu "):
            f = [int(x) for x in line.split()[1:]]
            f += [0] * (8 - len(f))
            user, nice, system, idle, iowait, irq, softirq, steal = f[:8]
            busy = user + nice + system + irq + softirq + steal
            return busy, busy + idle + iowait
    raise ValueError("/proc/stat has no 'cpu' line")


def process_jiffies(pid: int, proc: Path = Path("/proc")) -> tuple[int, int] | None:
    """(start time, utime + stime) of a process, all threads; None once it is gone."""
    text = _read(proc / str(pid) / "stat")
    if text is None:
        return None
    # comm may hold spaces and parentheses: fields start after the last ')'.
    fields = text[text.rfind(")") + 2 :].split()
    return int(fields[19]), int(fields[11]) + int(fields[12])


def _comm(pid: str, proc: Path) -> str:
    return (_read(proc / pid / "comm") or "").strip()


def pids_named(names: Iterable[str], proc: Path = Path("/proc")) -> set[int]:
    """Processes whose comm is one of ``names`` (or starts with it, for qemu-system-*)."""
    wanted = tuple(names)
    return {
        int(p.name)
        for p in proc.iterdir()
        if p.name.isdigit() and _comm(p.name, proc).startswith(wanted)
    }


def descendants(root: int, proc: Path = Path("/proc")) -> set[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for p in proc.iterdir():
        if not p.name.isdigit():
            continue
        text = _read(p / "stat")
        if text is None:
            continue
        ppid = int(text[text.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(p.name))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo += children.get(pid, [])
    return out


def cpu_governor(sys_cpu: Path = Path("/sys/devices/system/cpu")) -> str | None:
    """The cpufreq governors in use, e.g. ``performance`` or ``powersave,schedutil``."""
    found = sorted({
        g.strip()
        for p in sys_cpu.glob("cpu[0-9]*/cpufreq/scaling_governor")
        if (g := _read(p)) is not None
    })
    return ",".join(found) or None


def thp_defrag(path: Path = Path("/sys/kernel/mm/transparent_hugepage/defrag")) -> str | None:
    """The bracketed THP defrag mode, e.g. ``madvise``."""
    text = _read(path)
    if text is None:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text.strip() or None


class LoadSampler:
    """Samples the host's CPU use by others while a run measures (a daemon thread)."""

    def __init__(self, own_pids: Callable[[], set[int]], proc: Path = Path("/proc")) -> None:
        self._own_pids = own_pids
        self._proc = proc
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._other = 0
        self._total = 0
        self._peak: float | None = None
        self._sampled_s = 0.0
        self._lock = threading.Lock()
        others = sorted(pids_named(["qemu-system"], proc))
        self.load = HostLoad(
            cpus=os.cpu_count() or 1,
            loadavg_start=loadavg(proc),
            other_vms=[f"pid {p}: {_comm(str(p), proc)}" for p in others],
            cpu_governor=cpu_governor(),
            thp_defrag=thp_defrag(),
        )

    def _ours(self) -> dict[int, tuple[int, int]]:
        pids = descendants(os.getpid(), self._proc) | self._own_pids()
        pids |= pids_named(HELPERS, self._proc)
        out = {}
        for pid in pids:
            j = process_jiffies(pid, self._proc)
            if j is not None:
                out[pid] = j
        return out

    def sample_once(self, before: tuple[tuple[int, int], dict[int, tuple[int, int]]]
                    ) -> tuple[tuple[int, int], dict[int, tuple[int, int]]]:
        """Account one interval since ``before``; returns the new reading."""
        stat = busy_jiffies(_read(self._proc / "stat") or "")
        ours = self._ours()
        (busy0, total0), ours0 = before
        busy1, total1 = stat
        same = set(ours0) == set(ours) and all(ours0[p][0] == ours[p][0] for p in ours)
        if same and total1 > total0:
            own = sum(ours[p][1] - ours0[p][1] for p in ours)
            other = max(0, (busy1 - busy0) - own)
            with self._lock:
                self._other += other
                self._total += total1 - total0
                share = other / (total1 - total0)
                self._peak = share if self._peak is None else max(self._peak, share)
                self._sampled_s += SAMPLE_S
        return stat, ours

    def _loop(self) -> None:
        reading = (busy_jiffies(_read(self._proc / "stat") or ""), self._ours())
        while not self._stop.wait(SAMPLE_S):
            try:
                reading = self.sample_once(reading)
            except (OSError, ValueError, IndexError):
                continue  # a process read half-way through its exit: the next sample will do

    def start(self) -> LoadSampler:
        """Begin sampling in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="host-load", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> HostLoad:
        """Stop sampling; the load seen over the run."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            share = self._other / self._total if self._total else None
            self.load.other_cpu_share = None if share is None else round(share, 4)
            self.load.peak_other_cpu_share = None if self._peak is None else round(self._peak, 4)
            self.load.sampled_s = self._sampled_s
        self.load.loadavg_end = loadavg(self._proc)
        self.load.busy = share is not None and share >= BUSY_SHARE
        return self.load
