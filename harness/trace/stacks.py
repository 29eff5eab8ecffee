"""Kernel call paths per phase: the ``@stk`` map folded into per-probe stacks and path counts.

bpftrace counts ``kstack(N)`` per (VM, guest phase, host window, probe) in the
kernel; the frames come symbolized from /proc/kallsyms, innermost first, with
offsets (``kvm_mmu_load+42``). Here they are attributed to phases like every
other aggregate, turned outermost first, offsets dropped by default (the same
function at two call sites is one path), and summed per function: "how many of
this probe's events passed through kvm_mmu_load" is then a count with its method
named (derived from stacks), also where kvm_mmu_load itself cannot be probed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

from harness.trace.model import ProbeStacks, StackCount
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


def probe_stacks(
    stacks: Mapping[str, Counter[tuple[str, ...]]],
    events_by_probe: Mapping[str, int],
    depth: int,
) -> dict[str, ProbeStacks]:
    """Per probe: its stacks (most frequent first), coverage, truncation and path counts."""
    out: dict[str, ProbeStacks] = {}
    for name in sorted(stacks):
        counts = stacks[name]
        paths: Counter[str] = Counter()
        for frames, n in counts.items():
            for fn in set(map(function, frames)):  # recursion counts once per event
                paths[fn] += n
        out[name] = ProbeStacks(
            events=events_by_probe.get(name, 0),
            stacked=sum(counts.values()),
            truncated=sum(n for frames, n in counts.items() if len(frames) >= depth),
            depth=depth,
            stacks=[
                StackCount(frames=list(frames), count=n)
                for frames, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            ],
            paths=dict(sorted(paths.items(), key=lambda kv: (-kv[1], kv[0]))),
        )
    return out
