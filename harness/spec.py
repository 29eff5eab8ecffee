"""Suite and workload specifications: TOML files in, validated models out.

Everything a run needs is checked here, before any VM boots: a malformed suite
or workload fails with the file, the field and what to do about it.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import re
import shlex
import string
import tomllib
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from harness.host.mmuconfig import HostConfigSpec
from harness.image.cloud_disk import DiskError, check_disk
from harness.image.paging import PagingImageError, PagingPhase, validate_paging_params
from harness.paths import SUITES_DIR, WORKLOADS_DIR
from harness.trace import probes
from harness.trace.program import DEFAULT_STACK_DEPTH, MAX_STACK_DEPTH

Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")]
MetricName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")]
#: A Debian/RPM package name (cloud-init installs it) or a program a workload needs.
PackageName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9+._-]{0,63}$")]
ParamValue = str | int | float
GuestKind = Literal["linux", "micro", "paging", "windows"]
M = TypeVar("M", bound=BaseModel)

#: Which guest kind each built-in image boots; a Windows image joins this table.
IMAGE_GUEST_KIND: dict[str, GuestKind] = {
    "linux": "linux", "micro": "micro", "paging": "paging", "windows": "windows",
    "cloud": "linux",  # a Linux image the user brings (harness/platform/cloud.py)
}


#: Images whose VMs may boot a guest kernel under test (kernel, initrd, cmdline,
#: kernel_package): the harness's own Debian root file system.
GUEST_KERNEL_IMAGES: tuple[str, ...] = ("linux", "cloud")
#: VM fields ``--set vm.[NAME.]FIELD=VALUE`` may change.
VM_OVERRIDE_FIELDS = ("kernel", "initrd", "cmdline", "kernel_package")


class SpecError(Exception):
    """A spec file is wrong; the message names file, field, reason and a fix.

    ``problems`` lists every error found in the file (this one first); the
    message has one line per problem, so a user fixes them all in one go.
    """

    def __init__(self, path: Path, field: str, reason: str, fix: str = "") -> None:
        self.path, self.field, self.reason, self.fix = path, field, reason, fix
        where = f"{path}" + (f":{line}" if (line := _line_of(path, field)) else "")
        text = f"{where}: {field}: {reason}" if field else f"{where}: {reason}"
        self.problems: list[SpecError] = [self]
        super().__init__(text + (f" (fix: {fix})" if fix else ""))

    @classmethod
    def combine(cls, problems: Sequence[SpecError]) -> SpecError:
        """One error that reports all of ``problems`` (the first names field and fix)."""
        first = problems[0]
        if len(problems) == 1:
            return first
        err = cls(first.path, first.field, first.reason, first.fix)
        err.problems = [p for problem in problems for p in problem.problems]
        err.args = ("\n".join(str(p) for p in err.problems),)
        return err


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known`` to a mistyped ``name``, or ""."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


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


ParamType = Literal["int", "float", "str"]


class ParamSpec(_Strict):
    """A workload parameter: its type, default and allowed values.

    A plain ``name = value`` in ``[params]`` is an untyped parameter: its
    default is ``value`` and any value is accepted (type inferred for ``--set``).
    A ``[params.name]`` table gives ``type`` and ``min``/``max`` or ``choices``.
    """

    type: ParamType | None = None
    default: ParamValue
    min: float | None = None
    max: float | None = None
    choices: list[ParamValue] | None = None
    multiple_of: int | None = Field(default=None, ge=1)  # int parameters: e.g. 2 for 2 MiB pages
    description: str = ""
    unit: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpec:
        if self.type is None and (self.min, self.max, self.choices, self.multiple_of) != (
            None, None, None, None
        ):
            raise ValueError("min, max, choices and multiple_of need a `type` (int, float or str)")
        if self.multiple_of is not None and self.type != "int":
            raise ValueError("multiple_of applies to int parameters only")
        if self.type == "str" and (self.min is not None or self.max is not None):
            raise ValueError("min/max apply to int and float parameters; use choices for str")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min:g}) is greater than max ({self.max:g})")
        self.check(self.default, what="default")
        return self

    @property
    def kind(self) -> ParamType:
        """The declared type, or the type of the default for an untyped parameter."""
        if self.type is not None:
            return self.type
        return "int" if isinstance(self.default, int) else (
            "float" if isinstance(self.default, float) else "str"
        )

    def allowed(self) -> str:
        """The allowed values in words, for listings and error messages."""
        if self.type is None:
            return f"any value (untyped, default {self.default!r})"
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        name = {"int": "an integer", "float": "a number", "str": "a string"}[self.type]

        def num(v: float) -> str:
            return str(int(v)) if self.type == "int" else f"{v:g}"

        lo = "" if self.min is None else num(self.min)
        hi = "" if self.max is None else num(self.max)
        text = f"{name} in {lo or '-inf'}..{hi or 'inf'}" if lo or hi else name
        return text + (f", a multiple of {self.multiple_of}" if self.multiple_of else "")

    def check(self, value: ParamValue, what: str = "value") -> ParamValue:
        """``value`` as this parameter's type; ValueError saying what is allowed otherwise."""
        if self.type is None:
            return value
        out: ParamValue
        if self.type == "int":
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{what} {value!r} is not {self.allowed()}")
            out = value
        elif self.type == "float":
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"{what} {value!r} is not {self.allowed()}")
            out = float(value)
        else:
            if not isinstance(value, str):
                raise ValueError(f"{what} {value!r} is not {self.allowed()}")
            out = value
        if self.choices is not None and out not in self.choices:
            raise ValueError(f"{what} {value!r} is not {self.allowed()}")
        if isinstance(out, int | float) and (
            (self.min is not None and out < self.min) or (self.max is not None and out > self.max)
        ):
            raise ValueError(f"{what} {value!r} is out of range: must be {self.allowed()}")
        if self.multiple_of is not None and isinstance(out, int) and out % self.multiple_of:
            raise ValueError(f"{what} {value!r} is not {self.allowed()}")
        return out

    def parse(self, text: str) -> ParamValue:
        """A command-line value (always text) as this parameter's type, checked."""
        value: ParamValue = text
        try:
            if self.kind == "int":
                value = int(text)
            elif self.kind == "float":
                value = float(text)
        except ValueError:
            if self.type is not None:
                raise ValueError(f"value {text!r} is not {self.allowed()}") from None
        return self.check(value)


