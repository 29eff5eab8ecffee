"""The trend PNG of `harness history show`: one panel per series, one line per host kernel."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless CI runners

import matplotlib.pyplot as plt

from harness.history.store import TrendPoint

#: Panels drawn at most; the table lists every series.
MAX_PANELS = 16


def trend_png(points: list[TrendPoint], path: Path, title: str) -> int:
    """Draw the trend of every series (up to MAX_PANELS) into ``path``; returns panels drawn."""
    series = list(dict.fromkeys(p.series for p in points))[:MAX_PANELS]
    fig, axes = plt.subplots(len(series), 1, figsize=(8.0, 2.4 * len(series) + 0.6),
                             squeeze=False)
    for ax, name in zip(axes[:, 0], series, strict=True):
        mine = [p for p in points if p.series == name]
        for key in dict.fromkeys(f"{p.hostname} {p.kernel}" for p in mine):
            line = [p for p in mine if f"{p.hostname} {p.kernel}" == key]
            ax.plot([p.started_at for p in line], [p.median for p in line], marker="o",
                    label=key)
        ax.set_title(name, fontsize=8, loc="left")
        ax.set_ylabel(mine[0].unit or "value", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.autofmt_xdate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return len(series)
