"""The report's plots, drawn with matplotlib (Agg: no display, same pixels everywhere).

Every function takes numbers already in a result file or a comparison report
and returns a :class:`Plot` (PNG bytes and a file name); nothing here computes
a figure of its own.
"""

from __future__ import annotations

import io
import re
import statistics
import zlib
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # before pyplot: a report is written on headless CI runners

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from harness.trace.model import HistBucketModel, ProbeStacks, StackCount

#: Resolution of every PNG: sharp enough for a browser, small enough to inline.
DPI = 90


@dataclass
class Plot:
    """One rendered plot: a stable file name (for --png) and its PNG bytes."""

    name: str
    title: str
    png: bytes
    alt: str = ""
    tags: list[str] = field(default_factory=list)


def slug(text: str) -> str:
    """A file-name-safe form of ``text`` (letters, digits, dashes)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:120] or "plot"


def _finish(fig: Figure, name: str, title: str, alt: str) -> Plot:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return Plot(name=slug(name), title=title, png=buf.getvalue(), alt=alt)


def stacked_bars(
    name: str, title: str, categories: list[str], series: dict[str, list[int]], ylabel: str
) -> Plot:
    """Stacked bars: one bar per category (phase), one colour per series key (reason, kind)."""
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(categories) + 2.5), 3.4))
    bottom = [0] * len(categories)
    cmap = plt.get_cmap("tab20")
    for i, (key, values) in enumerate(sorted(series.items(), key=lambda kv: -sum(kv[1]))):
        ax.bar(categories, values, bottom=bottom, label=key, color=cmap(i % 20))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return _finish(fig, name, title, f"{title}: " + ", ".join(sorted(series)))


def _bucket_label(b: HistBucketModel) -> str:
    low = 0 if b.low is None or b.low < 0 else b.low
    return _si(low) + "-" + _si(b.high)


def _si(ns: int) -> str:
    for unit, scale in (("s", 10**9), ("ms", 10**6), ("us", 10**3)):
        if ns >= scale:
            return f"{ns / scale:.3g}{unit}"
    return f"{ns}ns"


def histograms(name: str, title: str, panels: dict[str, list[HistBucketModel]]) -> Plot:
    """One log2 latency histogram per panel (phase), the buckets as the tracer recorded them."""
    n = len(panels)
    fig, axes = plt.subplots(n, 1, figsize=(7.0, 1.9 * n + 0.6), squeeze=False)
    for ax, (label, buckets) in zip(axes[:, 0], panels.items(), strict=True):
        ordered = sorted(buckets, key=lambda b: b.high)
        ax.bar(range(len(ordered)), [b.count for b in ordered], color="#4c72b0")
        ax.set_xticks(range(len(ordered)), [_bucket_label(b) for b in ordered], fontsize=7,
                      rotation=30)
        ax.set_ylabel("events", fontsize=8)
        ax.set_title(label, fontsize=9, loc="left")
    fig.suptitle(title, fontsize=10)
    return _finish(fig, name, title, f"{title}, log2 buckets")


def histogram_overlay(
    name: str, title: str, base: list[HistBucketModel], candidate: list[HistBucketModel]
) -> Plot:
    """Base and candidate log2 histograms side by side, each as a share of its events."""
    highs = sorted({b.high for b in (*base, *candidate)})
    labels = {b.high: _bucket_label(b) for b in (*base, *candidate)}
    fig, ax = plt.subplots(figsize=(7.0, 3.0))
    width = 0.4
    for shift, (label, buckets, colour) in enumerate(
        (("base", base, "#4c72b0"), ("candidate", candidate, "#dd8452"))
    ):
        total = sum(b.count for b in buckets) or 1
        share = {b.high: b.count / total for b in buckets}
        xs = [i + (shift - 0.5) * width for i in range(len(highs))]
        ax.bar(xs, [share.get(h, 0.0) for h in highs], width=width, label=label, color=colour)
    ax.set_xticks(range(len(highs)), [labels[h] for h in highs], fontsize=7, rotation=30)
    ax.set_ylabel("share of events")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    return _finish(fig, name, title, f"{title}: base against candidate")


def repetitions(name: str, title: str, panels: dict[str, dict[str, list[float]]]) -> Plot:
    """Per metric a panel: each repetition's value as a dot per phase, the median as a bar."""
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.7 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (label, values) in zip(axes.flat, panels.items(), strict=False):
        for i, ys in enumerate(values.values()):
            ax.scatter([i] * len(ys), ys, color="#4c72b0", zorder=3, s=18)
            if ys:
                ax.hlines(statistics.median(ys), i - 0.25, i + 0.25, color="#c44e52", zorder=4)
        ax.set_xticks(range(len(values)), list(values), fontsize=7, rotation=20)
        ax.set_xlim(-0.6, len(values) - 0.4)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _finish(fig, name, title, f"{title}: every repetition, median marked")


