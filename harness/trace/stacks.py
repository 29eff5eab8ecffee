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

A rate target (``stacks = ["kvm_emulate_insn@1000hz"]``) adapts the period to the
event rate in the kernel, and each stack weighs the period it was taken at (the
events it stands for; ``@stkw``/``@stkw2`` sum weights and squared weights per
stack). A path's share is then W_f / W, the weights through the function over all,
and its interval Wilson's at the ratio estimator's effective sample size
(:func:`effective`); with one constant weight this is the fixed period's k/n exactly.
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
    map_name: str = "stk",
) -> dict[int, dict[str, Counter[tuple[str, ...]]]]:
    """phase -> probe -> folded stack -> count, for VM ``pid``.

    ``map_name`` "stkw" or "stkw2" gives a rate target's summed weights (or squared
    weights) per stack instead of its sample counts.

    ``slot(g, h)`` is the correlator's attribution of a (guest phase, host
    window) pair; ``probe_name`` maps probe ids to names. Stacks are cut to
    their innermost ``depth`` frames (tracers collect a few more, see
    program.STACK_SLACK, so that dropping their own frames keeps ``depth``).
    """
    out: dict[int, dict[str, Counter[tuple[str, ...]]]] = {}
    stk: StackMap = snapshot.stack(map_name)
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


def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (default 95%); (0, 1) for n = 0.

    Chosen over the normal (Wald) interval because sampled paths are often near 0 or
    1 of the samples (every emulated instruction goes through the emulator), where
    Wald collapses to a point; Wilson stays inside [0, 1] and keeps its coverage.
    ``k`` and ``n`` may be effective (fractional) counts of weighted samples (:func:`effective`).
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


def effective(wf: int, w: int, wsq_f: int, wsq: int) -> tuple[float, float]:
    """(k_eff, n_eff): the weighted share W_f / W as a binomial one of the same variance.

    ``wf``/``wsq_f``: sums of the weights and squared weights of the samples through a
    function; ``w``/``wsq``: of all samples. The share p = W_f / W is a ratio estimator
    whose linearized variance is V = [sum_(i in f) w_i^2 (1-p)^2 + sum_(i not in f)
    w_i^2 p^2] / W^2; n_eff = p(1-p)/V and k_eff = p n_eff (at p = 0 or 1, where V = 0,
    Kish's n_eff = W^2 / sum w^2). Computed on integers and rounded once, so a constant
    weight N (W_f = N k, W = N n, sums of squares N^2 k, N^2 n) gives exactly (k, n).
    """
    if not 0 <= wf <= w or not 0 <= wsq_f <= wsq:
        raise ValueError(f"effective: weights {wf} of {w}, squares {wsq_f} of {wsq}")
    if w == 0 or wsq == 0:
        return 0.0, 0.0
    if wf in (0, w):
        n = w * w / wsq
        return (0.0 if wf == 0 else n), n
    rest = w - wf
    d = wsq_f * rest * rest + (wsq - wsq_f) * wf * wf
    if d == 0:  # impossible for real weights (each >= 1); kept finite for bad input
        return 0.0, 0.0
    return wf * wf * rest * w / d, wf * rest * w * w / d


def weighted_path_estimates(
    path_weights: Mapping[str, int],
    path_weights_sq: Mapping[str, int],
    weight: int,
    weight_sq: int,
    events: int,
) -> dict[str, PathEstimate]:
    """Estimated events per function from weighted samples (a rate target's).

    The share is W_f / W; the interval Wilson's at (k_eff, n_eff) of :func:`effective`;
    both times the exact event count, so the estimates of paths that split the events
    add up to the count exactly.
    """
    out: dict[str, PathEstimate] = {}
    for fn, wf in path_weights.items():
        wsq_f = path_weights_sq.get(fn, wf)
        share = wf / weight if weight else 0.0
        k, n = effective(wf, weight, wsq_f, weight_sq)
        lo, hi = wilson(k, n)
        out[fn] = PathEstimate(share=share, share_low=lo, share_high=hi, events=share * events,
                               low=lo * events, high=hi * events, weight=wf, weight_sq=wsq_f,
                               effective_samples=n)
    return out


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


Stacks = Mapping[tuple[str, ...], int]


