"""One side of a comparison: result files gathered from files and directories.

Only finished runs count. A ``complete`` run counts whole; a ``failed`` run
(the suite went to its end but some work failed) counts with its successful
phases, and its failures are judged: a phase that fails on the candidate only
is a regression of its own. A result that is ``running`` (still going, or
killed before it could say so), ``incomplete`` or ``killed`` is listed with its
reason and left out, never averaged in. A file that is not a readable result
of this schema version is bad input: the comparison stops and names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.results import ResultError, RunResult, load


class InputError(Exception):
    """Bad input to an analysis command: names the file and what to do."""


@dataclass(frozen=True)
class Excluded:
    """A result file left out of a side, and why."""

    path: str
    run_id: str
    status: str
    reason: str


@dataclass
class ResultSet:
    """The usable results of one side, and those left out."""

    label: str
    results: list[tuple[Path, RunResult]] = field(default_factory=list)
    excluded: list[Excluded] = field(default_factory=list)


#: Statuses whose phases are compared: finished suites, with or without failed work.
USABLE = ("complete", "failed")

_WHY = {
    "running": "still running, or killed before it could record an end",
    "failed": "failed",
    "incomplete": "interrupted before the suite finished",
    "killed": "killed (its harness process died; a later run found it)",
}


def _is_result_document(path: Path) -> bool:
    """Directories hold other JSON too (schema.json, benchmarks); a result has a run_id."""
    try:
        with path.open() as f:
            head = f.read(4096)
    except OSError:
        return False
    return '"run_id"' in head or '"schema_version"' in head


def expand(paths: Sequence[Path]) -> list[Path]:
    """Result files named by ``paths``: files as given, directories' ``*.json`` (not recursive)."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.glob("*.json") if _is_result_document(f))
            if not found:
                raise InputError(f"{p}: no result files (*.json with a run_id) in this directory")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or directory (fix: give result files or a "
                             "directory of them, e.g. results/)")
    return files


def load_side(label: str, paths: Sequence[Path]) -> ResultSet:
    """Load one side; raises InputError on unreadable input or when nothing usable is left."""
    side = ResultSet(label)
    seen: dict[str, Path] = {}
    for path in expand(paths):
        try:
            result = load(path)
        except ResultError as exc:
            raise InputError(str(exc)) from exc
        except ValueError as exc:  # pydantic: valid JSON, wrong shape
            raise InputError(f"{path}: not a valid result file: {_first_error(exc)}") from exc
        if result.run_id in seen:
            # The same run twice would count its repetitions twice.
            side.excluded.append(
                Excluded(str(path), result.run_id, result.status,
                         f"duplicate of {seen[result.run_id]}")
            )
            continue
        seen[result.run_id] = path
        if result.status not in USABLE:
            reason = _WHY.get(result.status, result.status)
            if result.errors:
                first = result.errors[0]
                # The error often starts with the status itself ("killed: ..."): say it once.
                reason = first if first.startswith(result.status) else f"{reason}: {first}"
            side.excluded.append(Excluded(str(path), result.run_id, result.status, reason))
            continue
        side.results.append((path, result))
    if not side.results:
        listed = "; ".join(f"{e.path} ({e.status})" for e in side.excluded) or "none given"
        raise InputError(f"{label}: no finished result to compare (left out: {listed})")
    return side


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        return f"{where}: {first.get('msg', '')}"
    return str(exc)

