"""`harness stacks`: the kernel call paths a result recorded, as trees or folded stacks.

Reads a result file only. Stacks of one phase are summed over the
repetitions of its workload (and over boots), so a tree or flame graph shows
where that phase's events came from; ``--phase``/``--probe``/``--vm`` narrow it.
Sampled stacks (``name/N``) are summed the same way; each tree node then also
shows its estimated events with a 95% Wilson interval (harness/trace/stacks.py).
Rate targets (``name@Rhz``) sum their weights too: a node's share is of the weights,
and folded output counts weights (the events the stacks stand for), not samples.
Runs that differ in their parameters are never summed: each parameter set is
its own entry, labelled with the parameters that differ. Everything here is
iterative (a result from elsewhere may hold a stack thousands of frames deep)
and every string from the file is printed through ``textsafe.printable``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from harness.results import RunResult
from harness.textsafe import printable
from harness.trace.model import ProbeStacks
from harness.trace.stacks import build_stacks, effective, wilson

ParamItems = tuple[tuple[str, str], ...]
_Key = tuple[str, str, ParamItems, str, str]  # VM, workload, parameters, phase, probe


@dataclass
class PhaseProbeStacks:
    """The stacks of one probe in one phase (VM, workload, parameters, phase), summed."""

    vm: str
    workload: str
    phase: str
    probe: str
    repetitions: int = 0
    stacks: ProbeStacks = field(
        default_factory=lambda: ProbeStacks(events=0, stacked=0, truncated=0, depth=1)
    )
    #: The parameters that tell this entry from others of its VM and workload (empty
    #: when the result ran that workload with one parameter set only).
    params: ParamItems = ()

    @property
    def label(self) -> str:
        """``vm/workload/phase`` (``vm/workload[k=v,...]/phase`` when parameters differ).

        The first frame of folded output, so it is kept free of spaces, ``;`` and controls.
        """
        shown = f"[{','.join(f'{k}={v}' for k, v in self.params)}]" if self.params else ""
        return _frame(f"{self.vm}/{self.workload}{shown}/{self.phase}")


def _params_key(params: dict[str, str | int | float]) -> ParamItems:
    return tuple(sorted((k, str(v)) for k, v in params.items()))


def _differing(result: RunResult) -> dict[tuple[str, str], set[str]]:
    """Per (VM, workload): the parameter names whose values differ between its runs."""
    seen: dict[tuple[str, str], set[ParamItems]] = {}
    for run in result.runs:
        seen.setdefault((run.vm, run.workload), set()).add(_params_key(run.params))
    out: dict[tuple[str, str], set[str]] = {}
    for key, sets in seen.items():
        names = {n for items in sets for n, _ in items}
        dicts = [dict(items) for items in sets]
        out[key] = {n for n in names if len({d.get(n) for d in dicts}) > 1}
    return out


def collect(
    result: RunResult,
    *,
    phase: str | None = None,
    probe: str | None = None,
    vm: str | None = None,
) -> list[PhaseProbeStacks]:
    """Stacks per (VM, workload, parameters, phase, probe), summed over repetitions."""
    sums: dict[_Key, tuple[int, Counter[tuple[str, ...]], list[int]]] = {}
    # Rate targets: summed weights and squared weights per stack, and the rate.
    wsums: dict[_Key, tuple[Counter[tuple[str, ...]], Counter[tuple[str, ...]]]] = {}
    rates: dict[_Key, int] = {}
    differing = _differing(result)
    for run in result.runs:
        if vm is not None and run.vm != vm:
            continue
        names = differing[(run.vm, run.workload)]
        params = tuple((k, v) for k, v in _params_key(run.params) if k in names)
        for p in run.phases:
            if p.trace is None or (phase is not None and p.name != phase):
                continue
            for name, st in p.trace.stacks.items():
                if probe is not None and name != probe:
                    continue
                key = (run.vm, run.workload, params, p.name, name)
                reps, counts, totals = sums.setdefault(
                    key, (0, Counter(), [0, 0, 0, st.depth, st.period]))
                for s in st.stacks:
                    counts[tuple(s.frames)] += s.count
                if st.rate_hz is not None:
                    rates[key] = max(rates.get(key, 0), st.rate_hz)
                    w, w2 = wsums.setdefault(key, (Counter(), Counter()))
                    for s in st.stacks:
                        w[tuple(s.frames)] += s.weight or s.count
                        w2[tuple(s.frames)] += s.weight_sq or s.weight or s.count
                totals[0] += st.events
                totals[1] += st.stacked
                totals[2] += st.truncated
                totals[3] = max(totals[3], st.depth)
                # One suite, one period; were they to differ, the coarser one is said.
                totals[4] = max(totals[4], st.period)
                sums[key] = (reps + 1, counts, totals)
    out = []
    for key, (reps, counts, totals) in sums.items():
        vm_name, workload, params, phase_name, name = key
        # A rate target in any repetition: weights (1 a sample where none).
        w, w2 = wsums.get(key, (Counter(), Counter()))
        st = build_stacks(counts, totals[0], totals[3], totals[2], period=totals[4],
                          rate_hz=rates.get(key), weights=w, weights_sq=w2)
        # Summed over repetitions: say the samples that were taken, not a recount.
        st.stacked = totals[1]
        out.append(PhaseProbeStacks(vm=vm_name, workload=workload, phase=phase_name,
                                    probe=name, repetitions=reps, params=params, stacks=st))
    return out


def render_folded(items: list[PhaseProbeStacks]) -> str:
    """Folded stacks for flame-graph tools; first frames ``vm/workload/phase`` and the probe."""
    lines: list[str] = []
    for it in items:
        lines += folded_lines((it.label, _frame(it.probe)), it.stacks)
    return "\n".join(lines) + ("\n" if lines else "")


def render_tree(items: list[PhaseProbeStacks], *, min_share: float = 0.0) -> str:
    """A call tree per phase and probe, with coverage and truncation said up front."""
    out: list[str] = []
    for it in items:
        st = it.stacks
        cover = f"{st.stacked} of {st.events} events stacked"
        if st.rate_hz is not None:
            cover = (f"sampled at about {st.rate_hz} stacks/s per CPU: {st.stacked} stacks of "
                     f"{st.events} events, mean period {st.period}; estimated events "
                     "[95% interval]")
        elif st.period > 1:
            cover = (f"sampled, a stack every {st.period} events per CPU: {st.stacked} stacks "
                     f"of {st.events} events; estimated events [95% interval]")
        cut = f", {st.truncated} cut at depth {st.depth}" if st.truncated else ""
        out.append(f"== {it.label}  probe {printable(it.probe)}  ({it.repetitions} "
                   f"repetition(s); {cover}{cut})")
        out += [f"  {line}" for line in tree_lines(st, min_share=min_share)]
        out.append("")
    return "\n".join(out)


def folded_lines(prefix: tuple[str, ...], stacks: ProbeStacks) -> list[str]:
    """Brendan Gregg's folded format: ``frame;frame;... count``, outermost frame first.

    Frames from the file are made printable, and a ``;`` or blank in one (which would
    split it) becomes ``_``. A rate target's stacks count their weights (the events
    they stand for), as samples taken at different periods are not alike.
    """
    return [";".join((*prefix, *map(_frame, s.frames)))
            + f" {s.weight if stacks.rate_hz is not None and s.weight else s.count}"
            for s in stacks.stacks]


def _frame(text: str) -> str:
    """One folded-stack frame: printable, without the format's separators."""
    return re.sub(r"[;\s]", "_", printable(text))


