"""Parse bpftrace 0.17 ``-f json`` output into typed maps keyed by tuples of ints.

bpftrace prints one JSON object per line::

    {"type": "attached_probes", "data": {"probes": 5}}
    {"type": "map", "data": {"@ev": {"123,1,0,3": 7}}}     # keyed map
    {"type": "map", "data": {"@dump_done": 2}}              # scalar map, key ()
    {"type": "hist", "data": {"@lat": {"123,1,0,0": [{"min": 0, "max": 0, "count": 1}]}}}
    {"type": "lost_events", "data": {"events": 10}}

Histogram buckets of negative values have no "min". An empty map prints
nothing at all, so a map missing from a dump is empty.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

Key = tuple[int, ...]
CounterMap = dict[Key, int]
#: (integer key, kernel frames innermost first as bpftrace prints them) -> count
StackMap = dict[tuple[Key, tuple[str, ...]], int]
#: Maps whose last key element is a ``kstack`` (see program.py): sampled stacks, and for
#: rate targets the sums of their weights and squared weights.
STACK_MAPS = frozenset({"stk", "stkw", "stkw2"})


@dataclass(frozen=True)
class HistBucket:
    """One log2 bucket: values in ``[low, high]`` (inclusive); ``low`` None = -inf."""

    low: int | None
    high: int
    count: int


HistMap = dict[Key, tuple[HistBucket, ...]]


class TraceParseError(ValueError):
    """A bpftrace output line that does not have the expected shape."""


@dataclass(frozen=True)
class Attached:
    """bpftrace attached all probes (``attached_probes``)."""

    probes: int


@dataclass(frozen=True)
class MapOutput:
    """A printed counter/sum/value map (name without the ``@``)."""

    name: str
    values: CounterMap


@dataclass(frozen=True)
class HistOutput:
    """A printed histogram map (name without the ``@``)."""

    name: str
    values: HistMap


@dataclass(frozen=True)
class LostEvents:
    """bpftrace reported lost perf events (printf/print messages, not map updates)."""

    count: int


@dataclass(frozen=True)
class OtherOutput:
    """Any other message type (printf, time, ...), kept as raw JSON."""

    type: str
    data: object


@dataclass(frozen=True)
class StackMapOutput:
    """A printed counter map whose key ends with a kernel stack (name without the ``@``)."""

    name: str
    values: StackMap


Output = Attached | MapOutput | HistOutput | StackMapOutput | LostEvents | OtherOutput


#: Innermost frames that belong to the tracer, not to the traced path: the
#: tracepoint's iterator (bpftrace) and the BPF program and its raw-tracepoint
#: or trampoline caller (libbpf). Dropped so both backends give the same paths.
TRACER_FRAME_PREFIXES: Final = (
    "__traceiter_", "bpf_prog_", "bpf_trace_run", "__bpf_trace_", "bpf_trampoline_",
)


def strip_tracer_frames(frames: tuple[str, ...], depth: int | None = None) -> tuple[str, ...]:
    """``frames`` (innermost first) without the tracer's own leading frames, cut to ``depth``."""
    i = 0
    while i < len(frames) and frames[i].startswith(TRACER_FRAME_PREFIXES):
        i += 1
    out = frames[i:]
    return out if depth is None else out[:depth]


def parse_stack_key(text: str, map_name: str = "?") -> tuple[Key, tuple[str, ...]]:
    """``"1,2,\\n    f+1\\n    g+2\\n"`` -> ``((1, 2), ("f+1", "g+2"))``: ints, then frames.

    bpftrace prints a kstack key element as newline-separated, indented frames
    (innermost first); an empty stack prints nothing after the last comma. The
    tracer's own innermost frames are dropped (:func:`strip_tracer_frames`).
    """
    head, _, frames = text.partition("\n")
    ints = head.rstrip().rstrip(",")
    key = parse_key(ints, map_name) if ints else ()
    return key, strip_tracer_frames(tuple(f.strip() for f in frames.splitlines() if f.strip()))


def parse_key(text: str, map_name: str = "?") -> Key:
    """``"1,2,3"`` -> ``(1, 2, 3)``; raises TraceParseError for non-integer parts."""
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise TraceParseError(
            f"map @{map_name}: key {text!r} is not a comma-separated list of integers; "
            "the harness only generates integer-keyed maps"
        ) from None


def _int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TraceParseError(f"{where}: expected an integer, got {value!r}")
    return value


def _single_map(data: object, kind: str) -> tuple[str, object]:
    if not isinstance(data, dict) or len(data) != 1:
        raise TraceParseError(f"{kind} message: data must hold exactly one map, got {data!r}")
    ((name, body),) = data.items()
    if not isinstance(name, str) or not name.startswith("@"):
        raise TraceParseError(f"{kind} message: map name {name!r} does not start with '@'")
    return name[1:], body


def _buckets(raw: object, where: str) -> tuple[HistBucket, ...]:
    if not isinstance(raw, list):
        raise TraceParseError(f"{where}: histogram must be a list of buckets, got {raw!r}")
    out: list[HistBucket] = []
    for b in raw:
        if not isinstance(b, dict) or "max" not in b or "count" not in b:
            raise TraceParseError(f"{where}: bad histogram bucket {b!r}")
        low = None if "min" not in b else _int(b["min"], where)
        out.append(HistBucket(low, _int(b["max"], where), _int(b["count"], where)))
    return tuple(out)


