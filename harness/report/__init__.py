"""`harness report`: result files (and a comparison) as one self-contained HTML page.

:func:`make` loads the files, runs the comparison through harness.analysis
when a base is given, and writes the page (and its plots as PNG files).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from harness.analysis.resultset import InputError, expand, load_side
from harness.results import ResultError, RunResult, load


def load_all(paths: Sequence[Path]) -> list[tuple[Path, RunResult]]:
    """Every result file named (files, or directories of them), whatever its status.

    A failed or killed run is shown, with its status at the top; a file that is
    not a result this harness can read is an InputError naming it.
    """
    out = []
    for path in expand(paths):
        try:
            out.append((path, load(path)))
        except ResultError as exc:
            raise InputError(str(exc)) from exc
        except ValueError as exc:  # valid JSON, not the result schema
            raise InputError(f"{path}: not a valid result file ({exc.__class__.__name__}: "
                             f"{str(exc).splitlines()[0]}) (fix: give result files written "
                             "by `harness run`)") from exc
    return out


def make(
    result_paths: Sequence[Path],
    html_path: Path,
    *,
    base_paths: Sequence[Path] = (),
    png_dir: Path | None = None,
    threshold: float = 0.05,
) -> tuple[int, str | None]:
    """Write the report; returns (number of plots, the comparison's headline or None).

    With ``base_paths`` the results are the candidate side of
    :func:`harness.analysis.compare.compare`; a comparison that cannot be made
    (no complete run on a side) is said on the page, the rest still rendered.
    """
    from harness.analysis import compare, render
    from harness.report import html

    results = load_all(result_paths)
    comparison = None
    error = None
    base: list[RunResult] | None = None
    if base_paths:
        base_side = load_side("base", base_paths)  # unreadable base files: bad input
        base = [r for _, r in base_side.results]
        try:
            candidate = load_side("candidate", result_paths)
        except InputError as exc:
            error = str(exc)
        else:
            comparison = compare.compare(base_side, candidate, threshold=threshold)
    page = html.build(results, comparison, error, base)
    html.write(page, html_path, png_dir)
    headline = render.headline(comparison) if comparison is not None else error
    return len(page.plots), headline
