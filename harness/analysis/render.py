"""Presentation of a :class:`ComparisonReport`: terminal table, markdown, JSON.

Formatting only; every number and verdict comes from compare.py. Order is the
one a reviewer wants: what changed, whether it is fair, warnings about the
host, phases that broke, regressions, then improvements, then every change
beyond the threshold that is not a verdict (and why), then one line for the
rest with the smallest change the comparison could have seen.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from harness.analysis.compare import ComparisonReport, FigureResult, PhaseFailure

HEADERS = ("phase", "figure", "base", "candidate", "change", "95% CI", "q", "could see", "note")
FAILURE_HEADERS = ("phase", "base failed", "candidate failed", "how")


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


def _mde(f: FigureResult) -> str:
    return "-" if f.mde is None else f"±{f.mde * 100:.1f}%"


def _noise(f: FigureResult) -> str:
    if f.between_boot_sd is None and f.within_boot_sd is None:
        return ""
    def pct(x: float | None) -> str:
        return "?" if x is None else f"{x * 100:.1f}%"
    return (f"noise: boots {pct(f.between_boot_sd)}, repetitions {pct(f.within_boot_sd)}"
            + (f" (add {f.add})" if f.add else ""))


def _note(f: FigureResult) -> str:
    parts = []
    if f.verdict == "regression" and not f.gating and f.offset_by is None:
        parts.append(f"not gating: family-wise q {_q(f.q_fwer)}")
    if f.verdict in ("no change", "not enough data") and f.why_no_test:
        parts.append(f.why_no_test)
    elif f.verdict == "no change" and f.q is not None and f.q >= 0.0:
        parts.append(f"not significant (q {_q(f.q)})")
    if f.not_steady:
        parts.append(f"not steady: {f.not_steady}")
    if f.decomposition is not None:
        d = f.decomposition
        parts.append(
            f"events x{d.events_ratio:.3g}, per event x{d.per_event_ratio:.3g} "
            f"(total x{d.total_ratio:.3g})"
        )
    if f.offset_by is not None:
        parts.append(f"offset: {f.offset_by} improved")
    if noise := _noise(f):
        parts.append(noise)
    return "; ".join(parts)


def _q(q: float | None) -> str:
    return "-" if q is None else f"{q:.2g}"


def row(f: FigureResult) -> tuple[str, ...]:
    """One table row of a figure."""
    return (
        f.phase.label(),
        f.figure + ("" if f.higher_is_better else " (lower better)"),
        _num(f.median_base, f.unit),
        _num(f.median_candidate, f.unit),
        _pct(f.change),
        _ci(f),
        _q(f.q),
        _mde(f),
        _note(f),
    )


def failure_row(f: PhaseFailure) -> tuple[str, ...]:
    """One table row of a phase that failed."""
    return (
        f.phase.label(),
        f"{f.base_failed} of {f.base_total}",
        f"{f.candidate_failed} of {f.candidate_total}",
        "; ".join(f.how),
    )


def headline(r: ComparisonReport) -> str:
    """One line: the verdict of the whole comparison."""
    failing, broken = len(r.failing()), len(r.broken())
    if r.exit_status == 2:
        lead = "NOT COMPARABLE" if r.unfair and not r.settings.allow_mismatch else (
            f"NO VERDICT POSSIBLE: {r.no_verdict}" if r.no_verdict else "NOTHING TO COMPARE")
    elif failing or broken:
        parts = []
        if broken:
            parts.append(f"{broken} phase{'s' if broken != 1 else ''} broken on the candidate")
        if failing:
            parts.append(f"{failing} regression{'s' if failing != 1 else ''}")
        lead = ", ".join(parts)
    else:
        lead = "no regression"
    return (
        f"{lead}; {r.counts.get('improvement', 0)} improvements, "
        f"{r.counts.get('no change', 0)} unchanged, "
        f"{r.counts.get('not enough data', 0)} not enough data "
        f"({len(r.figures)} figures, {r.tested} tested; boots {r.base.boots} vs "
        f"{r.candidate.boots})"
    )


def method_line(r: ComparisonReport) -> str:
    """How the verdicts were reached, and what the exit status guarantees."""
    s = r.settings
    unit = ("boots are the independent samples (repetitions of a boot are averaged first)"
            if s.unit == "boot" else "every repetition treated as independent (--unit "
            "repetition: boot-to-boot noise is not in the test)")
    return (
        f"{s.test_description}; {unit}; change, {s.ci_level * 100:g}% t interval and the "
        f"{s.threshold * 100:g}% threshold gate all on the ratio of geometric means; a finding "
        f"needs q < {s.alpha:g} ({s.correction_description}, {r.tested} tested) AND "
        f"|change| >= {s.threshold * 100:g}%; counts also pass a Poisson rate test; "
        f"'could see': the change found with 80% power at the measured noise. "
        f"Exit status: {s.guarantee}"
    )


def unchanged_line(r: ComparisonReport) -> str:
    """The rest in one line, with how small a change the comparison could have seen."""
    quiet = [f for f in r.figures if f.verdict == "no change"]
    seen = sorted(f.mde for f in quiet if f.mde is not None)
    within = ""
    if seen:
        within = (f", within ±{seen[len(seen) // 2] * 100:.1f}% for half of them and "
                  f"±{seen[-1] * 100:.1f}% for all tested")
    return (f"Unchanged: {len(quiet)} figures{within}; "
            f"not enough data: {r.counts.get('not enough data', 0)}.")


def _side_lines(r: ComparisonReport) -> list[str]:
    lines = []
    for side in (r.base, r.candidate):
        warm = f", {side.warmups_excluded} warm-up repetition(s) not compared" if (
            side.warmups_excluded) else ""
        lines.append(f"{side.label}: {len(side.run_ids)} run(s), {side.boots} boot(s){warm}: "
                     f"{', '.join(side.run_ids)}")
        for e in side.excluded:
            lines.append(f"  left out {e['path']} ({e['status']}): {e['reason']}")
    return lines


def _sections(r: ComparisonReport) -> list[tuple[str, list[FigureResult]]]:
    t = r.settings.threshold
    return [
        ("Regressions (decide the exit status)", r.failing()),
        (
            "Listed regressions that do not pass the family-wise gate (not failing)",
            [f for f in r.by_verdict("regression") if not f.gating and f.offset_by is None],
        ),
        ("Measured on one side only (probe not attached, or metric not printed, on the other)",
         [f for f in r.figures if f.only_in is not None]),
        ("Improvements", r.by_verdict("improvement")),
        (
            "Slower per event, offset by fewer events (not failing)",
            [f for f in r.by_verdict("regression") if f.offset_by is not None],
        ),
        (
            f"Changed by at least {t * 100:g}%, but not a verdict (too noisy, or too few "
            "boots to test: see the note)",
            [f for v in ("no change", "not enough data") for f in r.by_verdict(v)
             if f.only_in is None and (f.change is None or abs(f.change) >= t)],
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
    if r.warnings:
        out += ["", "**Host warnings**"] + [f"- {w}" for w in r.warnings]
    if r.failures:
        out += ["", "#### Phases that failed", "", "| " + " | ".join(FAILURE_HEADERS) + " |",
                "|" + "---|" * len(FAILURE_HEADERS)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in failure_row(f)) + " |"
                for f in r.failures]
    for title, figs in _sections(r):
        if not figs:
            continue
        out += ["", f"#### {title}", "", "| " + " | ".join(HEADERS) + " |",
                "|" + "---|" * len(HEADERS)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row(f)) + " |" for f in figs]
    out += ["", unchanged_line(r)]
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
    for w in r.warnings:
        line(f"WARNING: {w}")
    if r.failures:
        t = Table(title="Phases that failed", title_justify="left")
        for h in FAILURE_HEADERS:
            t.add_column(h, overflow="fold")
        for fl in r.failures:
            t.add_row(*failure_row(fl))
        console.print(t)
    for title, figs in _sections(r):
        if figs:
            t = Table(title=title, title_justify="left")
            for h in HEADERS:
                t.add_column(h, overflow="fold")
            for f in figs:
                t.add_row(*row(f))
            console.print(t)
    line(unchanged_line(r))
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