class PhaseSpec(_Strict):
    """One measured step of a workload, bracketed by phase markers."""

    name: Name
    command: str | None = None  # guest command template (linux/windows guests)
    timeout_s: float = Field(default=600.0, gt=0)
    pages: int | None = Field(default=None, ge=1)  # micro guests: 4 KiB pages touched
    repeat: int = Field(default=1, ge=1)  # micro guests: passes over those pages
    # paging guests: what the phase does (cr3 / touch / pte) and how many times;
    # count may be "{param}", a workload parameter (runs and --set override it).
    kind: Literal["cr3", "touch", "pte"] | None = None
    count: int | str | None = None
    # Linux guests: inside the phase, before its command, the host resizes the guest's
    # memory to this share of the VM's memory_mib through libvirt (virtio-balloon).
    balloon_percent: int | None = Field(default=None, ge=10, le=100)
    metrics: list[MetricSpec] = []


class WorkloadSpec(_Strict):
    """A workload as data: its phases, the commands they run and the numbers they print."""

    name: Name
    description: str = ""
    #: The KVM MMU path the workload stresses, in a line (``harness workloads`` shows it).
    mmu_path: str = ""
    guest: GuestKind
    params: dict[str, ParamSpec] = {}
    phases: Annotated[list[PhaseSpec], Field(min_length=1)]
    #: Repetitions at the start of every boot that are run, recorded and shown but never
    #: compared: a cold TCG translation cache, the guest's first touch of its memory (EPT
    #: violations / NPF that later repetitions do not pay), page cache and allocator state.
    warmup: int = Field(default=0, ge=0, le=10)
    #: Programs its commands run in the guest: the harness's own tools are copied into a
    #: guest that lacks them (cloud guests); a package program a guest lacks skips the run.
    needs: list[PackageName] = []

    @field_validator("params", mode="before")
    @classmethod
    def _plain_values_are_untyped(cls, value: object) -> object:
        # `mib = 256` (the original form) is an untyped parameter with that default.
        if isinstance(value, dict):
            return {k: v if isinstance(v, dict) else {"default": v} for k, v in value.items()}
        return value

    def defaults(self) -> dict[str, ParamValue]:
        """Every parameter's default value."""
        return {name: p.default for name, p in self.params.items()}

    def param_problem(self, name: str, value: ParamValue) -> tuple[str, str] | None:
        """(reason, fix) if ``name`` = ``value`` is not allowed for this workload, else None."""
        if name not in self.params:
            return (
                f"unknown parameter {name!r} for workload {self.name!r}"
                f"{did_you_mean(name, self.params)}",
                f"use one of: {', '.join(sorted(self.params)) or 'no parameters'}",
            )
        try:
            self.params[name].check(value)
        except ValueError as exc:
            return (
                f"workload {self.name!r} parameter {name!r}: {exc}",
                f"give {name} {self.params[name].allowed()}",
            )
        return None

    @model_validator(mode="after")
    def _phases_fit_guest(self) -> WorkloadSpec:
        for i, phase in enumerate(self.phases):
            if self.guest == "micro" and phase.pages is None:
                raise ValueError(
                    f"phases[{i}] ({phase.name}): a micro workload phase needs `pages`"
                )
            if self.guest == "paging":
                if phase.kind is None or phase.count is None:
                    raise ValueError(
                        f"phases[{i}] ({phase.name}): a paging workload phase needs `kind` "
                        '(cr3, touch or pte) and `count` (a number or "{parameter}")'
                    )
                if isinstance(phase.count, str) and _param_ref(phase.count) not in self.params:
                    raise ValueError(
                        f"phases[{i}].count ({phase.name}): {phase.count!r} is not "
                        '"{name}" of a parameter in [params]; declare it or give a number'
                    )
                continue
            if self.guest != "micro" and not phase.command:
                raise ValueError(
                    f"phases[{i}] ({phase.name}): a {self.guest} phase needs `command`"
                )
            if self.guest != "linux" and phase.balloon_percent is not None:
                raise ValueError(
                    f"phases[{i}] ({phase.name}): balloon_percent is for linux guests only"
                )
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        try:
            undefined = sorted(self.placeholders() - set(self.params))
        except ValueError as exc:  # an unbalanced brace in a command
            raise ValueError(f"a phase command is not a valid template: {exc}") from exc
        if undefined:
            raise ValueError(
                f"commands use {undefined} but [params] does not define them: add them "
                "to [params] (write a literal brace as {{ or }})"
            )
        return self

    def paging_phases(self, params: dict[str, ParamValue]) -> tuple[int, list[PagingPhase]]:
        """K and the phases of a paging workload, ``params`` over its defaults.

        Raises :class:`PagingImageError` naming the field when a value is out of range.
        """
        merged = {**self.defaults(), **params}
        k = merged.get("address_spaces")
        if not isinstance(k, int) or isinstance(k, bool):
            raise PagingImageError(
                f"params.address_spaces: {k!r}; a paging workload needs an integer K in [params]"
            )
        phases: list[PagingPhase] = []
        for i, ph in enumerate(self.phases):
            if ph.kind is None or ph.count is None:
                raise PagingImageError(f"phases[{i}] ({ph.name}): not a paging phase")
            count = merged[_param_ref(ph.count)] if isinstance(ph.count, str) else ph.count
            if not isinstance(count, int) or isinstance(count, bool):
                raise PagingImageError(
                    f"phases[{i}].count ({ph.name}): {ph.count!r} is {count!r}, not an integer"
                )
            phases.append(PagingPhase(ph.name, ph.kind, count))
        validate_paging_params(k, phases, 1)
        return k, phases

    def render(self, phase: PhaseSpec, params: dict[str, ParamValue]) -> str:
        """The guest command of ``phase`` with ``params`` filled in, shell-quoted."""
        assert phase.command is not None
        merged = {**self.defaults(), **params}
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
    image: Literal["linux", "micro", "paging", "windows", "cloud"] = "linux"
    vcpus: int = Field(default=1, ge=1, le=64)
    memory_mib: int = Field(default=1024, ge=16)
    accelerator: Literal["auto", "kvm", "tcg"] = "auto"
    boot_timeout_s: float = Field(default=120.0, gt=0)
    # A virtio-balloon device, for workloads that resize guest memory (balloon_percent);
    # off by default so that no guest gives memory back behind a workload's back.
    balloon: bool = False
    #: Boots of this VM (None: the suite's ``boots``). Each boot runs every repetition of
    #: its runs; boots, not repetitions, are what `harness compare` treats as independent.
    boots: int | None = Field(default=None, ge=1, le=100)
    #: Host CPUs each vCPU is pinned to (libvirt ``cputune/vcpupin``): vCPU i on
    #: ``pin_vcpus[i % len]``. None: the host scheduler places them (noisier timings).
    pin_vcpus: list[Annotated[int, Field(ge=0, le=4095)]] | None = None
    #: Host CPUs for QEMU's emulator threads (``cputune/emulatorpin``), e.g. away from the
    #: vCPUs so I/O and the tracer's wake-ups do not steal their time.
    pin_emulator: list[Annotated[int, Field(ge=0, le=4095)]] | None = None
    #: Windows VMs: OVMF with secure boot (Microsoft keys enrolled), and RDP forwarded
    #: to a 127.0.0.1 port next to WinRM's (harness/vm/windows.py).
    secure_boot: bool = False
    rdp: bool = False
    #: Cloud VMs (image = "cloud", harness/platform/cloud.py): the user's disk image (qcow2
    #: or raw, relative to the suite file, never written: each boot runs on an overlay),
    #: the user cloud-init creates, the firmware, and whether the guest may reach outside
    #: networks (QEMU user networking without restrict=on) so cloud-init installs packages.
    disk: Path | None = Field(default=None, validate_default=True)
    os_user: str | None = Field(default=None, validate_default=True)
    firmware: Literal["bios", "uefi"] = Field(default="bios", validate_default=True)
    network: bool = Field(default=False, validate_default=True)
    packages: list[PackageName] = Field(default=[], validate_default=True)

    @field_validator("disk", "os_user", "firmware", "network", "packages")
    @classmethod
    def _cloud_fields(cls, value: object, info: ValidationInfo) -> object:
        image, name = info.data.get("image"), info.field_name
        if image is None:
            return value  # the image itself is wrong: reported there
        if image != "cloud":
            if value not in (None, "bios", False, []):
                raise ValueError(
                    f"applies to image = \"cloud\" only, not {image!r} (fix: drop {name} "
                    'from this VM, or set image = "cloud")'
                )
            return value
        # Type "missing": not said again once a wrong value there was reported and dropped.
        if name == "disk" and value is None:
            raise PydanticCustomError("missing", (
                'a cloud VM boots a disk image it names (fix: disk = "PATH/TO/IMAGE.qcow2", '
                "qcow2 or raw, relative to the suite file)"
            ))
        if name == "os_user" and value is None:
            raise PydanticCustomError("missing", (
                "a cloud VM needs the user cloud-init creates and the harness logs in as "
                '(fix: os_user = "bench"; any Unix user name but root)'
            ))
        if name == "os_user" and isinstance(value, str):
            if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", value):
                raise ValueError(
                    f"{value!r} is not a Unix user name (fix: lower-case letters, digits, _ "
                    "and -, starting with a letter or _, at most 32 characters)"
                )
            if value == "root":
                raise ValueError(
                    "cloud-init's root login stays disabled (fix: name another user; the "
                    "harness runs commands as root through its passwordless sudo)"
                )
        if name == "packages" and value and not info.data.get("network"):
            raise ValueError(
                "cloud-init installs packages from the network, but this VM has none "
                "(fix: set network = true, or drop packages)"
            )
        return value

    #: A guest kernel under test (Linux VMs, harness/image/kernel.py): a bzImage booted
    #: directly on the image's root file system, with an optional initramfs of its own and
    #: a command line (default: the image's); or ``kernel_package``, a Debian kernel package
    #: the default image is booted with (built once: `harness image build linux
    #: --kernel-package NAME`). Paths are relative to the suite file (``--set``: to the
    #: current directory); the files are checked before anything boots.
    kernel: Path | None = Field(default=None, validate_default=True)
    initrd: Path | None = Field(default=None, validate_default=True)
    cmdline: str | None = Field(default=None, validate_default=True)
    kernel_package: str | None = Field(default=None, validate_default=True)

    @field_validator("kernel", "initrd", "cmdline", "kernel_package")
    @classmethod
    def _guest_kernel_fields(cls, value: object, info: ValidationInfo) -> object:
        image, name = info.data.get("image"), info.field_name
        if value is None or image is None:
            return value  # unset, or the image itself is wrong: reported there
        if image not in GUEST_KERNEL_IMAGES:
            raise ValueError(
                f"applies to Linux VMs booted by the harness (image = "
                f"{' or '.join(repr(i) for i in GUEST_KERNEL_IMAGES)}), not {image!r} "
                f"(fix: drop {name} from this VM)"
            )
        if name == "kernel_package":
            assert isinstance(value, str)
            if image == "cloud":
                raise ValueError(
                    "kernel variants are built for the default image's root file system, not a "
                    "cloud disk (fix: give the kernel file, its initrd and a cmdline with the "
                    "disk's root=, e.g. kernel = \"vmlinuz\", initrd = \"initrd.img\", "
                    "cmdline = \"root=LABEL=cloudimg-rootfs ro console=ttyS0\")"
                )
            if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", value):
                raise ValueError(
                    f"{value!r} is not a Debian package name (fix: lower-case letters, digits, "
                    "'+', '-' and '.', e.g. \"linux-image-amd64\")"
                )
            if info.data.get("kernel") is not None:
                raise ValueError(
                    "a VM boots kernel (a file) or kernel_package (a Debian package), not both "
                    "(fix: drop one of them)"
                )
        if name == "initrd" and info.data.get("kernel") is None:
            raise ValueError(
                "an initrd goes with the kernel it was built for (fix: give kernel = PATH too, "
                "or drop initrd; a kernel_package brings its own)"
            )
        if name == "cmdline":
            assert isinstance(value, str)
            if not value.strip() or len(value) > 2048 or any(
                ord(c) < 32 or ord(c) == 127 for c in value
            ):
                raise ValueError(
                    "must be one line of printable text, at most 2048 characters (fix: "
                    'e.g. cmdline = "root=/dev/vda rw console=ttyS0 init=/sbin/harness-init"; '
                    "leave it out to use the image's)"
                )
        return value

    @model_validator(mode="after")
    def _cloud_kernel_needs_cmdline(self) -> VmSpec:
        # The default image's cmdline knows its own root; a cloud disk's root is its own.
        if self.image == "cloud" and self.kernel is not None and self.cmdline is None:
            raise ValueError(
                "a cloud VM booted with kernel = PATH needs the cmdline that finds its disk's "
                "root (fix: cmdline = \"root=LABEL=cloudimg-rootfs ro console=ttyS0\" or what "
                "the image's own bootloader passes, see its /proc/cmdline)"
            )
        return self

    @model_validator(mode="after")
    def _windows_only(self) -> VmSpec:
        if self.image != "windows" and (self.secure_boot or self.rdp):
            raise ValueError(
                f"secure_boot and rdp apply to image = \"windows\" only, not {self.image!r} "
                "(fix: drop them from this VM)"
            )
        return self