def parse_line(line: str) -> Output | None:
    """Parse one stdout line; None for blank lines (bpftrace prints some)."""
    line = line.strip()
    if not line:
        return None
    try:
        msg = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceParseError(f"not JSON ({e}): {line[:200]!r}") from None
    except RecursionError:  # the decoder recurses per level; no tracer line nests deeply
        raise TraceParseError(f"JSON nested too deep: {line[:200]!r}") from None
    if not isinstance(msg, dict) or "type" not in msg:
        raise TraceParseError(f"JSON without a 'type': {line[:200]!r}")
    kind, data = msg["type"], msg.get("data")
    if kind == "attached_probes":
        if not isinstance(data, dict):
            raise TraceParseError(f"attached_probes without data: {line!r}")
        return Attached(_int(data.get("probes"), "attached_probes.probes"))
    if kind == "lost_events":
        if not isinstance(data, dict):
            raise TraceParseError(f"lost_events without data: {line!r}")
        return LostEvents(_int(data.get("events"), "lost_events.events"))
    if kind == "map":
        name, body = _single_map(data, kind)
        if name in STACK_MAPS and isinstance(body, dict):
            stacks: StackMap = {}
            for k, v in body.items():
                # Stacks that differ only in the tracer's own frames (dropped here) are
                # one stack: summed, not the last one kept (that lost counts).
                sk = parse_stack_key(k, name)
                stacks[sk] = stacks.get(sk, 0) + _int(v, f"map @{name}")
            return StackMapOutput(name, stacks)
        if isinstance(body, dict):
            return MapOutput(
                name,
                {parse_key(k, name): _int(v, f"map @{name}[{k}]") for k, v in body.items()},
            )
        return MapOutput(name, {(): _int(body, f"map @{name}")})
    if kind == "hist":
        name, body = _single_map(data, kind)
        if isinstance(body, dict):
            return HistOutput(
                name, {parse_key(k, name): _buckets(v, f"hist @{name}[{k}]")
                       for k, v in body.items()}
            )
        return HistOutput(name, {(): _buckets(body, f"hist @{name}")})
    return OtherOutput(str(kind), data)


@dataclass
class TraceSnapshot:
    """Cumulative maps at one moment (a completed dump, or bpftrace's exit output).

    ``seq`` is the dump sequence number, None for the final (exit) output.
    Maps that were empty are simply absent: use :meth:`counter` / :meth:`hist`.
    """

    counters: dict[str, CounterMap] = field(default_factory=dict)
    hists: dict[str, HistMap] = field(default_factory=dict)
    stacks: dict[str, StackMap] = field(default_factory=dict)
    seq: int | None = None
    final: bool = False
    lost_events: int = 0
    stderr_tail: str = ""
    taken_ns: int = 0

    def counter(self, name: str) -> CounterMap:
        """Counter map ``@name`` (empty when it was not printed)."""
        return self.counters.get(name, {})

    def hist(self, name: str) -> HistMap:
        """Histogram map ``@name`` (empty when it was not printed)."""
        return self.hists.get(name, {})

    def add(self, out: Output) -> None:
        """Fold one parsed map message into the snapshot (later prints replace earlier)."""
        if isinstance(out, MapOutput):
            self.counters[out.name] = out.values
            if out.name == "evt":
                self.counters.update(derive_event_views(out.values))
        elif isinstance(out, HistOutput):
            self.hists[out.name] = out.values
        elif isinstance(out, StackMapOutput):
            self.stacks[out.name] = out.values

    def stack(self, name: str) -> StackMap:
        """Stack map ``@name`` (empty when it was not printed)."""
        return self.stacks.get(name, {})


def derive_event_views(evt: Mapping[Key, int]) -> dict[str, CounterMap]:
    """``@ev``, ``@total`` and ``@vcpu`` as sums over ``@evt[pid, tid, g, h, probe]``.

    The kernel keeps one counter per event (see program.py); these are the
    views the correlator reads.
    """
    ev: dict[Key, int] = {}
    total: dict[Key, int] = {}
    vcpu: dict[Key, int] = {}
    for key, n in evt.items():
        if len(key) != 5:
            raise TraceParseError(f"map @evt: key {key!r} is not [pid, tid, g, h, probe]")
        pid, tid, g, h, probe = key
        ev[(pid, g, h, probe)] = ev.get((pid, g, h, probe), 0) + n
        total[(pid, probe)] = total.get((pid, probe), 0) + n
        vcpu[(pid, tid, g, h)] = vcpu.get((pid, tid, g, h), 0) + n
    return {"ev": ev, "total": total, "vcpu": vcpu}


def snapshot_from_lines(lines: Iterable[str]) -> TraceSnapshot:
    """Build one snapshot from raw output lines (all maps; later prints win)."""
    snap = TraceSnapshot(final=True)
    for line in lines:
        out = parse_line(line)
        if isinstance(out, LostEvents):
            snap.lost_events += out.count
        elif out is not None:
            snap.add(out)
    return snap


def select_pid(m: Mapping[Key, int], pid: int) -> CounterMap:
    """Entries of a pid-first map that belong to ``pid``, with the pid dropped from the key."""
    return {k[1:]: v for k, v in m.items() if k and k[0] == pid}
