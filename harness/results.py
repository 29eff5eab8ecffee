"""The result file: schema, atomic writes, loading.

One JSON document per run, ``results/<run-id>.json``. It is rewritten
atomically after every phase, so an interrupted run leaves valid JSON of
everything that finished, with ``status`` saying the run did not complete.
The schema grows by adding optional fields; ``SCHEMA_VERSION`` changes only
when a field changes meaning or disappears, and ``load`` refuses versions it
does not know instead of misreading them.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Defined beside its reader (harness/guest/identity.py); part of the result schema.
from harness.guest.identity import GuestIdentity as GuestIdentity
from harness.host.facts import HostFacts
from harness.host.load import HostLoad
from harness.host.mmuconfig import HostConfigRecord, HostLeftChanged
from harness.trace.model import PhaseTrace, TraceSummary

SCHEMA_VERSION = 1
SCHEMA_ID = "https://kvm-mmu-harness.invalid/results/schema.json"


class _Model(BaseModel):
    # A NaN or infinity is never a measurement: it would pass through compare unseen.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CrossCheck(_Model):
    """A KVM counter against the traced events that should equal it, over one phase."""

    kvm_stat: str
    traced: str
    kvm_value: int
    traced_value: int
    difference: int  # kvm_value - traced_value; non-zero means lost or extra events
    exact: bool  # whether the two are defined to be equal, or only to track each other


class MetricInfo(_Model):
    """What one workload metric means: copied from the workload TOML at run time."""

    unit: str = ""
    higher_is_better: bool = True


class WorkloadInfo(_Model):
    """A workload's metric definitions, so analysis needs only the result file."""

    description: str = ""
    metrics: dict[str, MetricInfo] = {}


class PhaseResult(_Model):
    """One phase of one repetition of one workload."""

    index: int = Field(description="phase number on the VM's marker channel (1-based)")
    name: str
    command: str | None = None
    started_at: datetime | None = None
    start_ns: int | None = Field(
        default=None, description="host CLOCK_MONOTONIC at the phase start"
    )
    end_ns: int | None = None
    duration_s: float | None = None
    timing: Literal["host-clock", "guest-marker"] = "host-clock"
    status: Literal["ok", "failed", "timeout", "error"]
    exit_status: int | None = None
    error: str | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""
    metrics: dict[str, float] = {}
    metrics_missing: list[str] = []
    metric_problems: dict[str, str] = Field(
        default_factory=dict,
        description="metric -> why it is in metrics_missing (no match, not a number, "
        "non-finite or beyond the plausible range), naming the phase and metric",
    )
    trace: PhaseTrace | None = None
    kvm_stats: dict[str, int] | None = Field(
        default=None, description="KVM's own counters, delta over the phase"
    )
    cross_checks: list[CrossCheck] = []


class WorkloadRun(_Model):
    """One repetition of one workload on one VM."""

    workload: str
    vm: str
    repetition: int = Field(description="1-based, counted per boot, warm-ups included")
    params: dict[str, str | int | float]
    boot: str | None = Field(
        default=None,
        description="the boot it ran in (VmRecord.boot); repetitions of one boot share its "
        "noise, so compare treats boots as the independent samples. None: older results",
    )
    warmup: bool = Field(
        default=False,
        description="a warm-up repetition: recorded and shown, never compared",
    )
    status: Literal["ok", "failed", "incomplete", "skipped"] = Field(
        description="skipped: never started, because its boot was ended before (see reason)"
    )
    phases: list[PhaseResult] = []
    reason: str | None = Field(
        default=None,
        description="why it failed or was skipped, in words; None when it ran to its end",
    )
    not_run: list[str] = Field(
        default_factory=list,
        description="its phases that did not run because an earlier one did not succeed",
    )