class RunSpec(_Strict):
    """One workload on one VM, with parameter overrides."""

    workload: Name
    vm: Name
    params: dict[str, ParamValue] = {}
    repetitions: int | None = Field(default=None, ge=1)

    @field_validator("workload", mode="before")
    @classmethod
    def _a_name_not_a_path(cls, value: object) -> object:
        # A path here would load any TOML on the host as a workload (the harness runs as root).
        if isinstance(value, str) and ("/" in value or "\\" in value or ".." in value):
            raise ValueError(
                f"{value!r} is a path; a workload is named by its file's stem (fix: copy "
                "the file into workloads/ or into a directory listed in the suite's "
                "workload_dirs, and give its name)"
            )
        return value

    #: Warm-up repetitions per boot before the measured ones (None: the workload's own).
    warmup: int | None = Field(default=None, ge=0, le=10)


class GroupSpec(_Strict):
    """VMs that run at the same time: booted together, traced by one tracer, driven apart."""

    name: Name
    description: str = ""
    vms: list[Name]


class TraceSpec(_Strict):
    """What the host tracer attaches (names or groups from the probe catalogue)."""

    enabled: bool = True
    probes: list[str] = ["default"]
    #: Probes whose kernel stacks are counted per VM, phase and probe ("stacks" = the
    #: MMU default set); each must be among the probes traced. ``name/N`` samples: a
    #: stack on every Nth event per CPU, path counts then estimates with a 95% interval;
    #: ``name@Rhz`` about R stacks a second per CPU, the period following the event rate.
    stacks: list[str] = []
    stack_depth: int = Field(default=DEFAULT_STACK_DEPTH, ge=1, le=MAX_STACK_DEPTH)
    #: Keep ``function+offset`` frames (call sites apart) instead of function names.
    stack_offsets: bool = False
    #: The tracer: "libbpf" (the kvmtrace loader, cheapest per event), "bpftrace", or
    #: "auto" (libbpf where it builds and loads, bpftrace otherwise; the result says why).
    backend: Literal["auto", "bpftrace", "libbpf"] = "auto"

    @model_validator(mode="after")
    def _known_probes(self) -> TraceSpec:
        try:
            traced = probes.select(self.probes)
            selected = {p.name for p in traced}
            stacked = set(probes.stack_periods(self.stacks, traced))
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        missing = sorted(stacked - selected)
        if missing:
            raise ValueError(
                f"stacks: {', '.join(missing)} not traced; add them to probes "
                f"(probes = {[*self.probes, *missing]!r})"
            )
        return self


