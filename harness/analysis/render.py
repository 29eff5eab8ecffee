"""Presentation of a :class:`ComparisonReport`: terminal table, markdown, JSON.

Formatting only; every number and verdict comes from compare.py. Order is the
one a reviewer wants: what changed, whether it is fair, regressions, then
improvements, then one line for everything unchanged.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from harness.analysis.compare import ComparisonReport, FigureResult

HEADERS = ("phase", "figure", "base", "candidate", "change", "95% CI", "q", "note")


def _num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
        text = f"{x:.3g}"
    elif float(x).is_integer():
        text = f"{int(x):,}"
    else:
        text = f"{x:,.4g}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{text} {unit}".rstrip() if unit not in ("", "events") else text


def _pct(x: float | None) -> str:
    return "new" if x is None else f"{x * 100:+.1f}%"


def _ci(f: FigureResult) -> str:
    if f.ci_low is None or f.ci_high is None:
        return "-"
    return f"[{f.ci_low * 100:+.1f}, {f.ci_high * 100:+.1f}]%"


def _note(f: FigureResult) -> str:
    parts = []
    if f.decomposition is not None:
        d = f.decomposition
        parts.append(
            f"events x{d.events_ratio:.3g}, per event x{d.per_event_ratio:.3g} "
            f"(total x{d.total_ratio:.3g})"
        )
    if f.offset_by is not None:
        parts.append(f"offset: {f.offset_by} improved")
    return "; ".join(parts)


def row(f: FigureResult) -> tuple[str, ...]:
    """One table row of a figure."""
    return (
        f.phase.label(),
        f.figure + ("" if f.higher_is_better else " (lower better)"),
        _num(f.median_base, f.unit),
        _num(f.median_candidate, f.unit),
        _pct(f.change),
        _ci(f),
        "-" if f.q is None else f"{f.q:.2g}",
        _note(f),
    )


def headline(r: ComparisonReport) -> str:
    """One line: the verdict of the whole comparison."""
    failing = len(r.failing())
    if r.exit_status == 2:
        lead = "NOT COMPARABLE" if r.unfair else "NOTHING TO COMPARE"
    elif failing:
        lead = f"{failing} regression{'s' if failing != 1 else ''}"
    else:
        lead = "no regression"
    return (
        f"{lead}; {r.counts.get('improvement', 0)} improvements, "
        f"{r.counts.get('no change', 0)} unchanged, "
        f"{r.counts.get('not enough data', 0)} not enough data "
        f"({len(r.figures)} figures, {r.tested} tested)"
    )


def method_line(r: ComparisonReport) -> str:
    """How the verdicts were reached, in one sentence."""
    s = r.settings
    return (
        f"{s.test_description}; {s.correction_description} across the {r.tested} tested "
        f"figures at alpha {s.alpha:g}; a verdict needs the corrected q < {s.alpha:g} AND "
        f"|change of median| >= {s.threshold * 100:g}%; CI: {s.ci_level * 100:g}% percentile "
        f"bootstrap of the median change ({s.bootstrap_resamples} resamples, fixed seed)"
    )


def _side_lines(r: ComparisonReport) -> list[str]:
    lines = []
    for side in (r.base, r.candidate):
        lines.append(f"{side.label}: {len(side.run_ids)} run(s): {', '.join(side.run_ids)}")
        for e in side.excluded:
            lines.append(f"  left out {e['path']} ({e['status']}): {e['reason']}")
    return lines


def _sections(r: ComparisonReport) -> list[tuple[str, list[FigureResult]]]:
    return [
        ("Regressions", r.failing()),
        ("Measured on one side only (probe not attached, or metric not printed, on the other)",
         [f for f in r.figures if f.only_in is not None]),
        ("Improvements", r.by_verdict("improvement")),
        (
            "Slower per event, offset by fewer events (not failing)",
            [f for f in r.by_verdict("regression") if f.offset_by is not None],
        ),
        (
            f"Changed by at least {r.settings.threshold * 100:g}%, but too few repetitions "
            "to test (no verdict; run more)",
            [f for f in r.by_verdict("not enough data")
             if f.only_in is None and (f.change is None or abs(f.change) >= r.settings.threshold)],
        ),
    ]


def markdown(r: ComparisonReport) -> str:
    """A CI comment: headline, what changed, regressions, improvements, one line for the rest."""
    out = [f"### harness compare: {headline(r)}", ""]
    out.append("**What changed** (base → candidate)")
    out += [f"- {c.field}: {_vals(c.base)} → {_vals(c.candidate)}" for c in r.what_changed] or [
        "- nothing in the recorded provenance"
    ]
    if r.unfair:
        out += ["", "**Unfair comparison**" + (" (allowed)" if r.settings.allow_mismatch else "")]
        out += [
            f"- {c.field}: {_vals(c.base)} → {_vals(c.candidate)} ({c.meaning})" for c in r.unfair
        ]
    for title, figs in _sections(r):
        if not figs:
            continue
        out += ["", f"#### {title}", "", "| " + " | ".join(HEADERS) + " |",
                "|" + "---|" * len(HEADERS)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row(f)) + " |" for f in figs]
    out += ["", f"Unchanged: {r.counts.get('no change', 0)} figures; "
            f"not enough data: {r.counts.get('not enough data', 0)}."]
    if r.unmatched_phases:
        out += ["", "Unmatched phases: " + "; ".join(r.unmatched_phases)]
    out += ["", f"<sub>{method_line(r)}</sub>", ""]
    out += [f"<sub>{line.strip()}</sub>  " for line in _side_lines(r)]
    return "\n".join(out) + "\n"


def _vals(values: list[str]) -> str:
    return " | ".join(values) if values else "(absent)"


def table(r: ComparisonReport, width: int | None = None) -> str:
    """The same content as markdown, as terminal tables."""
    buf = io.StringIO()
    console = Console(file=buf, width=width or 160, force_terminal=False, color_system=None)

    def line(text: str) -> None:  # plain lines are never wrapped: logs get grepped
        console.print(text, markup=False, soft_wrap=True, highlight=False)

    line(f"harness compare: {headline(r)}")
    line("What changed (base -> candidate):")
    for c in r.what_changed:
        line(f"  {c.field}: {_vals(c.base)} -> {_vals(c.candidate)}")
    if not r.what_changed:
        line("  nothing in the recorded provenance")
    if r.unfair:
        allowed = " (allowed by --allow-mismatch)" if r.settings.allow_mismatch else ""
        line(f"UNFAIR comparison{allowed}:")
        for c in r.unfair:
            line(f"  {c.field}: {_vals(c.base)} -> {_vals(c.candidate)} ({c.meaning})")
    for title, figs in _sections(r):
        if figs:
            t = Table(title=title, title_justify="left")
            for h in HEADERS:
                t.add_column(h, overflow="fold")
            for f in figs:
                t.add_row(*row(f))
            console.print(t)
    line(
        f"Unchanged: {r.counts.get('no change', 0)} figures; "
        f"not enough data: {r.counts.get('not enough data', 0)}."
    )
    if r.unmatched_phases:
        line("Unmatched phases: " + "; ".join(r.unmatched_phases))
    line(method_line(r))
    for text in _side_lines(r):
        line(text)
    return buf.getvalue()


def as_json(r: ComparisonReport) -> str:
    """The whole report as JSON (the figures, settings and provenance, nothing lost)."""
    return r.model_dump_json(indent=2) + "\n"


FORMATS: dict[str, Callable[[ComparisonReport], str]] = {
    "table": table,
    "md": markdown,
    "json": as_json,
}
