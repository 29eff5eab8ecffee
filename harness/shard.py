"""`harness run --shard K/N`: a deterministic 1/N of a suite's runs.

The suite's work is cut into units in file order: each ``[[runs]]`` entry of a
VM that runs alone is a unit, and a ``[[groups]]`` entry with all its runs is
one unit (its VMs run side by side; splitting them would change what they
measure). Unit i goes to shard ``i % N + 1``, so shards 1..N of one suite
cover every run exactly once, on any machine, and the same K/N always picks
the same runs. Each shard writes its own result file; `harness compare` pools
the shards of one night like any other result files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from harness.spec import RunSpec, Suite

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


class ShardError(ValueError):
    """A shard spec that cannot be used, with the fix."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """Parse ``K/N`` (1 <= K <= N); anything else is a ShardError saying what is accepted."""
    m = _SPEC.match(text)
    if m is None:
        raise ShardError(f"{text!r} is not K/N (fix: e.g. --shard 1/3 for the first of 3 shards)")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= k <= n:
        raise ShardError(
            f"{text!r}: shard numbers run from 1 to N (fix: --shard K/{max(n, 1)} "
            f"with 1 <= K <= {max(n, 1)})"
        )
    return Shard(k, n)


def units(suite: Suite) -> list[list[RunSpec]]:
    """The suite's runs cut into shardable units, in file order (see the module doc)."""
    group_of = {vm: g.name for g in suite.spec.groups for vm in g.vms}
    out: list[list[RunSpec]] = []
    group_unit: dict[str, list[RunSpec]] = {}
    for run in suite.spec.runs:
        group = group_of.get(run.vm)
        if group is None:
            out.append([run])
        elif group in group_unit:
            group_unit[group].append(run)
        else:
            group_unit[group] = [run]
            out.append(group_unit[group])
    return out


def select(suite: Suite, shard: Shard) -> Suite:
    """The suite reduced to ``shard``'s runs, and the VMs and groups those runs use.

    Raises ShardError when the shard gets nothing (more shards than units).
    """
    all_units = units(suite)
    mine = [u for i, u in enumerate(all_units) if i % shard.count == shard.index - 1]
    if not mine:
        raise ShardError(
            f"{suite.path}: shard {shard} has no runs: the suite has {len(all_units)} "
            f"shardable unit(s) (runs, with each [[groups]] entry one unit) "
            f"(fix: use at most {len(all_units)} shards)"
        )
    runs = [r for u in mine for r in u]
    used = {r.vm for r in runs}
    spec = suite.spec.model_copy(
        update={
            "runs": runs,
            "vms": [vm for vm in suite.spec.vms if vm.name in used],
            "groups": [g for g in suite.spec.groups if used & set(g.vms)],
        }
    )
    return replace(suite, spec=spec)