class SuiteSpec(_Strict):
    """A suite: the VMs, the workloads run on them, repetitions and tracing."""

    name: Name
    description: str = ""
    #: Directories, relative to the suite file, holding workloads of its own; searched
    #: before the catalogue (workloads/), and nothing else is.
    workload_dirs: list[str] = []
    #: Measured repetitions of every run per boot (warm-ups come on top).
    repetitions: int = Field(default=1, ge=1)
    #: Boots of every VM (a VM's own ``boots`` overrides it).
    boots: int = Field(default=1, ge=1, le=100)
    vms: Annotated[list[VmSpec], Field(min_length=1)]
    runs: Annotated[list[RunSpec], Field(min_length=1)]
    groups: list[GroupSpec] = []
    trace: TraceSpec = TraceSpec()
    #: Host MMU configurations to run the suite under, in turn (`harness host plan`).
    host_configs: list[HostConfigSpec] = []

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
        """How many measured repetitions of ``run`` each boot makes."""
        return run.repetitions or self.spec.repetitions

    def warmup(self, run: RunSpec) -> int:
        """How many warm-up repetitions of ``run`` each boot makes before the measured ones."""
        return run.warmup if run.warmup is not None else self.workloads[run.workload].warmup

    def boots(self, vm: VmSpec) -> int:
        """How many times ``vm`` boots."""
        return vm.boots or self.spec.boots


#: Largest suite or workload file read (the shipped ones are a few KiB).
MAX_SPEC_BYTES = 1024 * 1024


