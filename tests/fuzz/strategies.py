"""Hypothesis strategies for hostile input: JSON trees, TOML documents, numbers as text."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import strategies as st

#: Strings an attacker would try: controls, escapes, paths, huge digit runs, unicode digits.
NASTY_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from([
        "", "\x1b[2J", "\x1b]0;title\x07", "\x9b31m", "../../etc/passwd", "/etc/shadow",
        "nightly", "a;b c", "\u202e", "9" * 400, "1e999", "NaN", "-inf", "١٢٣", "\x00",
        "{mib}", "${HOME}", "$(reboot)", "`id`", "'", '"', "\\", "\n[[runs]]\n",
    ]),
)

#: Numbers, ordinary and hostile.
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 10**400, 1e308, 5e-324]),
)

#: Scalars JSON can hold, including what Python's json module writes for NaN and infinity.
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([10**400, -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True),
    NASTY_TEXT,
)


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON tree (bounded size)."""
    return st.recursive(
        JSON_SCALARS,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(NASTY_TEXT, inner, max_size=4),
        ),
        max_leaves=max_leaves,
    )


def deep_json(depth: int) -> str:
    """A document nested ``depth`` levels (a RecursionError for a recursive parser)."""
    return "[" * depth + "]" * depth


def dumps(value: Any) -> str:
    """JSON as Python writes it (NaN/Infinity literals included)."""
    return json.dumps(value, allow_nan=True)


# --- TOML ----------------------------------------------------------------------------

TOML_SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    NASTY_TEXT,
)
TOML_VALUES = st.one_of(TOML_SCALARS, st.lists(TOML_SCALARS, max_size=4))


def toml_value(value: Any) -> str:
    """``value`` as a TOML value (strings JSON-escaped, which TOML basic strings accept)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}"
                                for k, v in value.items()) + " }"
    raise TypeError(type(value))


def toml_document(doc: dict[str, Any]) -> str:
    """A TOML document: top-level keys, then ``[table]`` and ``[[array of tables]]``."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in doc.items():
        if isinstance(value, dict) or (
            isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
        ):
            tables.append((key, value))
        else:
            lines.append(f"{json.dumps(key)} = {toml_value(value)}")
    for key, value in tables:
        entries = value if isinstance(value, list) else [value]
        header = f"[[{json.dumps(key)}]]" if isinstance(value, list) else f"[{json.dumps(key)}]"
        for entry in entries:
            lines.append(header)
            lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


def tally(label: str) -> None:
    """``hypothesis.event`` inside a Hypothesis test (statistics), nothing outside one."""
    from contextlib import suppress

    from hypothesis import event
    from hypothesis.errors import InvalidArgument

    with suppress(InvalidArgument):
        event(label)