@dataclass
class _Node:
    count: int = 0
    weight: int = 0
    weight_sq: int = 0
    children: dict[str, _Node] = field(default_factory=dict)


#: Deeper levels of a call tree are not indented further (the depth is shown instead).
MAX_INDENT = 48


def tree_lines(stacks: ProbeStacks, *, min_share: float = 0.0) -> list[str]:
    """An indented call tree (outermost first) with the events below each node.

    Built and walked with explicit stacks, not recursion: a result file may hold a
    stack of any depth.
    """
    root = _Node()
    for s in stacks.stacks:
        node = root
        for frame in s.frames:
            node = node.children.setdefault(frame, _Node())
            node.count += s.count
            node.weight += s.weight or s.count
            node.weight_sq += s.weight_sq or s.weight or s.count
    total = max(stacks.stacked, 1)
    weighted = stacks.rate_hz is not None
    w, wsq = stacks.weight or 0, stacks.weight_sq or 0

    def share_of(node: _Node) -> float:
        """Of the samples; of their weights (the events they stand for) for a rate target."""
        if weighted:
            return node.weight / w if w else 0.0
        return node.count / total

    lines: list[str] = []
    todo: list[tuple[int, str, _Node]] = [(-1, "", root)]
    while todo:
        depth, name, node = todo.pop()
        if depth >= 0:
            pad = "  " * min(depth, MAX_INDENT)
            deep = f"[depth {depth}] " if depth > MAX_INDENT else ""
            est = ""
            if weighted or stacks.period > 1:
                lo, hi = (wilson(*effective(min(node.weight, w), w, min(node.weight_sq, wsq), wsq))
                          if weighted else wilson(node.count, stacks.stacked))
                est = (f"  ~{share_of(node) * stacks.events:.0f} "
                       f"[{lo * stacks.events:.0f}, {hi * stacks.events:.0f}]")
            lines.append(f"{pad}{deep}{printable(name)}  {node.count} "
                         f"({100 * share_of(node):.1f}%){est}")
        children = sorted(node.children.items(),
                          key=lambda kv: -(kv[1].weight if weighted else kv[1].count))
        # Pushed in reverse so the largest child is printed first, as the recursion did.
        todo.extend((depth + 1, n, c) for n, c in reversed(children)
                    if share_of(c) >= min_share)
    return lines
