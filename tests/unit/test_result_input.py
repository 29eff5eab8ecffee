"""Result files and guest numbers from outside: non-finite, overflowing, deep or huge input.

Issue 17 items 4, 5, 6: a guest printing 400 nines made a result unreadable; NaN samples
passed `harness compare` with exit 0; a result nested 200,000 deep raised RecursionError.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from harness import metrics
from harness.analysis.resultset import InputError, load_side
from harness.cli import main
from harness.results import PhaseResult, ResultError, json_depth_problem, load, mark_killed
from harness.spec import PhaseSpec
from tests.fuzz.builders import a_result, document, save

PHASE = PhaseSpec.model_validate({
    "name": "touch", "command": "page-touch",
    "metrics": [{"name": "mib_per_s", "regex": r"mib_per_s=([\d.]+)"},
                {"name": "bogo", "regex": r"bogo=(\S+)"}],
})


@pytest.mark.parametrize(
    ("output", "why"),
    [
        ("mib_per_s=" + "9" * 400 + "\nbogo=1", "longer than 64 characters"),
        ("mib_per_s=" + "9" * 40 + ".5\nbogo=1", "beyond the plausible range"),
        ("mib_per_s=1\nbogo=nan", None),
        ("mib_per_s=1\nbogo=-inf", None),
        ("mib_per_s=1\nbogo=1e999", None),
    ],
)
def test_guest_numbers_that_are_no_measurement_are_missing_with_a_reason(
    output: str, why: str | None
) -> None:
    got = metrics.extract_checked(PHASE, output)
    bad = "mib_per_s" if why else "bogo"
    assert bad in got.missing and bad not in got.values
    reason = got.problems[bad]
    assert f"phase 'touch' metric '{bad}'" in reason and "recorded as missing" in reason
    assert (why or "not a finite number") in reason
    # What is recorded round-trips through a result file.
    phase = PhaseResult(index=1, name="touch", status="ok", metrics=got.values,
                        metrics_missing=got.missing, metric_problems=got.problems)
    assert PhaseResult.model_validate_json(phase.model_dump_json()) == phase


def test_an_optional_group_that_did_not_match_is_missing_not_a_crash() -> None:
    spec = PhaseSpec.model_validate({
        "name": "p", "command": "x", "metrics": [{"name": "m", "regex": r"m=(\d+)?"}]})
    got = metrics.extract_checked(spec, "m=")  # float(None) raised TypeError before
    assert got.missing == ["m"] and "is not a number" in got.problems["m"]


def test_the_model_refuses_non_finite_values() -> None:
    with pytest.raises(ValidationError, match="finite"):
        PhaseResult(index=1, name="p", status="ok", metrics={"m": float("inf")})
    with pytest.raises(ValidationError, match="finite"):
        PhaseResult(index=1, name="p", status="ok", duration_s=float("nan"))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_load_names_file_phase_and_metric_of_a_non_finite_value(
    tmp_path: Path, literal: str
) -> None:
    path = save(tmp_path, a_result("r1", [100.0, 101.0]))
    text = path.read_text()
    path.write_text(text.replace('"mib_per_s": 101.0', f'"mib_per_s": {literal}', 1))
    with pytest.raises(ResultError) as err:
        load(path)
    msg = str(err.value)
    assert str(path) in msg and "non-finite" in msg
    assert "phase 'touch'" in msg and "metric 'mib_per_s'" in msg and "repetition 2" in msg


def test_compare_refuses_nan_samples_with_exit_2_naming_them(tmp_path: Path) -> None:
    base = save(tmp_path / "a", a_result("base", [100.0, 101.0, 99.0]))
    cand = save(tmp_path / "b", a_result("cand", [100.0, 101.0, 99.0]))
    data = document(a_result("cand", [1.0, 1.0, 1.0]))
    for run in data["runs"]:
        run["phases"][0]["metrics"]["mib_per_s"] = float("nan")
    cand.write_text(json.dumps(data))  # Python writes NaN, as another tool might
    res = CliRunner().invoke(main, ["compare", str(base), str(cand)])
    assert res.exit_code == 2, res.output
    assert str(cand) in res.output and "metric 'mib_per_s'" in res.output
    assert "Traceback" not in res.output
    with pytest.raises(InputError, match="non-finite"):
        load_side("candidate", [cand])


def test_deep_nesting_is_a_result_error_not_recursion(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text('{"schema_version": 1, "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(ResultError, match=r"deep\.json: not a result file: nested more than 64"):
        load(path)
    assert mark_killed(path, "killed") is False  # the reaper's door: left alone, no crash
    res = CliRunner().invoke(main, ["stacks", str(path)])
    assert res.exit_code == 2 and "nested more than" in res.output


def test_the_depth_scanner_ignores_brackets_in_strings() -> None:
    assert json_depth_problem('{"a": "' + "[" * 500 + '\\" ["}') is None
    assert json_depth_problem("[" * 65 + "]" * 65) is not None
    assert json_depth_problem("[" * 64 + "]" * 64) is None


def test_an_integer_of_5000_digits_is_a_result_error(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_text('{"schema_version": 1, "n": ' + "9" * 5000 + "}")
    with pytest.raises(ResultError, match="not a readable result file"):
        load(path)


def test_a_real_result_still_loads(tmp_path: Path) -> None:
    r = a_result("r1", [1.5, 2.5])
    assert load(save(tmp_path, r)) == r


def test_compare_shows_result_strings_escaped_in_every_format(tmp_path: Path) -> None:
    """Issue 17 item 10: strings from result files never reach a terminal as controls."""
    evil = "touch\x1b]0;owned\x07\x9b2J\u202e"
    base = a_result("base", [100.0, 101.0, 99.0], phase=evil)
    cand = a_result("cand", [100.5, 100.0, 99.5], phase=evil)
    cand.host.kernel_release = evil  # "what changed" shows it in every format
    a, b = save(tmp_path / "a", base), save(tmp_path / "b", cand)
    for fmt in ("table", "md", "json"):
        res = CliRunner().invoke(main, ["compare", str(a), str(b), "--format", fmt])
        assert res.exit_code in (0, 1, 2), res.output
        assert not any(c in res.output for c in "\x1b\x07\x9b\u202e"), (fmt, res.output)
        if fmt == "json":
            text = res.output[res.output.index("{"):]
            assert evil in strings(json.loads(text))  # the data itself is kept
        else:
            assert "\\x1b]0;owned" in res.output and "\\u202e" in res.output, res.output


def strings(value: object) -> set[str]:
    """Every string in a JSON tree."""
    found: set[str] = set()
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            found.add(v)
        elif isinstance(v, dict):
            todo += [*v.keys(), *v.values()]
        elif isinstance(v, list):
            todo += v
    return found
