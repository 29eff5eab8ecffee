"""The ``report`` and ``history`` commands (registered on ``harness`` by harness.cli).

Kept apart from harness/cli.py so that these commands' options live with
the code they drive; they follow its conventions: bad input is a message
naming the file or option and a fix, exit status 2.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

import click


class BadInput(click.ClickException):
    """Input the command cannot use: exit status 2, like `harness compare`."""

    exit_code = 2


def _compare_threshold(ctx: click.Context, param: click.Parameter, value: str) -> float:
    # The very parser of `harness compare --threshold`, so both accept the same spellings.
    from harness.cli import _threshold

    return _threshold(ctx, param, value)


@click.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--compare", "base", multiple=True, type=click.Path(path_type=Path),
              help="Base result file or directory (repeatable): the RESULTS are the candidate; "
              "the comparison is `harness compare`'s.")
@click.option("--html", "html_path", required=True, type=click.Path(path_type=Path),
              help="Write the self-contained HTML page here.")
@click.option("--png", "png_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Also write every plot as a PNG file into this directory.")
@click.option("--threshold", default="5%", show_default=True, callback=lambda c, p, v:
              _compare_threshold(c, p, v),
              help="Smallest change that counts, as in `harness compare --threshold`.")
def report(results: tuple[Path, ...], base: tuple[Path, ...], html_path: Path,
           png_dir: Path | None, threshold: float) -> None:
    """One HTML page of RESULT files (or directories): traces per phase, metrics, call paths.

    Failed or killed runs are shown with their status at the top. Exit status 0
    when the page is written, 2 on unreadable input.
    """
    from harness.analysis.resultset import InputError
    from harness.report import make

    try:
        n, headline = make(list(results), html_path, base_paths=list(base), png_dir=png_dir,
                           threshold=threshold)
    except InputError as exc:
        raise BadInput(str(exc)) from None
    extra = f"; comparison: {headline}" if headline else ""
    click.echo(f"report: {html_path} ({n} plots{f', PNGs in {png_dir}' if png_dir else ''})"
               f"{extra}", err=True)


DB_OPTION = click.option(
    "--db",
    metavar="URL",
    help="Database URL: sqlite:///PATH or postgresql://USER@HOST:PORT/DB (default: "
    "$HARNESS_HISTORY_DB, else results/history.sqlite).",
)


def _engine(db: str | None) -> object:
    from harness.history.store import HistoryError, connect, default_url
    from harness.paths import RESULTS_DIR

    try:
        return connect(db or default_url(RESULTS_DIR))
    except HistoryError as exc:
        raise BadInput(str(exc)) from None


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date (fix: e.g. 2026-11-01 or "
                                 "2026-11-01T06:00)", param_hint="--since") from None


@click.group()
def history() -> None:
    """An index over many result files (SQLite beside the results, or PostgreSQL).

    The JSON files stay the source of truth: the index can be rebuilt from them,
    and indexing a file twice adds nothing.
    """


@history.command("index")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@DB_OPTION
def history_index(paths: tuple[Path, ...], db: str | None) -> None:
    """Index result files and directories of them (*.json); exit 2 if any was unreadable."""
    from harness.history.store import HistoryError, index

    engine = _engine(db)
    try:
        out = index(engine, list(paths))  # type: ignore[arg-type]
    except HistoryError as exc:
        raise BadInput(str(exc)) from None
    for p in out.problems:
        click.echo(f"harness history index: skipped {p}", err=True)
    click.echo(f"indexed {len(out.added)} new result file(s), {out.already} already indexed"
               + (f", {len(out.problems)} unreadable" if out.problems else ""))
    if out.problems:
        sys.exit(BadInput.exit_code)


@history.command("show")
@click.argument("suite")
@click.option("--metric", help="A figure (metric.NAME, exits.REASON, ...) or a workload "
              "metric's name; default: every workload metric.")
@click.option("--since", help="Only runs started on or after this date (ISO 8601).")
@click.option("--host", help="Only runs on this host name.")
@click.option("--png", "png_path", type=click.Path(path_type=Path),
              help="Also draw the trend per host kernel into this PNG file.")
@DB_OPTION
def history_show(suite: str, metric: str | None, since: str | None, host: str | None,
                 png_path: Path | None, db: str | None) -> None:
    """A figure's trend across complete runs of SUITE: per run, the median of repetitions."""
    from rich.console import Console
    from rich.table import Table

    from harness.history.store import trend

    points = trend(_engine(db), suite, metric=metric, since=_since(since),  # type: ignore[arg-type]
                   host=host)
    if not points:
        click.echo(f"harness history show: no complete run of suite {suite!r} has "
                   f"{metric or 'workload metrics'} in the index (fix: `harness history index "
                   "RESULT_DIR`, or check the suite and --metric names)", err=True)
        sys.exit(1)
    t = Table(title=f"{suite}: {metric or 'workload metrics'}", title_justify="left")
    for h in ("series", "started", "run", "host", "kernel", "median", "n", "unit"):
        t.add_column(h, overflow="fold")
    for p in points:
        t.add_row(p.series, p.started_at.isoformat(timespec="minutes"), p.run_id, p.hostname,
                  p.kernel, f"{p.median:.6g}", str(p.n), p.unit)
    Console(width=None if sys.stdout.isatty() else 200).print(t)
    if png_path is not None:
        from harness.history.plot import trend_png

        n = trend_png(points, png_path, f"{suite}: {metric or 'workload metrics'}")
        click.echo(f"trend: {png_path} ({n} panel(s))", err=True)


@history.command("baseline")
@click.argument("suite")
@click.option("--host-class", "host_cls", help="Only runs of this host class "
              "('VENDOR MODEL / MMU-MODE', as `history baseline --json` prints it).")
@click.option("--host-class-of", "like", type=click.Path(path_type=Path, dir_okay=False),
              help="Only runs of the host class of this result file (e.g. the run just made).")
@click.option("--shard", help="Only runs made with this --shard K/N.")
@click.option("--exclude", multiple=True, metavar="RUN_ID",
              help="Never this run (e.g. the one just made); repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's record as JSON.")
@DB_OPTION
def history_baseline(suite: str, host_cls: str | None, like: Path | None, shard: str | None,
                     exclude: tuple[str, ...], as_json: bool, db: str | None) -> None:
    """The last complete run of SUITE: the file to compare against (exit 1: none yet).

    Runs of another host class are never a baseline when --host-class or
    --host-class-of is given (compare's fairness check would refuse them anyway).
    """
    import json
    from dataclasses import asdict

    from harness.history.store import baseline, host_class
    from harness.results import ResultError, load

    if like is not None:
        try:
            host_cls = host_class(load(like))
        except (ResultError, ValueError) as exc:
            raise BadInput(f"--host-class-of: {str(exc).splitlines()[0]}") from None

    found = baseline(_engine(db), suite, host_cls=host_cls, shard=shard,  # type: ignore[arg-type]
                     exclude=exclude)
    if found is None:
        click.echo(f"harness history baseline: no complete run of suite {suite!r}"
                   + (f" on host class {host_cls!r}" if host_cls else "")
                   + " in the index", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(asdict(found), default=str, indent=2))
    else:
        click.echo(found.path)