class VmRecord(_Model):
    """A VM as it was booted (one record per boot)."""

    name: str
    boot: str | None = Field(
        default=None, description="this boot's name, unique in the run (WorkloadRun.boot)"
    )
    domain: str
    image: str
    image_digest: str
    image_packages: dict[str, str] = Field(
        default_factory=dict, description="guest kernel release and key package versions"
    )
    accelerator: Literal["kvm", "tcg"]
    accelerator_reason: str
    vcpus: int
    memory_mib: int
    group: str | None = Field(
        default=None,
        description="the suite's concurrent group this VM ran in, beside its other members; "
        "None: it ran alone",
    )
    qemu_pid: int | None = None
    marker_token: int
    boot_to_ready_s: float | None = Field(default=None, description="domain start to SSH answering")
    console_log: str | None = None
    image_recipe: str | None = Field(
        default=None,
        description="digest of what the image was built from, without per-boot values such as "
        "the marker token: equal recipes boot the same guest (None: use image_digest)",
    )
    trace: TraceSummary | None = Field(default=None, description="the tracer of this boot")
    guest_identity: GuestIdentity | None = Field(
        default=None,
        description="the guest's OS release and kernel as it reported them after boot, and "
        "the kernel / disk the host booted it from. None: not recorded (older results, "
        "micro guests, or the guest could not be asked)",
    )
    ended_early: str | None = Field(
        default=None,
        description="why the harness destroyed this boot before all its work ran (a phase "
        "timed out, the guest or its SSH is gone, libvirtd was lost); its remaining work is "
        "recorded as skipped. None: it did everything it was given",
    )


class SuiteRef(_Model):
    """Which suite file produced this run."""

    name: str
    path: str
    sha256: str


class RunResult(_Model):
    """A whole run: provenance, VMs, tracer state and every phase measured."""

    schema_version: int = SCHEMA_VERSION
    run_id: str
    status: Literal["running", "complete", "incomplete", "failed", "killed"] = Field(
        description="killed: the harness process died without a word (SIGKILL, power loss); "
        "a later run found its leftovers and said so here"
    )
    started_at: datetime
    finished_at: datetime | None = None
    harness_version: str
    command_line: list[str]
    suite: SuiteRef
    host: HostFacts
    vms: list[VmRecord] = []
    runs: list[WorkloadRun] = []
    workloads: dict[str, WorkloadInfo] = Field(
        default_factory=dict, description="workload name -> what its metrics mean"
    )
    errors: list[str] = []
    notes: list[str] = []
    host_load: HostLoad | None = Field(
        default=None,
        description="how busy the host was while this run measured (load average, CPU used "
        "by processes outside the run, other VMs, governor): compare warns on a busy side",
    )
    steady_state: list[str] = Field(
        default_factory=list,
        description="figures that drift across the repetitions of a boot (not at steady "
        "state: add warm-up repetitions), one line each",
    )
    host_config: HostConfigRecord | None = Field(
        default=None,
        description="the host MMU configuration (suite [[host_configs]]) this run was made "
        "under: each setting before, wanted and read back after; None: the host as it was",
    )
    host_left_changed: list[HostLeftChanged] = Field(
        default_factory=list,
        description="host settings another harness run changed and had not put back when "
        "this run started (a killed run's leftovers, or a run beside this one): this run "
        "measured a changed host; `harness host restore` puts it back. Empty: none found",
    )


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a result file (committed as results/schema.json)."""
    schema = RunResult.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    return schema


def write_atomic(result: RunResult, path: Path) -> None:
    """Replace ``path`` with ``result`` so readers see the old file or the new, never half.

    A failed write (a full disk) leaves the old file as it was and raises an
    OSError that names the file and the errno (e.g. ENOSPC).
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(result.model_dump_json(indent=2))
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None:
            code = errno.errorcode.get(exc.errno, str(exc.errno))
            raise OSError(
                exc.errno,
                f"{exc.strerror} ({code}): cannot write the result file {path}; "
                "its previous version is kept as it was",
            ) from exc
        raise


class ResultError(Exception):
    """A result file cannot be read as this version of the harness understands it."""


#: Deepest nesting of arrays and objects a result file may have; real ones reach about 12.
MAX_JSON_DEPTH = 64
#: Largest result file read (a long suite with stacks is a few MiB).
MAX_RESULT_BYTES = 256 * 1024 * 1024

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def json_depth_problem(text: str, limit: int = MAX_JSON_DEPTH) -> str | None:
    """Why ``text`` nests deeper than ``limit`` (with where), or None; no recursion, no parse.

    Python's JSON decoder recurses once per level, so a deep document ends in
    RecursionError; this bound is checked on the raw text first.
    """
    depth = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', text)):
        depth += 1 if m.group() in "[{" else -1
        if depth > limit:
            return f"nested more than {limit} levels deep (a result file nests about 12)"
    return None


