"""Parsing bpftrace 0.17 ``-f json`` output (samples captured on the development host)."""

from __future__ import annotations

import pytest

from harness.trace.parse import (
    Attached,
    HistBucket,
    HistOutput,
    LostEvents,
    MapOutput,
    OtherOutput,
    TraceParseError,
    parse_key,
    parse_line,
    select_pid,
    snapshot_from_lines,
)

# Captured from a real run: the micro guest (pid 6999, token 4242, 3 phases) under
# the generated program with the "all" probe set, bpftrace 0.17, PVM host.
# Lines 1-9 are the final output printed on SIGINT (abridged to these maps).
REAL_RUN = """\
{"type": "attached_probes", "data": {"probes": 20}}
{"type": "printf", "data": "harness-tracer-ready 2902\\n"}


{"type": "map", "data": {"@dump_done": 4}}
{"type": "map", "data": {"@ev": {"6999,3,1,3": 1, "6999,2,1,3": 1, "6999,1,1,3": 1, \
"6999,0,1,5": 7, "6999,0,1,14": 11, "6999,0,1,8": 20, "6999,0,1,9": 40, "6999,0,1,3": 393, \
"6999,0,1,4": 1240, "6999,1,1,6": 393760, "6999,2,1,6": 787488, "6999,3,1,6": 787503, \
"6999,0,1,6": 6458186}}}
{"type": "map", "data": {"@gdur": {"6999,1": 545920512, "6999,2": 1090468864, \
"6999,3": 1238438049}}}
{"type": "map", "data": {"@gphase": {"6999": 0}}}
{"type": "map", "data": {"@markers": {"6999,0": 1, "6999,1": 1, "6999,3": 1, "6999,2": 1}}}
{"type": "map", "data": {"@total": {"6999,5": 7, "6999,14": 11, "6999,8": 20, "6999,9": 40, \
"6999,3": 396, "6999,4": 1240, "6999,6": 8426937}}}
{"type": "map", "data": {"@vcpu": {"6999,7001,0,1": 8, "6999,7002,1,1": 393761, \
"6999,7002,2,1": 787489, "6999,7002,3,1": 787504, "6999,7002,0,1": 6459889}}}
"""

# Captured: `BEGIN { @h[1] = hist(0); @h[1] = hist(-5); @h[1] = hist(1);
# @h[2] = hist(1000000); @s = sum(5); exit(); }` and an unkeyed hist of 12345.
REAL_HIST = (
    '{"type": "hist", "data": {"@h": {"2": [{"min": 524288, "max": 1048575, "count": 1}], '
    '"1": [{"max": -1, "count": 1}, {"min": 0, "max": 0, "count": 1}, '
    '{"min": 1, "max": 1, "count": 1}]}}}'
)
REAL_UNKEYED_HIST = (
    '{"type": "hist", "data": {"@l": [{"min": 8192, "max": 16383, "count": 4}]}}'
)


def test_real_run_parses_to_int_tuple_keys() -> None:
    snap = snapshot_from_lines(REAL_RUN.splitlines())
    ev = snap.counter("ev")
    assert ev[(6999, 2, 1, 6)] == 787488
    assert snap.counter("dump_done") == {(): 4}
    assert snap.counter("gphase") == {(6999,): 0}
    assert snap.counter("missing") == {}
    # The exit output is self-consistent: per-phase events add up to the totals.
    per_probe: dict[int, int] = {}
    for (_pid, _g, _h, probe), n in ev.items():
        per_probe[probe] = per_probe.get(probe, 0) + n
    assert per_probe == {k[1]: v for k, v in snap.counter("total").items()}
    assert select_pid(snap.counter("markers"), 6999) == {(0,): 1, (1,): 1, (2,): 1, (3,): 1}
    assert select_pid(snap.counter("markers"), 1) == {}


def test_message_types() -> None:
    lines = REAL_RUN.splitlines()
    assert parse_line(lines[0]) == Attached(20)
    assert parse_line(lines[1]) == OtherOutput("printf", "harness-tracer-ready 2902\n")
    assert parse_line(lines[2]) is None
    assert parse_line('{"type": "lost_events", "data": {"events": 12}}') == LostEvents(12)
    out = parse_line(lines[4])
    assert isinstance(out, MapOutput) and out.name == "dump_done" and out.values == {(): 4}


def test_histograms_with_negative_and_zero_buckets() -> None:
    out = parse_line(REAL_HIST)
    assert isinstance(out, HistOutput) and out.name == "h"
    assert out.values[(1,)] == (
        HistBucket(None, -1, 1),
        HistBucket(0, 0, 1),
        HistBucket(1, 1, 1),
    )
    assert out.values[(2,)] == (HistBucket(524288, 1048575, 1),)
    unkeyed = parse_line(REAL_UNKEYED_HIST)
    assert isinstance(unkeyed, HistOutput)
    assert unkeyed.values == {(): (HistBucket(8192, 16383, 4),)}
    snap = snapshot_from_lines([REAL_HIST])
    assert snap.hist("h")[(2,)][0].count == 1


def test_later_prints_replace_earlier_ones() -> None:
    snap = snapshot_from_lines([
        '{"type": "map", "data": {"@x": {"1": 1}}}',
        '{"type": "map", "data": {"@x": {"1": 5, "2": 1}}}',
        '{"type": "lost_events", "data": {"events": 3}}',
    ])
    assert snap.counter("x") == {(1,): 5, (2,): 1}
    assert snap.lost_events == 3


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("not json", "not JSON"),
        ('{"data": 1}', "without a 'type'"),
        ('{"type": "map", "data": {"@m": {"a,b": 1}}}', "@m: key 'a,b'"),
        ('{"type": "map", "data": {"@m": {"1": "x"}}}', "expected an integer"),
        ('{"type": "map", "data": {"m": 1}}', "does not start with '@'"),
        ('{"type": "hist", "data": {"@h": {"1": [{"min": 1}]}}}', "bad histogram bucket"),
        ('{"type": "attached_probes"}', "attached_probes without data"),
    ],
)
def test_bad_lines_name_the_problem(line: str, needle: str) -> None:
    with pytest.raises(TraceParseError, match=needle):
        parse_line(line)


def test_parse_key() -> None:
    assert parse_key("7") == (7,)
    assert parse_key("1,-2,3") == (1, -2, 3)