def _read_toml(path: Path) -> dict[str, object]:
    try:
        if (size := path.stat().st_size) > MAX_SPEC_BYTES:
            raise SpecError(path, "", f"{size} bytes, more than the {MAX_SPEC_BYTES} a suite "
                            "or workload file may have", "give a suite or workload file")
        text = path.read_text()
    except OSError as exc:
        raise SpecError(path, "", f"cannot read: {exc.strerror}", "check the path") from exc
    except UnicodeDecodeError as exc:
        raise SpecError(path, "", f"not UTF-8 text: {exc}", "save the file as UTF-8") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(path, "", f"not valid TOML: {exc}", "fix the TOML syntax") from exc
    except RecursionError as exc:  # tomllib recurses once per nested array or table
        raise SpecError(path, "", "not valid TOML: nested too deep",
                        "flatten the nested arrays or inline tables") from exc


def _validated(model: type[M], path: Path, data: dict[str, object]) -> M:
    """``data`` as ``model``; a SpecError listing every problem otherwise."""
    valid, problems = _validated_all(model, path, data)
    if problems or valid is None:
        raise SpecError.combine(problems)
    return valid


def _problem(
    model: type[BaseModel], path: Path, err: ErrorDetails, loc: tuple[str | int, ...]
) -> SpecError:
    """One pydantic error as a SpecError at ``loc``, with a "did you mean" where one fits."""
    field = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc)
    field = field.replace(".[", "[")
    msg = err["msg"].removeprefix("Value error, ")
    fix = ""
    if err["type"] == "extra_forbidden" and loc and isinstance(loc[-1], str):
        known = _field_names(model, loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        fix = "remove or rename the key" + (f" (did you mean {close[0]!r}?)" if close else "")
        if known and not close:
            fix += f"; keys here: {', '.join(sorted(known))}"
    elif err["type"] == "literal_error" and isinstance(err.get("input"), str):
        choices = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
        msg += did_you_mean(str(err["input"]), choices)
    return SpecError(path, field or "(top level)", msg, fix)


def _field_names(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """The keys the model at ``loc`` (under ``model``) accepts; [] where that is not a model."""
    current: object = model
    for part in loc:
        if isinstance(part, int):
            continue  # a list element: the list's item model, found below
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        info = current.model_fields.get(part)
        if info is None:
            return []
        current = _item_model(info.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _item_model(annotation: object) -> object:
    """The model inside ``list[X]``, ``X | None`` or ``Annotated[X, ...]`` (else the type)."""
    for arg in typing.get_args(annotation):
        found = _item_model(arg)
        if isinstance(found, type) and issubclass(found, BaseModel):
            return found
    return annotation


#: Enough passes of :func:`_validated_all` for any real file (each drops a bad key).
_MAX_PASSES = 25
Loc = tuple[str | int, ...]


def _validated_all(
    model: type[M], path: Path, data: dict[str, object]
) -> tuple[M | None, list[SpecError]]:
    """The model of what is valid in ``data`` (None if nothing is) and every problem found.

    pydantic reports one table's field errors but runs its own checks (trace's
    probe names, say) only once those pass, and the cross-reference checks of
    load_suite need a whole model: one mistake hides the next. So each pass
    reports what failed, drops it (its default applies; a list entry goes) and
    validates again, until what is left is a valid model to check further.
    """
    work = copy.deepcopy(data)
    problems: list[SpecError] = []
    seen: set[str] = set()
    dropped: set[Loc] = set()
    kept: dict[Loc, list[int]] = {}  # a list's original path -> original index of each entry
    for _ in range(_MAX_PASSES):
        try:
            return model.model_validate(work), problems
        except ValidationError as exc:
            errors = exc.errors()
        targets: dict[Loc, Loc] = {}  # where to drop (now) -> the same place as written
        for err in errors:
            loc = _original_loc(tuple(err["loc"]), kept)
            # Consequences of a drop (a required key gone, a list emptied) were reported.
            consequence = err["type"] in ("missing", "too_short") and any(
                d[:len(loc)] == loc for d in dropped
            )
            if not consequence:
                problem = _problem(model, path, err, loc)
                if str(problem) not in seen:
                    seen.add(str(problem))
                    problems.append(problem)
            target = tuple(err["loc"])
            if consequence and err["type"] == "missing":
                target = target[:-1]  # a required key: the table holding it goes instead
            if target:
                targets[target] = _original_loc(target, kept)
        # Keys first, then list entries from the last: no drop shifts another's index.
        entries = sorted((t for t in targets if isinstance(t[-1], int)), key=_sort_key,
                         reverse=True)
        progress = False
        for target in [*(t for t in targets if isinstance(t[-1], str)), *entries]:
            if _drop(work, target, kept):
                dropped.add(targets[target])
                progress = True
        if not progress:
            break
    return None, problems


def _sort_key(loc: Loc) -> tuple[tuple[int, int, str], ...]:
    """Orders locations with mixed str and int parts (indices numerically)."""
    return tuple((1, p, "") if isinstance(p, int) else (0, 0, p) for p in loc)


def _original_loc(loc: Loc, kept: dict[Loc, list[int]]) -> Loc:
    """``loc`` in the data as written, before list entries were dropped."""
    out: list[str | int] = []
    for part in loc:
        if isinstance(part, int) and (m := kept.get(tuple(out))) is not None and part < len(m):
            part = m[part]
        out.append(part)
    return tuple(out)


def _drop(work: dict[str, object], loc: Loc, kept: dict[Loc, list[int]]) -> bool:
    """Remove the key or list entry at ``loc`` from ``work``; False if there is none."""
    parent: object = work
    for part in loc[:-1]:
        in_dict = isinstance(parent, dict) and isinstance(part, str) and part in parent
        in_list = isinstance(parent, list) and isinstance(part, int) and part < len(parent)
        if not (in_dict or in_list):
            return False
        parent = parent[part]  # type: ignore[index]
    last = loc[-1]
    if isinstance(parent, dict) and isinstance(last, str) and last in parent:
        del parent[last]
        return True
    if isinstance(parent, list) and isinstance(last, int) and last < len(parent):
        where = _original_loc(loc[:-1], kept)
        kept.setdefault(where, list(range(len(parent)))).pop(last)
        del parent[last]
        return True
    return False


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


_WORKLOAD_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


def workload_path(name: str, search: list[Path]) -> Path | None:
    """Where the workload called ``name`` is defined, first hit in ``search``.

    Only a workload name (never a path) is looked up, and only in ``search``.
    """
    if not _WORKLOAD_NAME.fullmatch(name):
        return None
    return next((d / f"{name}.toml" for d in search if (d / f"{name}.toml").is_file()), None)


def workload_search(suite: Path, dirs: object) -> tuple[list[Path], list[SpecError]]:
    """Where a suite's workloads are looked up: its ``workload_dirs``, then the catalogue.

    Never the suite's own or parent directory unless it names them: a suite in
    /tmp/x must not pick up /tmp/<workload>.toml, nor a suite file as a workload.
    """
    search: list[Path] = []
    problems: list[SpecError] = []
    for i, entry in enumerate(dirs if isinstance(dirs, list) else []):
        field = f"workload_dirs[{i}]"
        if not isinstance(entry, str):
            continue  # the schema reports it
        if not entry or Path(entry).is_absolute():
            problems.append(SpecError(
                suite, field, f"{entry!r} is not a relative directory",
                "give a directory relative to the suite file, e.g. \"..\" or \"workloads\"",
            ))
            continue
        d = (suite.parent / entry).resolve()
        if not d.is_dir():
            problems.append(SpecError(
                suite, field, f"{d} is not a directory", "create it or remove the entry",
            ))
            continue
        search.append(d)
    return [*search, WORKLOADS_DIR], problems


def _is_suite_file(path: Path) -> bool:
    """Whether ``path`` is a suite (it has [[vms]] or [[runs]]), not a workload."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return "phases" not in data and ("runs" in data or "vms" in data)


def _unknown_workload(path: Path, field: str, name: str, search: list[Path]) -> SpecError:
    """The error for a workload name found nowhere, with the closest known names."""
    known = available_workloads(search)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    where = ", ".join(str(d) for d in search)
    return SpecError(
        path, field, f"unknown workload {name!r} ({hint}looked in {where})",
        f"use one of: {', '.join(known) or 'none'}; or add {name}.toml to workloads/ "
        "(or to a directory listed in workload_dirs)",
    )


def available_workloads(search: list[Path]) -> list[str]:
    """Names of every workload file in ``search``."""
    return sorted({p.stem for d in search if d.is_dir() for p in d.glob("*.toml")})


def load_suite(path: Path, overrides: Sequence[str] = ()) -> Suite:
    """Load a suite and every workload it names, validating all cross-references.

    ``overrides`` are ``WORKLOAD.PARAM=VALUE`` strings (``harness run --set``)
    applied to every run of that workload. Every problem found is reported in
    one SpecError.
    """
    path = path.resolve()
    data = _read_toml(path)
    search, dir_problems = workload_search(path, data.get("workload_dirs"))
    spec, model_problems = _validated_all(SuiteSpec, path, data)
    if spec is None:
        # Report the runs' parameter problems too, so one pass shows every mistake.
        raise SpecError.combine(
            [*model_problems, *dir_problems, *_raw_param_problems(path, data, search)]
        )
    workloads: dict[str, WorkloadSpec] = {}
    problems: list[SpecError] = [*model_problems, *dir_problems]
    vm_names = [vm.name for vm in spec.vms]
    for i, run in enumerate(spec.runs):
        if run.vm not in vm_names:
            problems.append(SpecError(
                path,
                f"runs[{i}].vm",
                f"no VM named {run.vm!r}{did_you_mean(run.vm, vm_names)}",
                f"use one of: {', '.join(vm_names)}",
            ))
        if run.workload not in workloads:
            wpath = workload_path(run.workload, search)
            if wpath is None:
                problems.append(_unknown_workload(path, f"runs[{i}].workload", run.workload,
                                                  search))
                continue
            if wpath.resolve() == path or _is_suite_file(wpath):
                problems.append(SpecError(
                    path, f"runs[{i}].workload",
                    f"{run.workload!r} names {wpath}, which is a suite, not a workload",
                    "name a workload (harness workloads lists them)",
                ))
                continue
            try:
                workloads[run.workload] = load_workload(wpath)
            except SpecError as exc:
                problems.append(exc)
                continue
        workload = workloads.get(run.workload)
        if workload is None:
            continue  # its own file's errors are already reported
        resizes = any(p.balloon_percent is not None for p in workload.phases)
        if resizes and run.vm in vm_names and not spec.vm(run.vm).balloon:
            problems.append(SpecError(
                path,
                f"runs[{i}]",
                f"workload {workload.name!r} resizes guest memory (balloon_percent) but VM "
                f"{run.vm!r} has no balloon device",
                f"set balloon = true in the [[vms]] entry named {run.vm!r}",
            ))
        if run.vm in vm_names and IMAGE_GUEST_KIND[spec.vm(run.vm).image] != workload.guest:
            vm = spec.vm(run.vm)
            problems.append(SpecError(
                path,
                f"runs[{i}]",
                f"workload {workload.name!r} is for {workload.guest} guests "
                f"but VM {vm.name!r} boots the {vm.image} image",
                f"run it on a VM with image = {workload.guest!r}",
            ))
        run_problems = [
            SpecError(path, f"runs[{i}].params.{name}", *problem)
            for name, value in run.params.items()
            if (problem := workload.param_problem(name, value)) is not None
        ]
        problems.extend(run_problems)
        if workload.guest == "paging" and not run_problems:
            try:
                workload.paging_phases(run.params)
            except PagingImageError as exc:
                problems.append(SpecError(
                    path, f"runs[{i}].params",
                    f"workload {workload.name!r} with these parameters: {exc}",
                    "keep K, CR3 writes and pages within the limits named",
                ))
    problems.extend(_check_groups(path, spec))
    spec = _cloud_disks(path, spec, problems)
    vm_sets = [o for o in overrides if o.startswith(VM_OVERRIDE_PREFIX)]
    overrides = [o for o in overrides if not o.startswith(VM_OVERRIDE_PREFIX)]
    if overrides:  # checked beside the suite's own problems: one pass shows them all
        spec, override_problems = _apply_overrides(path, spec, workloads, overrides)
        problems.extend(override_problems)
    set_by: dict[tuple[str, str], str] = {}
    if vm_sets:
        spec, vm_problems = _apply_vm_overrides(path, spec, vm_sets, set_by)
        problems.extend(vm_problems)
    spec = _guest_kernels(path, spec, problems, set_by)
    if problems:
        raise SpecError.combine(problems)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return Suite(spec=spec, path=path, sha256=sha, workloads=workloads)


def _cloud_disks(path: Path, spec: SuiteSpec, problems: list[SpecError]) -> SuiteSpec:
    """Cloud VMs' disks read from the suite file's directory, each checked before any boot."""
    vms = list(spec.vms)
    for i, vm in enumerate(vms):
        if vm.image != "cloud" or vm.disk is None:
            continue
        # Resolved: the overlays name it as their backing file, whatever links led to it.
        disk = (path.parent / vm.disk).resolve()
        try:
            check_disk(disk)
        except DiskError as exc:
            problems.append(SpecError(path, f"vms[{i}].disk", exc.reason, exc.fix))
        vms[i] = vm.model_copy(update={"disk": disk})
    return spec.model_copy(update={"vms": vms})


def _raw_param_problems(path: Path, data: dict[str, object], search: list[Path]) -> list[SpecError]:
    """Parameter problems of ``[[runs]]`` in a suite that failed validation elsewhere."""
    problems: list[SpecError] = []
    runs = data.get("runs")
    for i, run in enumerate(runs if isinstance(runs, list) else []):
        if not isinstance(run, dict) or not isinstance(params := run.get("params", {}), dict):
            continue
        wpath = workload_path(str(run.get("workload")), search)
        if wpath is None or wpath.resolve() == path or _is_suite_file(wpath):
            continue  # reported once the suite itself is valid
        try:
            workload = load_workload(wpath)
        except SpecError:
            continue  # likewise
        for name, value in params.items():
            if (problem := workload.param_problem(name, value)) is not None:
                problems.append(SpecError(path, f"runs[{i}].params.{name}", *problem))
    return problems


def _apply_overrides(
    path: Path, spec: SuiteSpec, workloads: dict[str, WorkloadSpec], overrides: Sequence[str]
) -> tuple[SuiteSpec, list[SpecError]]:
    """The suite with ``WORKLOAD.PARAM=VALUE`` overrides applied to its runs, or the problems."""
    problems: list[SpecError] = []
    changes: dict[str, dict[str, ParamValue]] = {}
    for text in overrides:
        field = f"--set {text}"
        target, sep, raw = text.partition("=")
        wname, dot, pname = target.partition(".")
        if not sep or not dot or not wname or not pname:
            problems.append(SpecError(
                path, field, "expected WORKLOAD.PARAM=VALUE",
                "write e.g. --set page-touch.mib=64",
            ))
            continue
        workload = workloads.get(wname)
        if workload is None and any(run.workload == wname for run in spec.runs):
            continue  # the suite runs it, but its file is broken: reported already
        if workload is None:
            problems.append(SpecError(
                path, field,
                f"the suite runs no workload {wname!r}{did_you_mean(wname, workloads)}",
                f"use one of: {', '.join(sorted(workloads))}",
            ))
            continue
        if pname not in workload.params:
            reason, fix = workload.param_problem(pname, raw) or ("", "")
            problems.append(SpecError(path, field, reason, fix))
            continue
        param = workload.params[pname]
        try:
            changes.setdefault(wname, {})[pname] = param.parse(raw)
        except ValueError as exc:
            problems.append(SpecError(
                path, field, f"workload {wname!r} parameter {pname!r}: {exc}",
                f"give {pname} {param.allowed()}",
            ))
    runs = [
        run.model_copy(update={"params": {**run.params, **changes.get(run.workload, {})}})
        for run in spec.runs
    ]
    return spec.model_copy(update={"runs": runs}), problems


#: ``--set vm.FIELD=VALUE`` (a suite of one VM) or ``--set vm.NAME.FIELD=VALUE``: a VM
#: field, never a workload parameter (no workload may be called "vm").
VM_OVERRIDE_PREFIX = "vm."


def _apply_vm_overrides(
    path: Path, spec: SuiteSpec, overrides: Sequence[str],
    set_by: dict[tuple[str, str], str] | None = None,
) -> tuple[SuiteSpec, list[SpecError]]:
    """The suite with ``vm.[NAME.]FIELD=VALUE`` overrides applied to its VMs, or the problems.

    A path is relative to the current directory (it was typed there); an empty value
    unsets the field (the image's own kernel again). Setting kernel or kernel_package
    replaces the other (and kernel_package the initrd): one switch changes the kernel.
    """
    problems: list[SpecError] = []
    set_by = {} if set_by is None else set_by
    vms = {vm.name: vm.model_dump(exclude_unset=True) for vm in spec.vms}
    fields = ", ".join(VM_OVERRIDE_FIELDS)
    for text in overrides:
        field = f"--set {text}"
        target, sep, raw = text.partition("=")
        parts = target.split(".")
        if not sep or len(parts) not in (2, 3) or not all(parts):
            problems.append(SpecError(
                path, field, "expected vm.FIELD=VALUE or vm.NAME.FIELD=VALUE",
                "write e.g. --set vm.kernel=/path/to/bzImage (a suite of one VM) or "
                "--set vm.NAME.kernel=/path/to/bzImage",
            ))
            continue
        if len(parts) == 2:
            if len(vms) != 1:
                problems.append(SpecError(
                    path, field, f"the suite has {len(vms)} VMs ({', '.join(vms)}): say which",
                    f"write --set vm.NAME.{parts[1]}=VALUE with NAME one of: {', '.join(vms)}",
                ))
                continue
            name, key = next(iter(vms)), parts[1]
        else:
            name, key = parts[1], parts[2]
        if name not in vms:
            problems.append(SpecError(
                path, field, f"the suite has no VM {name!r}{did_you_mean(name, vms)}",
                f"use one of: {', '.join(vms)}",
            ))
            continue
        if key not in VM_OVERRIDE_FIELDS:
            problems.append(SpecError(
                path, field,
                f"{key!r} is not a VM field --set can change"
                f"{did_you_mean(key, VM_OVERRIDE_FIELDS)}",
                f"use one of: {fields} (other VM fields: edit the suite)",
            ))
            continue
        vm = vms[name]
        image = vm.get("image", "linux")
        if image not in GUEST_KERNEL_IMAGES:
            problems.append(SpecError(
                path, field,
                f"VM {name!r} boots the {image} image; {key} applies to Linux VMs booted by "
                f"the harness (image = {' or '.join(repr(i) for i in GUEST_KERNEL_IMAGES)})",
                "set it on a Linux VM of the suite, or drop this --set",
            ))
            continue
        value: object = raw or None
        if value is not None and key in ("kernel", "initrd"):
            value = Path(raw) if Path(raw).is_absolute() else Path.cwd() / raw
        vm[key] = value
        set_by[(name, key)] = field
        if key == "kernel" and value is not None:
            vm.pop("kernel_package", None)
        if key == "kernel_package" and value is not None:
            vm.pop("kernel", None)
            vm.pop("initrd", None)
    if problems:
        return spec, problems
    new_vms: list[VmSpec] = []
    for i, (name, data) in enumerate(vms.items()):
        try:
            new_vms.append(VmSpec.model_validate(data))
        except ValidationError as exc:
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"])
                problems.append(SpecError(
                    path, set_by.get((name, where), f"vms[{i}].{where}" if where else f"vms[{i}]"),
                    err["msg"].removeprefix("Value error, "),
                ))
            new_vms.append(spec.vms[i])
    return spec.model_copy(update={"vms": new_vms}), problems


def _guest_kernels(
    path: Path, spec: SuiteSpec, problems: list[SpecError],
    set_by: dict[tuple[str, str], str] | None = None,
) -> SuiteSpec:
    """Guest kernel and initrd files resolved against the suite's directory and checked
    (a bzImage, a readable initramfs) before anything boots; a problem names the
    ``--set`` that gave the file (``set_by``), else the suite's field."""
    from harness.image.kernel import KernelFileError, check_initrd, kernel_release

    vms = list(spec.vms)
    for i, vm in enumerate(vms):
        update: dict[str, Path] = {}
        for key in ("kernel", "initrd"):
            given: Path | None = getattr(vm, key)
            if given is None:
                continue
            file = given if given.is_absolute() else path.parent / given
            try:
                if key == "kernel":
                    kernel_release(file)
                else:
                    check_initrd(file)
            except KernelFileError as exc:
                field = (set_by or {}).get((vm.name, key), f"vms[{i}].{key}")
                problems.append(SpecError(path, field, exc.reason, exc.fix))
            update[key] = file
        if update:
            vms[i] = vm.model_copy(update=update)
    return spec.model_copy(update={"vms": vms})


def _check_groups(path: Path, spec: SuiteSpec) -> list[SpecError]:
    """Each group names two or more VMs of the suite, each with work, each in one group only."""
    problems: list[SpecError] = []
    vm_names = [vm.name for vm in spec.vms]
    with_runs = {run.vm for run in spec.runs}
    group_of: dict[str, str] = {}
    seen_groups: set[str] = set()
    for i, group in enumerate(spec.groups):
        where = f"groups[{i}]"
        if group.name in seen_groups:
            problems.append(SpecError(
                path, f"{where}.name", f"group {group.name!r} is defined twice",
                "give each [[groups]] entry its own name",
            ))
            continue
        seen_groups.add(group.name)
        if len(group.vms) < 2:
            problems.append(SpecError(
                path, f"{where}.vms",
                f"group {group.name!r} lists {len(group.vms)} VM(s); a group runs VMs at the "
                "same time, so it needs at least two",
                "list two or more VMs, or remove the group (a VM on its own runs alone)",
            ))
            continue
        for name in group.vms:
            if name not in vm_names:
                problems.append(SpecError(
                    path, f"{where}.vms", f"no VM named {name!r}{did_you_mean(name, vm_names)}",
                    f"use names from [[vms]]: {', '.join(vm_names)}",
                ))
                continue
            if name in group_of:
                other = group_of[name]
                problems.append(SpecError(
                    path, f"{where}.vms",
                    f"VM {name!r} is already in group {other!r}"
                    if other != group.name
                    else f"VM {name!r} is listed twice",
                    "a VM runs in one group once; define another [[vms]] entry to run "
                    "the same kind of guest twice",
                ))
                continue
            if name not in with_runs:
                problems.append(SpecError(
                    path, f"{where}.vms", f"VM {name!r} has no runs, so it would not boot",
                    f'add a [[runs]] entry with vm = "{name}", or leave it out of the group',
                ))
                continue
            group_of[name] = group.name
    return problems


def _param_ref(count: str) -> str:
    """``"{name}"`` -> ``name`` (anything else -> itself, which names no parameter)."""
    m = re.fullmatch(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", count.strip())
    return m.group(1) if m else count


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
            pattern = re.compile(rf"^\s*({k}\s*=|\[([\w.-]+\.)?{k}(\.[\w.-]+)?\])")
            hit = next((n for n in range(cursor, len(lines)) if pattern.match(lines[n])), None)
            if hit is None:
                return found
            cursor = hit
        found = cursor + 1
    return found