def non_finite(data: object) -> list[tuple[tuple[str | int, ...], float]]:
    """Every NaN or infinite number in parsed JSON ``data``, with its path (iterative).

    An integer of more than 64 bits counts as infinite: no counter holds one, and as a
    float (figures, compare) it overflows.
    """
    found: list[tuple[tuple[str | int, ...], float]] = []
    todo: list[tuple[tuple[str | int, ...], object]] = [((), data)]
    while todo:
        loc, value = todo.pop()
        if isinstance(value, float) and not math.isfinite(value):
            found.append((loc, value))
        elif isinstance(value, int) and abs(value) >= 1 << 64:
            found.append((loc, -math.inf if value < 0 else math.inf))
        elif isinstance(value, dict):
            todo.extend(((*loc, str(k)), v) for k, v in value.items())
        elif isinstance(value, list):
            todo.extend(((*loc, i), v) for i, v in enumerate(value))
    return sorted(found, key=lambda f: [str(x) for x in f[0]])


def describe_location(data: object, loc: tuple[str | int, ...]) -> str:
    """``loc`` in a result document in words: which run, phase and metric (or the JSON path)."""
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if not (len(loc) >= 4 and loc[0] == "runs" and loc[2] == "phases" and isinstance(data, dict)):
        return path
    try:
        run = data["runs"][loc[1]]
        phase = run["phases"][loc[3]]
        words = (f"workload {run.get('workload')!r} on VM {run.get('vm')!r} repetition "
                 f"{run.get('repetition')}, phase {phase.get('name')!r}")
    except (KeyError, IndexError, TypeError, AttributeError):
        return path
    rest = loc[4:]
    if len(rest) == 2 and rest[0] == "metrics":
        words += f", metric {rest[1]!r}"
    elif rest:
        words += f", field {'.'.join(str(p) for p in rest)}"
    return f"{words} ({path})"


def load(path: Path) -> RunResult:
    """Read a result file, refusing schema versions this harness does not know.

    Anything that is not a result this harness wrote is a ResultError naming the
    file (and, for a bad number, the run, phase and metric): too large, nested
    too deep, not JSON, a NaN/Infinity or overflowing number, another schema
    version. Valid JSON of the right version in the wrong shape raises pydantic's
    ValidationError (a ValueError).
    """
    try:
        size = path.stat().st_size
        if size > MAX_RESULT_BYTES:
            raise ResultError(f"{path}: {size} bytes, more than the {MAX_RESULT_BYTES} a "
                              "result file may have (fix: give the harness's own result files)")
        text = path.read_text()
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8
        raise ResultError(f"{path}: not a readable result file: {exc}") from exc
    if (deep := json_depth_problem(text)) is not None:
        raise ResultError(f"{path}: not a result file: {deep}")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError; integers over 4300 digits
        raise ResultError(f"{path}: not a readable result file: {exc}") from exc
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise ResultError(
            f"{path}: schema_version {version!r}, this harness reads "
            f"{SCHEMA_VERSION} (fix: use the harness version that wrote it)"
        )
    if bad := non_finite(data):
        listed = "; ".join(f"{describe_location(data, loc)} is {v}" for loc, v in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ResultError(
            f"{path}: non-finite numbers, which no measurement is: {listed}{more} (fix: "
            "rerun, or remove these values; a guest printing them has its metric recorded "
            "as missing by this harness)"
        )
    return RunResult.model_validate(data)


def mark_killed(
    path: Path, note: str, status: Literal["killed", "failed"] = "killed"
) -> bool:
    """Say in a dead run's file that it was killed (or ``status``: how it ended); its
    measured phases stay as they are.

    Only a file still claiming ``running`` is changed (its process is known to
    be gone); anything unreadable is left alone. Returns whether it was changed.
    """
    try:
        result = load(path)
    except (ResultError, ValueError):
        return False
    if result.status != "running":
        return False
    result.status = status
    result.errors.append(note)
    try:
        write_atomic(result, path)
    except OSError:
        return False  # its disk is still full, or gone: the next run must not fail for it
    return True


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))
