"""Fuzz the result-file doors: load, `harness compare`, `harness stacks`, the reaper.

Result files come from other hosts and other harness versions. Property: a loaded
RunResult with only finite numbers, or ResultError / pydantic's ValidationError (the
documented types); the CLI exits 0, 1 (compare: a regression) or 2 (bad input) without
a traceback and prints no terminal control sequence; the reaper's ``mark_killed``
answers True or False.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from harness.analysis.resultset import InputError, load_side
from harness.cli import main
from harness.results import ResultError, RunResult, load, mark_killed, non_finite
from tests.fuzz.builders import a_result, document, save, stack_trace
from tests.fuzz.strategies import NASTY_TEXT, NUMBERS, deep_json, dumps, json_values, tally
from tests.fuzz.test_fuzz_spec import paths

pytestmark = pytest.mark.timeout(180)

_TRACE = stack_trace({("entry", "kvm_mmu_load", "get_page"): 3, ("entry", "reset"): 1})
BASE = document(a_result("base", [100.0, 101.0, 99.0], trace=_TRACE,
                         params=[{"k": 2}, {"k": 2}, {"k": 3}]))
CONTROLS = ("\x1b", "\x07", "\x9b", "\x00")


def mutate(doc: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(paths(doc)))
        parent: Any = doc
        for k in where[:-1]:
            parent = parent[k]
        op = data.draw(st.sampled_from(["like", "like", "like", "replace", "delete"]))
        old = parent[where[-1]]
        if op == "like" and isinstance(old, str):  # keeps the shape: reaches deeper code
            parent[where[-1]] = data.draw(NASTY_TEXT)
        elif op == "like" and isinstance(old, int | float) and not isinstance(old, bool):
            parent[where[-1]] = data.draw(NUMBERS)
        elif op in ("like", "replace"):
            parent[where[-1]] = data.draw(json_values())
        elif isinstance(parent, dict):
            del parent[where[-1]]
    return doc


@contextmanager
def files(text: str) -> Iterator[tuple[Path, Path]]:
    """(a good base result, ``text`` as the candidate result) in a scratch directory."""
    with tempfile.TemporaryDirectory(prefix="fuzz-results-") as d:
        root = Path(d)
        good = save(root / "a", RunResult.model_validate(BASE))
        bad = root / "b" / "cand.json"
        bad.parent.mkdir()
        bad.write_text(text)
        yield good, bad


def check_load(path: Path) -> RunResult | None:
    try:
        result = load(path)
    except ResultError as exc:
        assert str(path) in str(exc)
        tally("ResultError")
        return None
    except ValidationError:
        tally("ValidationError")
        return None
    assert not non_finite(result.model_dump(mode="python"))
    tally("loaded")
    return result


def check_cli(args: list[str], codes: tuple[int, ...]) -> str:
    res = CliRunner().invoke(main, args)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exc_info
    assert res.exit_code in codes, res.output
    assert not any(c in res.output for c in CONTROLS), repr(res.output[:400])
    return res.output


def all_doors(text: str) -> None:
    with files(text) as (good, bad):
        loaded = check_load(bad)
        try:
            load_side("candidate", [bad])
        except InputError as exc:
            assert loaded is None or loaded.status != "complete" or "no complete" in str(exc)
        check_cli(["stacks", str(bad)], (0, 2))
        check_cli(["stacks", str(bad), "--folded"], (0, 2))
        before = bad.read_bytes()
        changed = mark_killed(bad, "fuzz: killed")
        assert changed is (loaded is not None and loaded.status == "running")
        if not changed:
            assert bad.read_bytes() == before  # an unreadable file is left exactly as it was
        check_cli(["compare", str(good), str(bad)], (0, 1, 2))


def test_the_unmutated_result_passes_every_door() -> None:
    all_doors(dumps(BASE))


@settings(max_examples=100)
@given(st.data())
def test_mutated_result_files(data: st.DataObject) -> None:
    doc = mutate(BASE, data)
    doc["status"] = data.draw(st.sampled_from(["complete", "running", doc.get("status")]))
    all_doors(dumps(doc))


@pytest.mark.parametrize("text", [
    deep_json(200_000),  # RecursionError before the fix
    '{"schema_version": 1, "x": ' + deep_json(100) + "}",
    dumps({**BASE, "runs": [{**BASE["runs"][0], "phases": [
        {**BASE["runs"][0]["phases"][0], "metrics": {"mib_per_s": float("nan")}}]}]}),
    dumps(BASE).replace('"mib_per_s": 101.0', '"mib_per_s": 1e999'),
    dumps(BASE).replace('"mib_per_s": 101.0', '"mib_per_s": ' + "9" * 5000),
    dumps(BASE).replace('"kvm_mmu_load"', '"\\u001b]0;x\\u0007kvm_mmu_load"'),
    "\ufeff" + dumps(BASE),
    "",
])
def test_known_hostile_result_files(text: str) -> None:
    all_doors(text)


@settings(max_examples=40)
@given(st.one_of(st.text(max_size=200), json_values().map(dumps)))
def test_any_text_as_a_result_file(text: str) -> None:
    all_doors(text)
