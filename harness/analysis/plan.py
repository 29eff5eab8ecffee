"""How many boots and repetitions a comparison needs: `harness plan` from a pilot result.

From a pilot (one or more result files of the suite, on one host and kernel)
it estimates each figure's boot-to-boot and within-boot noise (stats.
variance_components, log scale) and asks, for a wanted effect size, how many
boots a side the comparison needs with 1, 2, 3 or 5 measured repetitions per
boot to find that effect with 80% power (stats.plan_design). The level is the
one the exit status uses at its strictest: alpha divided by the number of
figures the comparison will test (Holm's first step), unless ``per_figure``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from harness.analysis import stats
from harness.analysis.compare import PhaseRef, _by_boot, _collect
from harness.analysis.figures import fill_zero_counts
from harness.analysis.resultset import ResultSet


@dataclass(frozen=True)
class FigurePlan:
    """The design one figure needs."""

    phase: PhaseRef
    figure: str
    between_sd: float
    within_sd: float
    boots_now: int
    reps_now: float
    rows: list[stats.PlanRow]


@dataclass(frozen=True)
class Plan:
    """Every figure's needed design, for one effect size and level."""

    effect: float
    alpha: float
    level: float  # the per-figure level the designs were found for
    figures: list[FigurePlan]
    untestable: list[str]  # figures the pilot cannot estimate noise for


def plan(pilot: ResultSet, effect: float, *, alpha: float = 0.05, per_figure: bool = False,
         pattern: str = "*") -> Plan:
    """The boots a side each figure of the pilot needs to detect ``effect`` (e.g. 0.05)."""
    side = _collect(pilot, "boot")
    found: list[tuple[PhaseRef, str, list[list[float]]]] = []
    for ref, reps in side.phases.values():
        figs = [r for _, r in reps]
        names = {n for r in figs for n in r.values}
        fill_zero_counts(figs, names)
        for name in sorted(names):
            if fnmatch.fnmatch(name, pattern):
                found.append((ref, name, _by_boot(reps, name)))
    level = alpha if per_figure else alpha / max(len(found), 1)
    out, untestable = [], []
    for ref, name, boots in found:
        comp = stats.variance_components([boots])
        if comp.between_sd is None and comp.within_sd is None:
            untestable.append(f"{ref.label()} {name}")
            continue
        between, within = comp.between_sd or 0.0, comp.within_sd or 0.0
        if between == 0 and within == 0:
            continue  # constant: any change is seen with one boot a side
        out.append(FigurePlan(ref, name, between, within, len(boots), comp.reps_per_boot,
                              stats.plan_design(between, within, effect, alpha=level)))
    return Plan(effect, alpha, level, out, untestable)


def render(p: Plan) -> str:
    """The plan as a plain table: the hardest figures first."""
    def worst(f: FigurePlan) -> int:
        return max((r.boots_per_side or 10**6) for r in f.rows)

    reps = [r.reps_per_boot for r in p.figures[0].rows] if p.figures else []
    lines = [
        f"Boots a side to find a {p.effect * 100:g}% change with 80% power at level "
        f"{p.level:.2g} (alpha {p.alpha:g}"
        + (f" / {round(p.alpha / p.level)} figures, Holm's strictest step)" if p.level < p.alpha
           else ", per figure)"),
        "figure | noise between boots | within a boot | now (boots x reps) | "
        + " | ".join(f"{r} rep{'s' if r > 1 else ''}/boot" for r in reps),
    ]
    for f in sorted(p.figures, key=worst, reverse=True):
        cells = [str(r.boots_per_side) if r.boots_per_side else ">100" for r in f.rows]
        lines.append(
            f"{f.phase.label()} {f.figure} | {f.between_sd * 100:.1f}% | "
            f"{f.within_sd * 100:.1f}% | {f.boots_now} x {f.reps_now:g} | " + " | ".join(cells)
        )
    if p.untestable:
        lines.append("No noise estimate (one boot with one repetition): "
                     + "; ".join(p.untestable))
    return "\n".join(lines) + "\n"
