"""Suite and workload specifications: TOML files in, validated models out.

Everything a run needs is checked here, before any VM boots: a malformed suite
or workload fails with the file, the field and what to do about it.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import string
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.paths import SUITES_DIR, WORKLOADS_DIR

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")]
MetricName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")]
ParamValue = str | int | float
GuestKind = Literal["linux", "micro"]
M = TypeVar("M", bound=BaseModel)

#: Which guest kind each built-in image boots; a Windows image joins this table.
IMAGE_GUEST_KIND: dict[str, GuestKind] = {"linux": "linux", "micro": "micro"}


class SpecError(Exception):
    """A spec file is wrong; the message names file, field, reason and a fix."""

    def __init__(self, path: Path, field: str, reason: str, fix: str = "") -> None:
        self.path, self.field, self.reason, self.fix = path, field, reason, fix
        where = f"{path}" + (f":{line}" if (line := _line_of(path, field)) else "")
        text = f"{where}: {field}: {reason}" if field else f"{where}: {reason}"
        super().__init__(text + (f" (fix: {fix})" if fix else ""))


class _Strict(BaseModel):
    # Unknown keys are typos until proven otherwise.
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricSpec(_Strict):
    """A number the workload prints: the first capture group of ``regex``."""

    name: MetricName
    regex: str
    unit: str = ""
    higher_is_better: bool = True

    @field_validator("regex")
    @classmethod
    def _one_group(cls, value: str) -> str:
        try:
            compiled = re.compile(value, re.MULTILINE)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        if compiled.groups != 1:
            raise ValueError(
                f"needs exactly one capture group for the number, has {compiled.groups}"
            )
        return value


class PhaseSpec(_Strict):
    """One measured step of a workload, bracketed by phase markers."""

    name: Name
    command: str | None = None  # guest command template (linux/windows guests)
    timeout_s: float = Field(default=600.0, gt=0)
    pages: int | None = Field(default=None, ge=1)  # micro guests: 4 KiB pages touched
    repeat: int = Field(default=1, ge=1)  # micro guests: passes over those pages
    metrics: list[MetricSpec] = []


class WorkloadSpec(_Strict):
    """A workload as data: its phases, the commands they run and the numbers they print."""

    name: Name
    description: str = ""
    guest: GuestKind
    params: dict[str, ParamValue] = {}
    phases: Annotated[list[PhaseSpec], Field(min_length=1)]

    @model_validator(mode="after")
    def _phases_fit_guest(self) -> WorkloadSpec:
        for i, phase in enumerate(self.phases):
            if self.guest == "micro" and phase.pages is None:
                raise ValueError(
                    f"phases[{i}] ({phase.name}): a micro workload phase needs `pages`"
                )
            if self.guest != "micro" and not phase.command:
                raise ValueError(
                    f"phases[{i}] ({phase.name}): a {self.guest} phase needs `command`"
                )
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        return self

    def render(self, phase: PhaseSpec, params: dict[str, ParamValue]) -> str:
        """The guest command of ``phase`` with ``params`` filled in, shell-quoted."""
        assert phase.command is not None
        merged = {**self.params, **params}
        return phase.command.format(**{k: shlex.quote(str(v)) for k, v in merged.items()})

    def placeholders(self) -> set[str]:
        """Every ``{name}`` used by a phase command."""
        found: set[str] = set()
        for phase in self.phases:
            for _, field_name, _, _ in string.Formatter().parse(phase.command or ""):
                if field_name is not None:
                    found.add(field_name)
        return found


class VmSpec(_Strict):
    """A guest to boot: image, size and accelerator."""

    name: Name
    image: Literal["linux", "micro"] = "linux"
    vcpus: int = Field(default=1, ge=1, le=64)
    memory_mib: int = Field(default=1024, ge=16)
    accelerator: Literal["auto", "kvm", "tcg"] = "auto"
    boot_timeout_s: float = Field(default=120.0, gt=0)


class RunSpec(_Strict):
    """One workload on one VM, with parameter overrides."""

    workload: Name
    vm: Name
    params: dict[str, ParamValue] = {}
    repetitions: int | None = Field(default=None, ge=1)


class TraceSpec(_Strict):
    """What the host tracer attaches (names or groups from the probe catalogue)."""

    enabled: bool = True
    probes: list[str] = ["default"]


class SuiteSpec(_Strict):
    """A suite: the VMs, the workloads run on them, repetitions and tracing."""

    name: Name
    description: str = ""
    repetitions: int = Field(default=1, ge=1)
    vms: Annotated[list[VmSpec], Field(min_length=1)]
    runs: Annotated[list[RunSpec], Field(min_length=1)]
    trace: TraceSpec = TraceSpec()

    @model_validator(mode="after")
    def _references(self) -> SuiteSpec:
        names = [vm.name for vm in self.vms]
        if len(set(names)) != len(names):
            raise ValueError(f"VM names must be unique, got {names}")
        return self

    def vm(self, name: str) -> VmSpec:
        """The VM called ``name``."""
        return next(vm for vm in self.vms if vm.name == name)


@dataclass(frozen=True)
class Suite:
    """A validated suite with the workloads it uses, ready to run."""

    spec: SuiteSpec
    path: Path
    sha256: str
    workloads: dict[str, WorkloadSpec]

    def repetitions(self, run: RunSpec) -> int:
        """How many times ``run`` is repeated."""
        return run.repetitions or self.spec.repetitions


def _read_toml(path: Path) -> dict[str, object]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(path, "", f"cannot read: {exc.strerror}", "check the path") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(path, "", f"not valid TOML: {exc}", "fix the TOML syntax") from exc


def _validated(model: type[M], path: Path, data: dict[str, object]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in err["loc"])
        field = field.replace(".[", "[")
        msg = err["msg"].removeprefix("Value error, ")
        fix = "remove or rename the key" if err["type"] == "extra_forbidden" else ""
        more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
        raise SpecError(path, field or "(top level)", msg + more, fix) from exc


def load_workload(path: Path) -> WorkloadSpec:
    """Load and validate one workload file."""
    workload = _validated(WorkloadSpec, path, _read_toml(path))
    if workload.name != path.stem:
        raise SpecError(
            path,
            "name",
            f"is {workload.name!r} but the file is {path.name}",
            f"rename the file to {workload.name}.toml or set name = {path.stem!r}",
        )
    return workload


def workload_path(name: str, search: list[Path]) -> Path | None:
    """Where the workload called ``name`` is defined, first hit in ``search``."""
    return next((d / f"{name}.toml" for d in search if (d / f"{name}.toml").is_file()), None)


def available_workloads(search: list[Path]) -> list[str]:
    """Names of every workload file in ``search``."""
    return sorted({p.stem for d in search if d.is_dir() for p in d.glob("*.toml")})


def load_suite(path: Path) -> Suite:
    """Load a suite and every workload it names, validating all cross-references."""
    path = path.resolve()
    spec = _validated(SuiteSpec, path, _read_toml(path))
    # A suite next to its own workloads (suites/ under a workloads dir) finds them first.
    search = [path.parent.parent, path.parent, WORKLOADS_DIR]
    workloads: dict[str, WorkloadSpec] = {}
    vm_names = [vm.name for vm in spec.vms]
    for i, run in enumerate(spec.runs):
        if run.vm not in vm_names:
            raise SpecError(
                path,
                f"runs[{i}].vm",
                f"no VM named {run.vm!r}",
                f"use one of: {', '.join(vm_names)}",
            )
        if run.workload not in workloads:
            wpath = workload_path(run.workload, search)
            if wpath is None:
                known = ", ".join(available_workloads(search)) or "none"
                raise SpecError(
                    path,
                    f"runs[{i}].workload",
                    f"unknown workload {run.workload!r}",
                    f"use one of: {known}, or add workloads/{run.workload}.toml",
                )
            workloads[run.workload] = load_workload(wpath)
        workload = workloads[run.workload]
        vm = spec.vm(run.vm)
        if IMAGE_GUEST_KIND[vm.image] != workload.guest:
            raise SpecError(
                path,
                f"runs[{i}]",
                f"workload {workload.name!r} is for {workload.guest} guests "
                f"but VM {vm.name!r} boots the {vm.image} image",
                f"run it on a VM with image = {workload.guest!r}",
            )
        unknown = set(run.params) - set(workload.params)
        if unknown:
            raise SpecError(
                path,
                f"runs[{i}].params",
                f"unknown parameter(s) {sorted(unknown)} for workload {workload.name!r}",
                f"use: {', '.join(sorted(workload.params)) or 'no parameters'}",
            )
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return Suite(spec=spec, path=path, sha256=sha, workloads=workloads)


def default_suite_path() -> Path:
    """The suite ``harness run`` uses when given none."""
    return SUITES_DIR / "default.toml"


def _line_of(path: Path, field: str) -> int | None:
    """Best-effort line number of ``field`` (a dotted path) in ``path``; TOML parsers give none.

    Walks the path through the file: ``phases[1].metrics[0].name`` finds the
    second ``[[phases]]``, then the first ``[[phases.metrics]]`` after it, then ``name =``.
    """
    parts = re.findall(r"([A-Za-z_][\w-]*)(?:\[(\d+)\])?", field)
    if not parts:
        return None
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    cursor, found = 0, None
    for key, index in parts:
        k = re.escape(key)
        if index:
            pattern = re.compile(rf"^\s*\[\[([\w.-]+\.)?{k}\]\]")
            hits = [n for n in range(cursor, len(lines)) if pattern.match(lines[n])]
            if len(hits) <= int(index):
                return found
            cursor = hits[int(index)]
        else:
            pattern = re.compile(rf"^\s*({k}\s*=|\[([\w.-]+\.)?{k}\])")
            hit = next((n for n in range(cursor, len(lines)) if pattern.match(lines[n])), None)
            if hit is None:
                return found
            cursor = hit
        found = cursor + 1
    return found
