"""Numbers a workload prints, pulled out by the regexes its spec declares."""

from __future__ import annotations

import re

from harness.spec import PhaseSpec


def extract(phase: PhaseSpec, output: str) -> tuple[dict[str, float], list[str]]:
    """Parse ``output`` with every metric of ``phase``; return (values, names not found)."""
    values: dict[str, float] = {}
    missing: list[str] = []
    for metric in phase.metrics:
        match = re.search(metric.regex, output, re.MULTILINE)
        if match is None:
            missing.append(metric.name)
            continue
        try:
            values[metric.name] = float(match.group(1))
        except ValueError:
            missing.append(metric.name)
    return values, missing