def probe_stacks(
    stacks: Mapping[str, Counter[tuple[str, ...]]],
    events_by_probe: Mapping[str, int],
    depth: int,
    periods: Mapping[str, int] | None = None,
    rates: Mapping[str, int] | None = None,
    weights: Mapping[str, Stacks] | None = None,
    weights_sq: Mapping[str, Stacks] | None = None,
) -> dict[str, ProbeStacks]:
    """Per probe: its stacks (most frequent first), coverage, truncation and path counts.

    ``periods`` gives the sampling period of sampled probes (absent: 1, every event);
    their path counts are counts of samples, and ``path_estimates`` scales them.
    ``rates`` names rate-target probes; ``weights``/``weights_sq`` hold their summed
    weights and squared weights per folded stack (a stack without them weighs 1 a sample).
    """
    out: dict[str, ProbeStacks] = {}
    for name in sorted(stacks):
        counts = stacks[name]
        out[name] = build_stacks(
            counts, events_by_probe.get(name, 0), depth,
            sum(n for f, n in counts.items() if len(f) >= depth),
            period=(periods or {}).get(name, 1), rate_hz=(rates or {}).get(name),
            weights=(weights or {}).get(name, {}), weights_sq=(weights_sq or {}).get(name, {}))
    return out


def build_stacks(
    counts: Mapping[tuple[str, ...], int],
    events: int,
    depth: int,
    truncated: int,
    *,
    period: int = 1,
    rate_hz: int | None = None,
    weights: Stacks | None = None,
    weights_sq: Stacks | None = None,
) -> ProbeStacks:
    """One probe's :class:`ProbeStacks` from its folded stacks (and, for a rate target, weights)."""
    paths: Counter[str] = Counter()
    wpaths: Counter[str] = Counter()
    w2paths: Counter[str] = Counter()
    rows: list[StackCount] = []
    for frames, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if rate_hz is None:
            rows.append(StackCount(frames=list(frames), count=n))
        else:
            w = (weights or {}).get(frames, 0) or n
            w2 = max((weights_sq or {}).get(frames, 0), w)
            rows.append(StackCount(frames=list(frames), count=n, weight=w, weight_sq=w2))
        for fn in set(map(function, frames)):  # recursion counts once per event
            paths[fn] += n
            if rate_hz is not None:
                wpaths[fn] += rows[-1].weight or 0
                w2paths[fn] += rows[-1].weight_sq or 0
    stacked = sum(counts.values())
    ordered = dict(sorted(paths.items(), key=lambda kv: (-kv[1], kv[0])))
    if rate_hz is None:
        return ProbeStacks(
            events=events, stacked=stacked, period=period, truncated=truncated, depth=depth,
            stacks=rows, paths=ordered,
            path_estimates=path_estimates(ordered, stacked, events) if period > 1 else {},
        )
    weight = sum(r.weight or 0 for r in rows)
    weight_sq = sum(r.weight_sq or 0 for r in rows)
    return ProbeStacks(
        events=events, stacked=stacked,
        period=max(1, round(weight / stacked)) if stacked else 1,
        rate_hz=rate_hz, weight=weight, weight_sq=weight_sq,
        effective_samples=weight * weight / weight_sq if weight_sq else 0.0,
        truncated=truncated, depth=depth, stacks=rows, paths=ordered,
        path_estimates=weighted_path_estimates(
            {fn: wpaths[fn] for fn in ordered}, w2paths, weight, weight_sq, events),
    )


def sample_sums(st: ProbeStacks, fn: str) -> tuple[int, int, int, int] | None:
    """(W_f, W, sum w^2 through fn, sum w^2) of a sampled probe's path; None: not sampled.

    A fixed period N weighs every sample N, so the sums are N k, N n, N^2 k, N^2 n and
    :func:`effective` gives (k, n) back exactly.
    """
    if st.rate_hz is not None:
        est = st.path_estimates.get(fn)
        if est is None or est.weight is None or st.weight is None:
            return None
        return est.weight, st.weight, est.weight_sq or 0, st.weight_sq or 0
    if st.period <= 1 or fn not in st.paths:
        return None
    k, n, p = st.paths[fn], st.stacked, st.period
    return p * k, p * n, p * p * k, p * p * n
