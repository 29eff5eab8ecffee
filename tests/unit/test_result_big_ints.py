"""A count of more than 64 bits in a result file is refused at load, not a crash later."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.results import ResultError, RunResult, load, non_finite
from tests.fuzz.test_fuzz_results import BASE
from tests.unit.test_compare import save


def test_integers_beyond_64_bits_count_as_infinite() -> None:
    assert non_finite({"a": [1 << 63, -(1 << 63)]}) == []
    assert non_finite({"a": {"b": 1 << 64, "c": -(10 ** 400)}}) == [
        (("a", "b"), float("inf")), (("a", "c"), float("-inf"))]


def test_compare_and_stacks_refuse_a_huge_count_with_exit_2(tmp_path: Path) -> None:
    """Before: compare died with OverflowError turning the count into a float (the fuzz
    suite found it on a path count of a stacked probe)."""
    (good,) = save(tmp_path, RunResult.model_validate(BASE))
    data = json.loads(good.read_text())
    data["runs"][0]["phases"][0]["trace"]["events_by_probe"]["kvm_cpuid"] = 10 ** 400
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ResultError, match=r"events_by_probe\.kvm_cpuid\) is inf"):
        load(bad)
    for args in (["compare", str(good), str(bad)], ["stacks", str(bad)]):
        res = CliRunner().invoke(main, args)
        assert isinstance(res.exception, SystemExit), (args, res.exc_info)
        assert res.exit_code == 2 and "kvm_cpuid) is inf" in res.output, (args, res.output)
