"""Numbers a workload prints, pulled out by the regexes its spec declares.

The output comes from a guest the harness does not control: whatever it
prints, a value that is not a finite, plausible number is recorded as missing
with the reason, never as NaN, infinity or null in the result.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from harness.spec import PhaseSpec

#: Beyond this magnitude a workload's number is garbage, not a measurement (1e18 is an
#: exabyte, or a billion operations a second for 30 years).
MAX_ABS_METRIC = 1e18
#: A matched number longer than this is not parsed at all (float() of a huge digit string
#: costs time, and no real metric has more digits).
MAX_NUMBER_CHARS = 64


@dataclass
class Extraction:
    """A phase's metrics: the values found, and per missing metric why it is missing."""

    values: dict[str, float] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def missing(self) -> list[str]:
        """Names of the metrics without a value, in the phase's order."""
        return list(self.problems)


def parse_number(text: str) -> tuple[float | None, str]:
    """``text`` as a finite, plausible float, or (None, why not)."""
    shown = text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(text)} chars)"
    shown = shown.encode("unicode_escape").decode("ascii")
    if len(text) > MAX_NUMBER_CHARS:
        return None, f"{shown!r} is longer than {MAX_NUMBER_CHARS} characters"
    try:
        value = float(text)
    except ValueError:
        return None, f"{shown!r} is not a number"
    if not math.isfinite(value):
        return None, f"{shown!r} is not a finite number"
    if abs(value) > MAX_ABS_METRIC:
        return None, f"{shown!r} is beyond the plausible range (|value| <= {MAX_ABS_METRIC:g})"
    return value, ""


def extract_checked(phase: PhaseSpec, output: str) -> Extraction:
    """Parse ``output`` with every metric of ``phase``, with a reason for each one missing."""
    out = Extraction()
    for metric in phase.metrics:
        where = f"phase {phase.name!r} metric {metric.name!r}"
        match = re.search(metric.regex, output, re.MULTILINE)
        if match is None:
            out.problems[metric.name] = f"{where}: no match for {metric.regex!r} in the output"
            continue
        value, why = parse_number(match.group(1) or "")
        if value is None:
            out.problems[metric.name] = f"{where}: the guest printed {why}; recorded as missing"
        else:
            out.values[metric.name] = value
    return out


def extract(phase: PhaseSpec, output: str) -> tuple[dict[str, float], list[str]]:
    """Parse ``output`` with every metric of ``phase``; return (values, names not found)."""
    got = extract_checked(phase, output)
    return got.values, got.missing
