"""Fuzz the tracer's and KVM's replies: bpftrace JSON lines and KVM stats (debugfs, QMP).

Both backends print bpftrace's JSON lines, QEMU answers query-stats, debugfs files hold
numbers; a wrong line must never take a run down with an unexpected exception.
Property: parse results of the documented shape, or TraceParseError / ValueError.
"""

from __future__ import annotations

import io
from contextlib import suppress
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from harness.trace import kvmstats
from harness.trace.parse import (
    HistOutput,
    MapOutput,
    StackMapOutput,
    TraceParseError,
    parse_line,
    snapshot_from_lines,
)
from tests.fuzz.strategies import NASTY_TEXT, NUMBERS, deep_json, dumps, json_values, tally

pytestmark = pytest.mark.timeout(120)

KEYS = st.one_of(
    st.lists(st.integers(-5, 2**64), min_size=1, max_size=6).map(
        lambda xs: ",".join(map(str, xs))),
    st.builds(lambda k, f: f"{k},\n" + "".join(f"    {x}\n" for x in f),
              st.sampled_from(["1,2,0,3", "1", ""]), st.lists(NASTY_TEXT, max_size=4)),
    NASTY_TEXT,
)
BUCKET = st.fixed_dictionaries({"max": NUMBERS, "count": NUMBERS},
                               optional={"min": NUMBERS})
MAP_BODY = st.one_of(
    NUMBERS,
    st.dictionaries(KEYS, st.one_of(NUMBERS, st.lists(BUCKET, max_size=3)), max_size=5),
    st.lists(BUCKET, max_size=3),
    json_values(),
)
NAMES = st.sampled_from(["@evt", "@stk", "@ev", "@lat", "evt", "@", "@x"])
MESSAGE = st.one_of(
    st.fixed_dictionaries({
        "type": st.sampled_from(["map", "hist", "attached_probes", "lost_events", "printf"]),
        "data": st.one_of(st.dictionaries(NAMES, MAP_BODY, max_size=2),
                          st.fixed_dictionaries({"probes": NUMBERS}),
                          st.fixed_dictionaries({"events": NUMBERS}), json_values()),
    }),
    json_values(),
)
LINE = st.one_of(MESSAGE.map(dumps), st.text(max_size=80))


@settings(max_examples=300)
@given(LINE)
@example('{"type": "map", "data": {"@evt": {"1,2,3": 5}}}')  # a key of the wrong arity
@example('{"type": "map", "data": {"@evt": {"1,2,3,4,' + "9" * 5000 + '": 1}}}')
@example(deep_json(100_000))  # RecursionError in the JSON decoder
@example('{"type": "hist", "data": {"@lat": [{"max": 1, "count": 1e999}]}}')
def test_one_tracer_line(line: str) -> None:
    try:
        out = parse_line(line)
    except TraceParseError:
        tally("TraceParseError")
        return
    tally(type(out).__name__)
    if isinstance(out, MapOutput | StackMapOutput):
        assert all(isinstance(v, int) for v in out.values.values())
    if isinstance(out, HistOutput):
        assert all(isinstance(b.count, int) for bs in out.values.values() for b in bs)
    try:  # and as part of a dump, where the event views are derived
        snapshot_from_lines([line])
    except TraceParseError:
        tally("snapshot: TraceParseError")


@settings(max_examples=100)
@given(st.lists(LINE, max_size=8))
def test_a_whole_dump(lines: list[str]) -> None:
    with suppress(TraceParseError):
        snapshot_from_lines(lines)


QMP_STAT = st.fixed_dictionaries({"name": NASTY_TEXT, "value": st.one_of(NUMBERS, json_values())})
QMP_ENTRY = st.one_of(
    st.fixed_dictionaries({"provider": st.sampled_from(["kvm", "other"]),
                           "stats": st.one_of(st.lists(QMP_STAT, max_size=4), json_values())}),
    json_values(),
)
QMP_REPLY = st.one_of(
    st.fixed_dictionaries({"return": st.one_of(st.lists(QMP_ENTRY, max_size=3), json_values())}),
    json_values(),
)


@settings(max_examples=300)
@given(st.lists(QMP_REPLY, min_size=1, max_size=2))
@example([{"return": [{"provider": "kvm", "stats": [{"value": 1}]}]}])  # KeyError before
@example([{"return": ["not an entry"]}])  # AttributeError before
@example([{"return": [{"provider": "kvm", "stats": [7]}]}])
@example([{"return": [{"provider": "kvm", "stats": 7}]}])
def test_qmp_query_stats_replies(replies: list[Any]) -> None:
    try:
        got = kvmstats.parse_query_stats(*replies)
    except ValueError as exc:
        assert "query-stats" in str(exc)
        tally("ValueError")
        return
    tally("parsed")
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in got.items())


@settings(max_examples=200)
@given(st.one_of(st.text(max_size=40), NUMBERS.map(str),
                 st.integers(0, 6000).map(lambda n: "9" * n)))
@example("9" * 5000)
def test_a_debugfs_stat_file(text: str) -> None:
    value = kvmstats.parse_stat_value(text)
    assert value is None or isinstance(value, int)


class StreamDouble(io.StringIO):
    """A QMP text stream double: what QEMU says, and what the harness wrote (ignored)."""

    def __init__(self, replies: str) -> None:
        super().__init__(replies)
        self.sent: list[str] = []

    def write(self, text: str) -> int:
        self.sent.append(text)
        return len(text)


QMP_LINE = st.one_of(
    QMP_REPLY.map(dumps),
    st.fixed_dictionaries({"event": NASTY_TEXT}).map(dumps),
    st.fixed_dictionaries({"error": json_values()}).map(dumps),
    st.text(max_size=40),
)


@settings(max_examples=200)
@given(st.lists(QMP_LINE, max_size=6))
@example(['{"return": {}}', deep_json(100_000)])  # RecursionError before
@example(['{"return": {}}', '{"error": "no desc"}'])  # AttributeError before
@example(['{"return": {}}', "5"])  # TypeError before
def test_a_qmp_conversation(lines: list[str]) -> None:
    stream = StreamDouble("".join(line.replace("\n", " ") + "\n" for line in lines))
    try:
        got = kvmstats.qmp_query_stats(stream)
    except (kvmstats.QmpError, ValueError):
        tally("refused")
        return
    tally("parsed")
    assert all(isinstance(v, int) for v in got.values())


def test_a_monitor_that_only_sends_events_is_given_up_on() -> None:
    """QEMU's events are skipped while waiting for a reply, but not without end."""
    stream = StreamDouble('{"event": "RESUME"}\n' * (kvmstats.MAX_QMP_MESSAGES + 5))
    with pytest.raises(kvmstats.QmpError, match="no reply among 1000 messages"):
        kvmstats.qmp_query_stats(stream)
