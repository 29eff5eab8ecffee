"""`harness report`: one self-contained HTML page of result files (and a comparison).

The page opens with no network: its style is inline and every plot is a PNG
in a ``data:`` URI (the same PNGs can be written to a directory for CI
artifacts). It shows what the result files and harness.analysis say and
nothing else: counts are the tracer's, per repetition as recorded; spread
and medians of workload metrics are those of the recorded repetitions; the
comparison is :func:`harness.analysis.compare.compare` and its verdicts are
shown as ``harness compare`` prints them.
"""

from __future__ import annotations

import base64
import html
import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from harness.analysis import callpaths, render
from harness.analysis.compare import ComparisonReport, FigureResult
from harness.report import plots
from harness.report.plots import Plot
from harness.results import PhaseResult, RunResult, VmRecord, WorkloadRun
from harness.trace.model import HistBucketModel

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1300px}
h1{font-size:1.5em}h2{border-bottom:2px solid #ccc;margin-top:2em}h3{margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.n{text-align:right;font-variant-numeric:tabular-nums}
.status{padding:.6em 1em;font-weight:bold;font-size:1.15em;border-radius:4px}
.bad{background:#fde2e2;border:2px solid #c44e52}.ok{background:#e4f4e8;border:1px solid #55a868}
.note{color:#555;font-style:italic}.tcg{background:#fff6d5;padding:.3em .6em}
img{max-width:100%;display:block;margin:.4em 0}details{margin:.5em 0}
summary{cursor:pointer;font-weight:bold}code{font-size:.9em}
"""


def esc(value: object) -> str:
    """HTML-escaped text of ``value``."""
    return html.escape(str(value), quote=True)


@dataclass
class Page:
    """The page under construction and the plots it embeds (kept for --png)."""

    parts: list[str] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)

    def add(self, text: str) -> None:
        """Append raw HTML."""
        self.parts.append(text)

    def plot(self, p: Plot, prefix: str) -> None:
        """Embed a plot inline; its name gets ``prefix`` so PNG file names stay unique."""
        p.name = plots.slug(f"{prefix}-{p.name}")
        names = {q.name for q in self.plots}
        base, i = p.name, 2
        while p.name in names:
            p.name, i = f"{base}-{i}", i + 1
        self.plots.append(p)
        data = base64.b64encode(p.png).decode()
        self.add(f'<img alt="{esc(p.alt or p.title)}" data-plot="{esc(p.name)}" '
                 f'src="data:image/png;base64,{data}">')


def table(headers: Iterable[str], rows: Iterable[Iterable[object]], numeric: bool = True) -> str:
    """An HTML table; cells that look like numbers are right-aligned."""
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>"]
    for r in rows:
        cells = []
        for c in r:
            text = esc(c)
            cls = ' class="n"' if numeric and _numeric(str(c)) else ""
            cells.append(f"<td{cls}>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _numeric(text: str) -> bool:
    return bool(text) and all(ch in "0123456789.,-+% /e" for ch in text) and any(
        ch.isdigit() for ch in text
    )


def _fmt(x: float | None) -> str:
    return render._num(x)


# ---------------------------------------------------------------- one result


def _accelerator(result: RunResult, vm: str) -> VmRecord | None:
    return next((v for v in result.vms if v.name == vm), None)


def _groups(result: RunResult) -> dict[tuple[str, str, str], list[WorkloadRun]]:
    """Repetitions of one workload with one parameter set on one VM, in run order."""
    out: dict[tuple[str, str, str], list[WorkloadRun]] = {}
    for run in result.runs:
        params = ",".join(f"{k}={v}" for k, v in sorted(run.params.items()))
        out.setdefault((run.vm, run.workload, params), []).append(run)
    return out


def _warmup(run: WorkloadRun) -> bool:
    return bool(getattr(run, "warmup", False))  # absent in results of older harnesses


def _rep_label(run: WorkloadRun) -> str:
    """``boot#repetition``, and whether it was a warm-up (recorded, never compared)."""
    boot = getattr(run, "boot", None)
    label = f"{boot}#{run.repetition}" if boot else f"repetition {run.repetition}"
    return label + (" (warm-up)" if _warmup(run) else "")


def _phase_names(runs: list[WorkloadRun]) -> list[str]:
    names: list[str] = []
    for run in runs:
        for p in run.phases:
            if p.name not in names:
                names.append(p.name)
    return names


def _per_rep(runs: list[WorkloadRun], phase: str) -> list[PhaseResult | None]:
    return [next((p for p in r.phases if p.name == phase), None) for r in runs]


def _reps_text(values: list[object]) -> str:
    """Per-repetition values joined by ' / ' (a dash where the repetition has none)."""
    return " / ".join("-" if v is None else _fmt(v) if isinstance(v, int | float) else str(v)
                      for v in values)


def _status_banner(result: RunResult) -> str:
    if result.status == "complete":
        return (f'<div class="status ok">status: complete ({len(result.runs)} workload '
                f"repetition(s))</div>")
    errors = "".join(f"<li>{esc(e)}</li>" for e in result.errors) or "<li>(no error recorded)</li>"
    not_ok = [r for r in result.runs if r.status != "ok"]
    runs = "".join(
        f"<li>{esc(r.workload)} on {esc(r.vm)}, repetition {r.repetition}: {esc(r.status)}"
        f"{': ' + esc(r.reason) if r.reason else ''}</li>"
        for r in not_ok
    )
    return (
        f'<div class="status bad">status: {esc(result.status.upper())}: this run did not '
        f"complete; what it measured before it stopped is shown below, and `harness compare` "
        f"leaves it out<ul>{errors}{runs}</ul></div>"
    )


def _kvm_note(result: RunResult, vm: str, runs: list[WorkloadRun]) -> str | None:
    """Why a group shows no KVM events, or None when it has some to show."""
    rec = _accelerator(result, vm)
    if rec is not None and rec.accelerator == "tcg":
        return f"no KVM events: TCG ({rec.accelerator_reason})"
    if rec is not None and (rec.trace is None or rec.trace.tracer_status == "disabled"):
        return "no KVM events: the tracer was not run for this VM"
    if not any(p.trace is not None for r in runs for p in r.phases):
        return "no KVM events recorded for these phases"
    return None


def _attached(result: RunResult, vm: str) -> set[str]:
    return {p for v in result.vms if v.name == vm and v.trace for p in v.trace.probes_attached}


def _family_plot(
    page: Page, prefix: str, title: str, phases: list[str], runs: list[WorkloadRun],
    attr: str, why_empty: str,
) -> None:
    series: dict[str, list[int]] = {}
    for i, name in enumerate(phases):
        for p in _per_rep(runs, name):
            if p is None or p.trace is None:
                continue
            for key, n in getattr(p.trace, attr).items():
                series.setdefault(key, [0] * len(phases))[i] += n
    if not series:
        page.add(f'<p class="note">{esc(title)}: none recorded ({esc(why_empty)})</p>')
        return
    page.plot(
        plots.stacked_bars(attr, f"{title}, total over {len(runs)} repetition(s)", phases,
                           series, "events"),
        prefix,
    )


def _trace_table(phases: list[str], runs: list[WorkloadRun]) -> str:
    rows = []
    all_notes: set[str] = set()
    for name in phases:
        reps = _per_rep(runs, name)
        tr = [p.trace if p is not None else None for p in reps]
        if all(t is None for t in tr):
            rows.append([name, "(not traced)", "", "", "", "", "", ""])
            continue
        first = next(t for t in tr if t is not None)
        mmu = sorted({k for t in tr if t for k in t.mmu_events})
        notes = sorted({t.cr3_writes_note for t in tr if t and t.cr3_writes_note})
        cr3 = _reps_text([t.cr3_writes if t else None for t in tr])
        if notes:
            cr3 = f"{cr3} (not the guest's count: see note)"
        rows.append([
            name,
            f"{first.attribution} ({'exact, guest cpuid markers' if first.attribution == 'guest-marker' else 'host markers around the guest command'})",  # noqa: E501
            _reps_text([t.events_total if t else None for t in tr]),
            "; ".join(f"{k}: {_reps_text([t.mmu_events.get(k, 0) if t else None for t in tr])}"
                      for k in mmu) or "-",
            _reps_text([t.shadow_pages_created if t else None for t in tr]) + " created, "
            + _reps_text([t.shadow_pages_found if t else None for t in tr]) + " found",
            cr3,
            _reps_text([t.emulated_insns if t else None for t in tr]),
            _reps_text([(t.duration_ns / 1e6 if t.duration_ns is not None else None) if t else None
                        for t in tr]),
        ])
        all_notes.update(notes)
    return table(
        ["phase", "attribution", "events", "MMU events", "root lookups (MMU pages)",
         "CR3 writes", "emulated instructions", "duration (ms, in-kernel)"],
        rows, numeric=False,
    ) + "".join(f'<p class="note">CR3 writes: {esc(n)}</p>' for n in sorted(all_notes))


def _latency(page: Page, prefix: str, phases: list[str], runs: list[WorkloadRun]) -> None:
    names = sorted({n for r in runs for p in r.phases if p.trace for n in p.trace.latency_ns})
    for lat in names:
        panels: dict[str, list[HistBucketModel]] = {}
        for phase in phases:
            merged: dict[tuple[int | None, int], int] = {}
            for p in _per_rep(runs, phase):
                if p is None or p.trace is None:
                    continue
                for b in p.trace.latency_ns.get(lat, []):
                    merged[(b.low, b.high)] = merged.get((b.low, b.high), 0) + b.count
            if merged:
                panels[phase] = [HistBucketModel(low=lo, high=hi, count=n)
                                 for (lo, hi), n in merged.items()]
        if panels:
            page.plot(plots.histograms(f"latency-{lat}", f"latency {lat} (ns), all "
                                       f"{len(runs)} repetition(s)", panels), prefix)


def _metrics(page: Page, prefix: str, result: RunResult, runs: list[WorkloadRun]) -> None:
    info = result.workloads.get(runs[0].workload)
    rows = []
    by_metric: dict[str, dict[str, list[float]]] = {}
    for name in _phase_names(runs):
        reps = _per_rep(runs, name)
        metrics = sorted({m for p in reps if p for m in p.metrics})
        for m in metrics:
            # Warm-ups are shown in brackets and left out of median and spread, as compare does.
            shown = [None if p is None or m not in p.metrics
                     else f"[{_fmt(p.metrics[m])}]" if _warmup(r) else p.metrics[m]
                     for p, r in zip(reps, runs, strict=True)]
            vals = [p.metrics[m] for p, r in zip(reps, runs, strict=True)
                    if p and m in p.metrics and not _warmup(r)]
            if not vals:
                continue
            meta = info.metrics.get(m) if info else None
            unit = meta.unit if meta else ""
            better = "" if meta is None else "higher" if meta.higher_is_better else "lower"
            spread = (
                f"{100 * statistics.stdev(vals) / abs(statistics.mean(vals)):.1f}%"
                if len(vals) > 1 and statistics.mean(vals) else "-"
            )
            rows.append([name, m, unit, better, _reps_text(list(shown)),
                         _fmt(statistics.median(vals)), f"{_fmt(min(vals))} - {_fmt(max(vals))}",
                         spread])
            by_metric.setdefault(f"{m} [{unit}]" if unit else m, {})[name] = vals
        missing = sorted({m for p in reps if p for m in p.metrics_missing})
        if missing:
            rows.append([name, ", ".join(missing), "", "", "not printed by the workload",
                         "", "", ""])
    if not rows:
        return
    page.add("<h4>Workload metrics across repetitions</h4>")
    page.add(table(["phase", "metric", "unit", "better", "each repetition ([warm-up])", "median",
                    "min - max", "spread (sd/mean)"], rows, numeric=False))
    page.plot(plots.repetitions("metrics", "workload metrics, each measured repetition (dot) "
                                "and median (bar); warm-ups left out", by_metric), prefix)


def _callpaths(page: Page, prefix: str, result: RunResult) -> None:
    items = callpaths.collect(result)
    if not items:
        return
    page.add("<h3>Call paths</h3>")
    for it in items:
        st = it.stacks
        cover = f"{st.stacked} of {st.events} events stacked"
        if st.rate_hz is not None:
            cover = (f"sampled at about {st.rate_hz} stacks/s per CPU: {st.stacked} stacks of "
                     f"{st.events} events, mean period {st.period}")
        elif st.period > 1:
            cover = (f"sampled, a stack every {st.period} events per CPU: {st.stacked} stacks "
                     f"of {st.events} events")
        cut = f", {st.truncated} cut at depth {st.depth}" if st.truncated else ""
        page.add(f"<p>{esc(it.label)}, probe <code>{esc(it.probe)}</code>: "
                 f"{it.repetitions} repetition(s), {cover}{cut}</p>")
        if st.stacks:
            page.plot(plots.icicle(f"stacks-{it.label}-{it.probe}",
                                   f"{it.label}: {it.probe}", st), prefix)
        if st.path_estimates:  # sampled: the estimate and its interval beside the samples
            rows = [[fn, n, f"~{est.events:.0f} [{est.low:.0f}, {est.high:.0f}]"]
                    for fn, n in list(st.paths.items())[:12]
                    if (est := st.path_estimates.get(fn)) is not None]
            page.add(table(["function on the stack", "stacks through it",
                            "estimated events [95% interval]"], rows))
            continue
        top = list(st.paths.items())[:12]
        if top:
            page.add(table(["function on the stack", "events through it"], top))


def _provenance(result: RunResult) -> str:
    host = result.host.model_dump(mode="json")
    rows = [[k, json.dumps(v) if isinstance(v, dict | list) else v] for k, v in host.items()]
    vms = []
    for v in result.vms:
        tr = v.trace
        vms.append([
            v.name, v.domain, f"{v.accelerator} ({v.accelerator_reason})",
            v.image, v.image_digest[:16], f"{v.vcpus} vCPU, {v.memory_mib} MiB",
            _fmt(v.boot_to_ready_s),
            "-" if tr is None else f"{tr.tracer_status} ({tr.backend or '?'}), "
            f"{tr.events_total} events, {tr.lost_events} lost",
            "-" if tr is None else ", ".join(tr.probes_attached),
            "-" if tr is None else "; ".join(f"{p.probe}: {p.reason}"
                                             for p in tr.probes_not_attached),
            v.ended_early or "",
        ])
    extra = {"suite": result.suite.model_dump(mode="json"),
             "command_line": result.command_line,
             "harness_version": result.harness_version,
             "host_config": result.host_config.model_dump(mode="json")
             if result.host_config else None,
             "notes": result.notes}
    return (
        f"<details><summary>Provenance of {esc(result.run_id)}</summary>"
        + table(["host", "value"], rows, numeric=False)
        + table(["VM", "domain", "accelerator", "image", "digest", "size", "boot to ready (s)",
                 "tracer", "probes attached", "not attached", "ended early"], vms, numeric=False)
        + f"<pre>{esc(json.dumps(extra, indent=2, default=str))}</pre></details>"
    )


def result_section(page: Page, path: Path, result: RunResult) -> None:
    """Everything about one result file: status, per phase traces, metrics, call paths."""
    prefix = result.run_id
    page.add(f'<h2 id="{esc(result.run_id)}">{esc(result.run_id)}: suite '
             f"{esc(result.suite.name)}</h2>")
    page.add(_status_banner(result))
    accels = ", ".join(sorted({f"{v.name}: {v.accelerator}" for v in result.vms})) or "-"
    page.add(table(["file", "host", "kernel", "MMU mode", "VMs", "started", "finished"], [[
        str(path), result.host.hostname, result.host.kernel_release, result.host.mmu_mode,
        accels, result.started_at.isoformat(timespec="seconds"),
        result.finished_at.isoformat(timespec="seconds") if result.finished_at else "-",
    ]], numeric=False))
    for (vm, workload, params), runs in _groups(result).items():
        page.add(f"<h3>{esc(workload)}{esc(f' [{params}]' if params else '')} on "
                 f"{esc(vm)}</h3>")
        statuses = [f"{_rep_label(r)}: {r.status}" + (f" ({r.reason})" if r.reason else "")
                    for r in runs]
        page.add(f"<p>repetitions: {esc('; '.join(statuses))}</p>")
        phases = _phase_names(runs)
        gprefix = f"{prefix}-{vm}-{workload}-{params}"
        note = _kvm_note(result, vm, runs)
        if note is not None:
            page.add(f'<p class="tcg">{esc(note)}</p>')
        else:
            attached = _attached(result, vm)
            exit_why = ("kvm_exit is not attached" if "kvm_exit" not in attached
                        else "kvm_exit fired for none of these phases on this host")
            fault_why = ("kvm_page_fault is not attached" if "kvm_page_fault" not in attached
                         else "kvm_page_fault fired for none of these phases on this host")
            _family_plot(page, gprefix, "exits by reason", phases, runs, "exits", exit_why)
            _family_plot(page, gprefix, "MMU faults by kind", phases, runs, "mmu_faults",
                         fault_why)
            page.add("<p>Per phase; several values are each repetition's, in the order of the "
                     "repetitions line above (warm-ups included).</p>")
            page.add(_trace_table(phases, runs))
            _latency(page, gprefix, phases, runs)
        _metrics(page, gprefix, result, runs)
    _callpaths(page, prefix, result)
    page.add(_provenance(result))


# ---------------------------------------------------------------- comparison

def _extra(model: BaseModel, shown: set[str]) -> str:
    """Fields the table does not show (e.g. ones added to the model later), as k=v."""
    data = model.model_dump(mode="json")
    return "; ".join(f"{k}={v}" for k, v in data.items() if k not in shown and v is not None)


def _figure_rows(figs: list[FigureResult]) -> list[list[str]]:
    return [[*render.row(f), f.verdict] for f in figs]


_HEADERS = [*render.HEADERS, "verdict"]


def _all_fields(figs: list[FigureResult]) -> str:
    """Every field of every figure, whatever the model holds (nothing the tables omit is lost)."""
    dumped = [f.model_dump(mode="json") for f in figs]
    keys = [k for k in dict.fromkeys(k for d in dumped for k in d) if k != "phase"]
    rows = [[f.phase.label(), *(d.get(k) for k in keys)] for f, d in zip(figs, dumped,
                                                                          strict=True)]
    return ("<details><summary>Every field of every figure</summary>"
            + table(["phase", *keys], rows, numeric=False) + "</details>")


def comparison_section(page: Page, report: ComparisonReport) -> None:
    """The comparison exactly as `harness compare` decided it: verdict, changes, figures."""
    bad = report.exit_status != 0
    page.add('<h2 id="comparison">Comparison</h2>')
    page.add(f'<div class="status {"bad" if bad else "ok"}">{esc(render.headline(report))} '
             f"(harness compare exit status {report.exit_status})</div>")
    page.add(f'<p class="note">{esc(render.method_line(report))}</p>')
    page.add("<h3>What changed (base &rarr; candidate)</h3>")
    page.add(table(["field", "base", "candidate", "meaning"],
                   [[c.field, " | ".join(c.base), " | ".join(c.candidate), c.meaning]
                    for c in report.what_changed], numeric=False)
             if report.what_changed else "<p>nothing in the recorded provenance</p>")
    if report.unfair:
        allowed = " (allowed by --allow-mismatch)" if report.settings.allow_mismatch else ""
        page.add(f'<h3>Unfair comparison{esc(allowed)}</h3>')
        page.add(table(["field", "base", "candidate", "meaning"],
                       [[c.field, " | ".join(c.base), " | ".join(c.candidate), c.meaning]
                        for c in report.unfair], numeric=False))
    changed = [f for f in report.figures if f.verdict in ("regression", "improvement")
               and f.change is not None]
    if changed:
        ordered = sorted(changed, key=lambda f: (f.verdict != "regression", -abs(f.change or 0)))
        page.plot(plots.forest("forest", "regressions and improvements", [
            (f"{f.phase.label()} {f.figure}", f.change or 0.0, f.ci_low, f.ci_high, f.verdict)
            for f in ordered[:40]]), "comparison")
    for title, figs in render._sections(report):
        if figs:
            page.add(f"<h3>{esc(title)}</h3>")
            page.add(table(_HEADERS, _figure_rows(figs), numeric=False))
    rest = [f for f in report.figures if f.verdict in ("no change", "not enough data")]
    page.add(f"<details><summary>Unchanged or untested: {len(rest)} figures</summary>"
             + table(_HEADERS, _figure_rows(rest), numeric=False) + "</details>")
    page.add(_all_fields(report.figures))
    if report.unmatched_phases:
        page.add("<p>Unmatched phases: " + esc("; ".join(report.unmatched_phases)) + "</p>")
    sides = []
    for side in (report.base, report.candidate):
        sides.append([side.label, ", ".join(side.run_ids), ", ".join(side.files),
                      "; ".join(f"{e['path']} ({e['status']}): {e['reason']}"
                                for e in side.excluded)])
    page.add(table(["side", "runs", "files", "left out"], sides, numeric=False))
    settings = report.settings.model_dump(mode="json")
    top = _extra(report, {"base", "candidate", "settings", "what_changed", "unfair", "figures",
                          "unmatched_phases", "tested", "counts", "exit_status"})
    page.add("<details><summary>Settings</summary>"
             + table(["setting", "value"], settings.items(), numeric=False)
             + (f"<p>{esc(top)}</p>" if top else "") + "</details>")


def latency_overlays(page: Page, base: list[RunResult], candidate: list[RunResult]) -> None:
    """How each latency histogram moved: base against candidate, per matched phase."""
    def merged(results: list[RunResult]) -> dict[tuple[str, str, str], list[HistBucketModel]]:
        out: dict[tuple[str, str, str], dict[tuple[int | None, int], int]] = {}
        for r in results:
            for run in r.runs:
                for p in run.phases:
                    if p.trace is None or p.status != "ok":
                        continue
                    for lat, buckets in p.trace.latency_ns.items():
                        acc = out.setdefault((f"{run.workload} {run.vm}", p.name, lat), {})
                        for b in buckets:
                            acc[(b.low, b.high)] = acc.get((b.low, b.high), 0) + b.count
        return {k: [HistBucketModel(low=lo, high=hi, count=n) for (lo, hi), n in v.items()]
                for k, v in out.items()}

    b, c = merged(base), merged(candidate)
    for key in sorted(set(b) & set(c)):
        page.plot(plots.histogram_overlay(f"overlay-{'-'.join(key)}",
                                          f"{key[0]}/{key[1]}: latency {key[2]}", b[key],
                                          c[key]), "comparison")


# ---------------------------------------------------------------- the page


def build(
    results: list[tuple[Path, RunResult]],
    comparison: ComparisonReport | None = None,
    comparison_error: str | None = None,
    base: list[RunResult] | None = None,
) -> Page:
    """The whole page for ``results`` (and a comparison with base results, when given)."""
    page = Page()
    title = "harness report: " + ", ".join(r.run_id for _, r in results)
    page.add(f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
             f"<title>{esc(title)}</title><style>{CSS}</style></head><body>")
    page.add(f"<h1>{esc(title)}</h1>")
    page.add(f'<p class="note">written {datetime.now(UTC).isoformat(timespec="seconds")} '
             f"from {len(results)} result file(s)</p>")
    not_complete = [r for _, r in results if r.status != "complete"]
    if not_complete:
        page.add('<div class="status bad">'
                 + esc("; ".join(f"{r.run_id}: {r.status.upper()}" for r in not_complete))
                 + "</div>")
    if comparison_error is not None:
        page.add(f'<h2 id="comparison">Comparison</h2><div class="status bad">no comparison: '
                 f"{esc(comparison_error)}</div>")
    if comparison is not None:
        comparison_section(page, comparison)
        if base is not None:
            latency_overlays(page, base, [r for _, r in results if r.status == "complete"])
    for path, result in results:
        result_section(page, path, result)
    page.add("</body></html>\n")
    return page


def write(page: Page, html_path: Path, png_dir: Path | None) -> None:
    """Write the page (and, with ``png_dir``, every plot as ``<name>.png``)."""
    html_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = html_path.with_name(f".{html_path.name}.tmp")
    tmp.write_text("".join(page.parts))
    tmp.replace(html_path)  # a reader (a CI artifact upload) never sees half a page
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
        for p in page.plots:
            (png_dir / f"{p.name}.png").write_bytes(p.png)