def _colour(fn: str) -> tuple[float, float, float]:
    # Stable per function name across plots and runs, in warm flame-graph tones.
    h = zlib.crc32(fn.encode()) / 2**32
    return (0.85 + 0.15 * h, 0.35 + 0.45 * (1 - h), 0.15 + 0.2 * h)


def icicle_boxes(stacks: ProbeStacks) -> tuple[dict[tuple[str, ...], int], int]:
    """Each call-tree prefix's width, identical prefixes merged, and the total width.

    Widths are events: stack counts, or for a rate target the stacks' weights (the
    events they stand for; samples taken at different periods are not alike).
    """
    weighted = stacks.rate_hz is not None

    def width(s: StackCount) -> int:
        return s.weight if weighted and s.weight else s.count

    boxes: dict[tuple[str, ...], int] = {}
    for s in stacks.stacks:
        for d in range(1, len(s.frames) + 1):
            key = tuple(s.frames[:d])
            boxes[key] = boxes.get(key, 0) + width(s)
    return boxes, sum(map(width, stacks.stacks)) or 1


def icicle(name: str, title: str, stacks: ProbeStacks) -> Plot:
    """An icicle (an upside-down flame graph): the outermost frame on top, width = events."""
    weighted = stacks.rate_hz is not None
    boxes, total = icicle_boxes(stacks)
    depth = max((len(s.frames) for s in stacks.stacks), default=1)
    fig, ax = plt.subplots(figsize=(9.0, 0.32 * depth + 0.9))
    offsets: dict[tuple[str, ...], float] = {(): 0.0}
    for key in sorted(boxes, key=lambda k: (len(k), -boxes[k], k)):
        parent = key[:-1]
        x = offsets.get(parent, 0.0)
        offsets[parent] = x + boxes[key]
        offsets.setdefault(key, x)
        w = boxes[key] / total
        y = len(key) - 1
        ax.barh(-y, w, left=x / total, height=0.92, color=_colour(key[-1]), edgecolor="white",
                linewidth=0.4)
        if w > 0.08:
            ax.text(x / total + 0.005, -y, key[-1][: int(w * 110)], va="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(-depth + 0.4, 0.6)
    ax.set_yticks([])
    ax.set_xlabel(f"share of the {total} events of {stacks.stacked} stacks" if weighted
                  else f"share of {total} stacked events", fontsize=8)
    ax.set_title(title, fontsize=10, loc="left")
    return _finish(fig, name, title, f"{title}: call paths, outermost frame on top")


def forest(name: str, title: str, rows: list[tuple[str, float, float | None, float | None, str]]
           ) -> Plot:
    """Changes with their confidence intervals: (label, change, ci_low, ci_high, verdict)."""
    colours = {"regression": "#c44e52", "improvement": "#55a868"}
    fig, ax = plt.subplots(figsize=(8.0, 0.36 * len(rows) + 1.0))
    for i, (_label, change, lo, hi, verdict) in enumerate(rows):
        colour = colours.get(verdict, "#777777")
        if lo is not None and hi is not None:
            ax.hlines(-i, lo * 100, hi * 100, color=colour, linewidth=2)
        ax.plot(change * 100, -i, "o", color=colour)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_yticks([-i for i in range(len(rows))], [r[0][:70] for r in rows], fontsize=7)
    ax.set_xlabel("change of median, % (bar: confidence interval)", fontsize=8)
    ax.set_title(title, fontsize=10)
    return _finish(fig, name, title, f"{title}: change and confidence interval per figure")
