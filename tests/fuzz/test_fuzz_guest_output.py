"""Fuzz what a guest prints: the bounded reader every transport uses, and metric extraction.

Property: memory held stays within the reader's caps whatever arrives, and every metric
of every catalogue workload is either a finite, plausible number or missing with a
reason naming the phase and metric; the phase record always survives a result file's
round trip (no NaN, no infinity, no null).
"""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from harness import metrics
from harness.guest.output import BoundedOutput
from harness.paths import WORKLOADS_DIR
from harness.results import PhaseResult
from harness.spec import PhaseSpec, load_workload
from tests.fuzz.strategies import NASTY_TEXT, tally

pytestmark = pytest.mark.timeout(120)

#: Every phase of the catalogue that extracts metrics (the regexes real runs use).
PHASES: list[PhaseSpec] = [
    ph
    for path in sorted(WORKLOADS_DIR.glob("*.toml"))
    for ph in load_workload(path).phases
    if ph.metrics
]
#: Every metric name and its neighbourhood: what a regex keys on, then a hostile number.
LABELS = sorted({lab for ph in PHASES for m in ph.metrics
                 for lab in (f"{m.name}=", f"{m.name}: ", m.name, "bogo ops/s", "MiB/s")})
NUMBER_TEXT = st.one_of(
    st.from_regex(r"-?[0-9]{0,30}(\.[0-9]{0,30})?([eE][+-]?[0-9]{1,4})?", fullmatch=True),
    st.integers(min_value=0, max_value=2000).map(lambda n: "9" * n),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "١٢٣", "0x10", "1_000", "", "."]),
)
OUTPUT = st.lists(
    st.one_of(
        st.builds(lambda label, number: f"{label}{number}", st.sampled_from(LABELS), NUMBER_TEXT),
        NASTY_TEXT,
        st.sampled_from(["\n", "\r\n", " ", "\t", "\x00"]),
    ),
    max_size=30,
).map("".join)


def test_the_catalogue_has_metric_phases() -> None:
    assert len(PHASES) >= 5


def line_for(regex: str, data: st.DataObject) -> str:
    """A line the metric's regex matches, with a hostile number spliced into its group."""
    line = data.draw(st.from_regex(regex, fullmatch=True).filter(lambda t: "\n" not in t))
    m = re.search(regex, line, re.MULTILINE)
    if m is None or m.start(1) < 0:
        return line
    return line[: m.start(1)] + data.draw(NUMBER_TEXT) + line[m.end(1):]


@settings(max_examples=200)
@given(st.sampled_from(PHASES), st.data())
def test_metrics_from_any_output(phase: PhaseSpec, data: st.DataObject) -> None:
    lines = [line_for(m.regex, data) for m in phase.metrics
             if data.draw(st.booleans())]
    output = "\n".join([data.draw(OUTPUT), *lines, data.draw(OUTPUT)])
    check_metrics(phase, output)


@pytest.mark.parametrize("output", [
    "".join(f"{m.name}=" + "9" * 400 + "\n" for m in PHASES[0].metrics),
    "^page-touch pass=1 x mib_per_s=" + "9" * 400,
    "page-touch pass=1 x mib_per_s=" + "9" * 400 + "\npage-touch pass=2 x minflt=1e999",
])
def test_known_hostile_outputs(output: str) -> None:
    for phase in PHASES:
        check_metrics(phase, output)


def check_metrics(phase: PhaseSpec, output: str) -> None:
    got = metrics.extract_checked(phase, output)
    names = [m.name for m in phase.metrics]
    assert sorted([*got.values, *got.problems]) == sorted(names)
    assert not set(got.values) & set(got.problems)
    for name, value in got.values.items():
        assert math.isfinite(value) and abs(value) <= metrics.MAX_ABS_METRIC, (name, value)
    for name, why in got.problems.items():
        assert f"phase {phase.name!r} metric {name!r}" in why
    tally(f"{len(got.values)} of {len(names)} found")
    record = PhaseResult(index=1, name=phase.name, status="ok", metrics=got.values,
                         metrics_missing=got.missing, metric_problems=got.problems)
    assert PhaseResult.model_validate_json(record.model_dump_json()) == record


@settings(max_examples=200)
@given(
    st.integers(0, 64), st.integers(0, 64),
    st.lists(st.one_of(st.binary(max_size=300), st.just(b"\xff" * 200)), max_size=40),
)
@example(4, 4, [b"\xe2\x82", b"\xac" * 3, b"x" * 1000])  # a UTF-8 character cut by the cap
def test_the_bounded_reader_holds_its_caps(head: int, tail: int, chunks: list[bytes]) -> None:
    out = BoundedOutput(head_cap=head, tail_cap=tail)
    biggest = 0
    for chunk in chunks:
        out.feed(chunk)
        biggest = max(biggest, len(chunk))
        # At most head + twice the tail, plus the one chunk being taken in.
        assert out.kept <= head + 2 * tail + biggest
    total = sum(map(len, chunks))
    assert out.total == total and out.kept + out.dropped == total
    text = out.text()
    assert isinstance(text, str)
    if out.dropped:
        assert f"{out.dropped} bytes of output dropped" in text
        assert out.note("stdout") is not None
    else:
        assert text == b"".join(chunks).decode(errors="replace")
