"""Kernel call paths per phase: the ``@stk`` map folded into per-probe stacks and path counts.

bpftrace counts ``kstack(N)`` per (VM, guest phase, host window, probe) in the
kernel; the frames come symbolized from /proc/kallsyms, innermost first, with
offsets (``kvm_mmu_load+42``). Here they are attributed to phases like every
other aggregate, turned outermost first, offsets dropped by default (the same
function at two call sites is one path), and summed per function: "how many of
this probe's events passed through kvm_mmu_load" is then a count with its method
named (derived from stacks), also where kvm_mmu_load itself cannot be probed.

A sampled probe (``stacks = ["kvm_emulate_insn/64"]``) has a stack on every Nth
event per CPU and VM only. Its stacks and path counts are those of the samples
(they add up exactly), and each path also gets an estimate: its share of the
samples (a binomial proportion, Wilson 95% interval) times the exact event count.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Final

from harness.trace.model import PathEstimate, ProbeStacks, StackCount
from harness.trace.parse import StackMap, TraceSnapshot


def function(frame: str) -> str:
    """``kvm_mmu_load+42`` -> ``kvm_mmu_load`` (an unsymbolized address stays as it is)."""
    return frame.split("+", 1)[0]


def fold(frames_innermost_first: tuple[str, ...], *, offsets: bool = False) -> tuple[str, ...]:
    """Frames outermost first, as flame graphs and trees read them."""
    out = frames_innermost_first if offsets else tuple(map(function, frames_innermost_first))
    return tuple(reversed(out))


def phase_stacks(
    snapshot: TraceSnapshot,
    pid: int,
    slot: Callable[[int, int], int | None],
    probe_name: Callable[[int], str | None],
    *,
    offsets: bool = False,
    depth: int | None = None,
) -> dict[int, dict[str, Counter[tuple[str, ...]]]]:
    """phase -> probe -> folded stack -> count, for VM ``pid``.

    ``slot(g, h)`` is the correlator's attribution of a (guest phase, host
    window) pair; ``probe_name`` maps probe ids to names. Stacks are cut to
    their innermost ``depth`` frames (tracers collect a few more, see
    program.STACK_SLACK, so that dropping their own frames keeps ``depth``).
    """
    out: dict[int, dict[str, Counter[tuple[str, ...]]]] = {}
    stk: StackMap = snapshot.stack("stk")
    for (key, frames), n in stk.items():
        if len(key) != 4 or key[0] != pid:
            continue
        _, g, h, ident = key
        phase, name = slot(g, h), probe_name(ident)
        if phase is None or name is None:
            continue
        kept = frames if depth is None else frames[:depth]
        out.setdefault(phase, {}).setdefault(name, Counter())[fold(kept, offsets=offsets)] += n
    return out


#: z of a two-sided 95% interval (the normal quantile at 0.975).
Z95: Final = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (default 95%); (0, 1) for n = 0.

    Chosen over the normal (Wald) interval because sampled paths are often near 0 or
    1 of the samples (every emulated instruction goes through the emulator), where
    Wald collapses to a point; Wilson stays inside [0, 1] and keeps its coverage.
    """
    if not 0 <= k <= n:
        raise ValueError(f"wilson: k={k} must be in 0..n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # Exact at the ends: k = 0 or k = n puts one end at 0 or 1 (rounding aside).
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def path_estimates(paths: Mapping[str, int], stacked: int, events: int) -> dict[str, PathEstimate]:
    """Estimated events per function from ``stacked`` sampled stacks of ``events`` events.

    Each function's share of the samples is a binomial proportion with a Wilson 95%
    interval; the estimate and its interval are the share(s) times the exact event
    count. This treats every-Nth-event sampling as random, which holds unless the
    paths repeat with a period that divides N (pick a period prime to any loop).
    """
    out: dict[str, PathEstimate] = {}
    for fn, k in paths.items():
        share = k / stacked if stacked else 0.0
        lo, hi = wilson(k, stacked)
        out[fn] = PathEstimate(share=share, share_low=lo, share_high=hi, events=share * events,
                               low=lo * events, high=hi * events)
    return out


def probe_stacks(
    stacks: Mapping[str, Counter[tuple[str, ...]]],
    events_by_probe: Mapping[str, int],
    depth: int,
    periods: Mapping[str, int] | None = None,
) -> dict[str, ProbeStacks]:
    """Per probe: its stacks (most frequent first), coverage, truncation and path counts.

    ``periods`` gives the sampling period of sampled probes (absent: 1, every event);
    their path counts are counts of samples, and ``path_estimates`` scales them.
    """
    out: dict[str, ProbeStacks] = {}
    for name in sorted(stacks):
        counts = stacks[name]
        paths: Counter[str] = Counter()
        for frames, n in counts.items():
            for fn in set(map(function, frames)):  # recursion counts once per event
                paths[fn] += n
        period = (periods or {}).get(name, 1)
        events = events_by_probe.get(name, 0)
        stacked = sum(counts.values())
        ordered = dict(sorted(paths.items(), key=lambda kv: (-kv[1], kv[0])))
        out[name] = ProbeStacks(
            events=events,
            stacked=stacked,
            period=period,
            truncated=sum(n for frames, n in counts.items() if len(frames) >= depth),
            depth=depth,
            stacks=[
                StackCount(frames=list(frames), count=n)
                for frames, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            ],
            paths=ordered,
            path_estimates=path_estimates(ordered, stacked, events) if period > 1 else {},
        )
    return out
