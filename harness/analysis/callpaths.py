"""`harness stacks`: the kernel call paths a result recorded, as trees or folded stacks.

Reads a result file only. Stacks of one phase are summed over the
repetitions of its workload (and over boots), so a tree or flame graph shows
where that phase's events came from; ``--phase``/``--probe``/``--vm`` narrow it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from harness.results import RunResult
from harness.trace.model import ProbeStacks, StackCount
from harness.trace.stacks import function


@dataclass
class PhaseProbeStacks:
    """The stacks of one probe in one phase (identified by VM, workload, phase), summed."""

    vm: str
    workload: str
    phase: str
    probe: str
    repetitions: int = 0
    stacks: ProbeStacks = field(
        default_factory=lambda: ProbeStacks(events=0, stacked=0, truncated=0, depth=1)
    )

    @property
    def label(self) -> str:
        """``vm/workload/phase``: the first frame of folded output."""
        return f"{self.vm}/{self.workload}/{self.phase}"


def collect(
    result: RunResult,
    *,
    phase: str | None = None,
    probe: str | None = None,
    vm: str | None = None,
) -> list[PhaseProbeStacks]:
    """Stacks per (VM, workload, phase, probe), summed over repetitions, in run order."""
    sums: dict[tuple[str, str, str, str], tuple[int, Counter[tuple[str, ...]], list[int]]] = {}
    for run in result.runs:
        if vm is not None and run.vm != vm:
            continue
        for p in run.phases:
            if p.trace is None or (phase is not None and p.name != phase):
                continue
            for name, st in p.trace.stacks.items():
                if probe is not None and name != probe:
                    continue
                key = (run.vm, run.workload, p.name, name)
                reps, counts, totals = sums.setdefault(key, (0, Counter(), [0, 0, 0, st.depth]))
                for s in st.stacks:
                    counts[tuple(s.frames)] += s.count
                totals[0] += st.events
                totals[1] += st.stacked
                totals[2] += st.truncated
                sums[key] = (reps + 1, counts, totals)
    out = []
    for (vm_name, workload, phase_name, name), (reps, counts, totals) in sums.items():
        paths: Counter[str] = Counter()
        for frames, n in counts.items():
            for fn in set(map(function, frames)):
                paths[fn] += n
        out.append(
            PhaseProbeStacks(
                vm=vm_name,
                workload=workload,
                phase=phase_name,
                probe=name,
                repetitions=reps,
                stacks=ProbeStacks(
                    events=totals[0],
                    stacked=totals[1],
                    truncated=totals[2],
                    depth=totals[3],
                    stacks=[
                        StackCount(frames=list(f), count=n)
                        for f, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                    ],
                    paths=dict(paths.most_common()),
                ),
            )
        )
    return out


def render_folded(items: list[PhaseProbeStacks]) -> str:
    """Folded stacks for flame-graph tools; first frames ``vm/workload/phase`` and the probe."""
    lines: list[str] = []
    for it in items:
        lines += folded_lines((it.label, it.probe), it.stacks)
    return "\n".join(lines) + ("\n" if lines else "")


def render_tree(items: list[PhaseProbeStacks], *, min_share: float = 0.0) -> str:
    """A call tree per phase and probe, with coverage and truncation said up front."""
    out: list[str] = []
    for it in items:
        st = it.stacks
        cover = f"{st.stacked} of {st.events} events stacked"
        cut = f", {st.truncated} cut at depth {st.depth}" if st.truncated else ""
        out.append(f"== {it.label}  probe {it.probe}  ({it.repetitions} repetition(s); "
                   f"{cover}{cut})")
        out += [f"  {line}" for line in tree_lines(st, min_share=min_share)]
        out.append("")
    return "\n".join(out)


def folded_lines(prefix: tuple[str, ...], stacks: ProbeStacks) -> list[str]:
    """Brendan Gregg's folded format: ``frame;frame;... count``, outermost frame first."""
    return [";".join((*prefix, *s.frames)) + f" {s.count}" for s in stacks.stacks]


@dataclass
class _Node:
    count: int = 0
    children: dict[str, _Node] = field(default_factory=dict)


def tree_lines(stacks: ProbeStacks, *, min_share: float = 0.0) -> list[str]:
    """An indented call tree (outermost first) with the events below each node."""
    root = _Node()
    for s in stacks.stacks:
        node = root
        for frame in s.frames:
            node = node.children.setdefault(frame, _Node())
            node.count += s.count
    total = max(stacks.stacked, 1)
    lines: list[str] = []

    def walk(node: _Node, indent: int) -> None:
        for name, child in sorted(node.children.items(), key=lambda kv: -kv[1].count):
            if child.count / total < min_share:
                continue
            lines.append(f"{'  ' * indent}{name}  {child.count} ({100 * child.count / total:.1f}%)")
            walk(child, indent + 1)

    walk(root, 0)
    return lines
