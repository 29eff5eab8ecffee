"""Host MMU configurations: plan, apply between VM boots, verify from sysfs, restore.

A suite may list host configurations (``[[host_configs]]``): KVM module
parameters (``kvm_intel.ept``, ``kvm.tdp_mmu``, ``kvm.nx_huge_pages``, ...),
the host's transparent-hugepage mode and defrag policy, and reserved hugetlb
pages for hugetlbfs-backed guest memory. For each setting the planner reads
the host (under ``root``, ``/`` by default) and decides how it can be changed:

* ``unchanged``: the host already has the wanted value;
* ``sysfs``: the file is writable (THP mode, ``nr_hugepages``, module
  parameters registered with mode 0644 such as ``kvm.nx_huge_pages`` on most
  kernels): one write, then a read-back;
* ``reload``: a read-only parameter of a loadable module: ``modprobe -r`` of
  the vendor module (and ``kvm`` when a ``kvm.*`` parameter changes), then
  ``modprobe`` with the parameters. Allowed only while no VM holds the module
  (its ``refcnt`` is 0), checked right before the reload;
* ``impossible``: the module is built into the kernel or the parameter does
  not exist; the plan says what to do instead (kernel command line).

:class:`HostConfigurator` applies a plan, verifies every setting by reading
it back, records before/after values (:class:`HostConfigRecord`, for result
provenance) and restores the original values in reverse order: at the end,
on any exception, on SIGINT and (in the main thread, when nobody else handles
it) SIGTERM. Before changing anything it writes a restore record: the original
values, which modules were loaded with which parameters (so that a reload that
fails half-way can be put back without the sysfs directories of the modules it
unloaded) and the owner process (pid, start time, boot). A run killed with
SIGKILL is undone later by :func:`reap_leftovers` (the next host-changing run)
or :func:`restore_from_file` (``harness host restore``); a record whose owner
still lives is never undone by another process. One host-changing run at a
time: :func:`host_change_session` holds an exclusive lock for its duration.

Every value a suite gives is checked against a strict pattern before anything
runs (:func:`check_param`): it becomes exactly one argv element of modprobe,
never split by a shell.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from harness.host import owner
from harness.host.facts import parse_thp_mode
from harness.host.owner import ProcessId

Method = Literal["unchanged", "sysfs", "reload", "impossible"]
ThpMode = Literal["always", "madvise", "never"]
ThpDefrag = Literal["always", "defer", "defer+madvise", "madvise", "never"]
ParamValue = str | int | bool

THP_ENABLED: Final = "sys/kernel/mm/transparent_hugepage/enabled"
THP_DEFRAG: Final = "sys/kernel/mm/transparent_hugepage/defrag"
HUGEPAGES: Final = "sys/kernel/mm/hugepages/hugepages-{kib}kB/nr_hugepages"
SYS_MODULE: Final = "sys/module"
#: Vendor modules that depend on ``kvm``: unloaded first, loaded last.
VENDOR_MODULES: Final = ("kvm_intel", "kvm_amd")

# \A...\Z, not ^...$: "$" also matches before a trailing newline.
_PARAM_KEY = re.compile(r"\A(kvm|kvm_intel|kvm_amd)\.([a-z0-9_]{1,64})\Z")
#: Any module parameter value passed to modprobe: one token, no space, no "=", no quote.
_VALUE = re.compile(r"\A[A-Za-z0-9_.,-]{1,64}\Z")
_TRUE: Final = frozenset({"1", "y", "yes", "on", "true", "force"})
_FALSE: Final = frozenset({"0", "n", "no", "off", "false", "never"})

#: Where restore records wait (one ``<pid>.json`` each) and the lock of host-changing runs,
#: both under the cache directory.
HOST_RESTORE_DIR: Final = "host-config-restore"
HOST_LOCK_FILE: Final = "host-config.lock"
#: The single restore file of harness versions before owner records (read, then removed).
LEGACY_RESTORE_FILE: Final = "host-config-restore.json"

_BOOL_TEXT: Final = frozenset({"Y", "N", "y", "n", "1", "0"})
_UINT_MAX: Final = 2**32 - 1


@dataclass(frozen=True)
class ParamKind:
    """What values a known KVM parameter takes: bool, an integer range, or named choices."""

    kind: Literal["bool", "int", "choice"]
    low: int = 0
    high: int = _UINT_MAX
    choices: tuple[str, ...] = ()
    also_bool: bool = False  # a choice parameter that takes booleans as well


_B = ParamKind("bool")
_U = ParamKind("int")
#: Parameters of kvm, kvm_intel and kvm_amd (Linux 5.15 - 6.18) and the values each takes;
#: any other parameter's value must match the general pattern.
KNOWN_PARAMS: Final[dict[str, ParamKind]] = {
    **{f"kvm.{p}": _B for p in (
        "tdp_mmu", "ignore_msrs", "report_ignored_msrs", "mmio_caching", "eager_page_split",
        "enable_pmu", "enable_vmware_backdoor", "kvmclock_periodic_sync", "vector_hashing",
        "mitigate_smt_rsb", "allow_unsafe_mappings")},
    **{f"kvm.{p}": _U for p in (
        "nx_huge_pages_recovery_ratio", "nx_huge_pages_recovery_period_ms", "halt_poll_ns",
        "halt_poll_ns_grow", "halt_poll_ns_grow_start", "halt_poll_ns_shrink",
        "min_timer_period_us", "tsc_tolerance_ppm")},
    "kvm.nx_huge_pages": ParamKind("choice", choices=("off", "force", "auto", "never"),
                                   also_bool=True),
    "kvm.force_emulation_prefix": ParamKind("int", 0, 3),
    "kvm.lapic_timer_advance_ns": ParamKind("int", -1, 10_000),
    "kvm.pi_inject_timer": ParamKind("int", -1, 1),
    **{f"kvm_intel.{p}": _B for p in (
        "ept", "eptad", "unrestricted_guest", "flexpriority", "vpid", "vnmi", "enable_apicv",
        "enable_ipiv", "enable_shadow_vmcs", "nested", "nested_early_check", "pml",
        "preemption_timer", "emulate_invalid_guest_state", "fasteoi",
        "allow_smaller_maxphyaddr", "dump_invalid_vmcs", "error_on_inconsistent_vmcs_config",
        "sgx", "enable_passthrough_msrs")},
    **{f"kvm_intel.{p}": _U for p in (
        "ple_gap", "ple_window", "ple_window_grow", "ple_window_shrink", "ple_window_max")},
    "kvm_intel.vmentry_l1d_flush": ParamKind("choice", choices=("always", "cond", "never")),
    "kvm_intel.pt_mode": ParamKind("int", 0, 1),
    **{f"kvm_amd.{p}": _B for p in (
        "npt", "avic", "force_avic", "nrips", "vls", "vgif", "lbrv", "sev", "sev_es", "sev_snp",
        "tsc_scaling", "intercept_smi", "vnmi", "dump_invalid_vmcb")},
    "kvm_amd.nested": ParamKind("int", 0, 1),
    **{f"kvm_amd.{p}": _U for p in (
        "pause_filter_thresh", "pause_filter_count", "pause_filter_count_grow",
        "pause_filter_count_shrink", "pause_filter_count_max")},
}


def check_param(key: str, value: object) -> str | None:
    """Why ``key = value`` cannot be a KVM module parameter, with the fix; None when it can.

    Keys are ``module.parameter`` of kvm, kvm_intel or kvm_amd. Known
    parameters take only their own kind of value (bool, integer range, named
    choices); any other takes one token of ``[A-Za-z0-9_.,-]``, at most 64
    characters. The value becomes one argv element ``param=value`` of modprobe.
    """
    if not isinstance(key, str) or _PARAM_KEY.match(key) is None:
        return (f"{key!r} is not 'module.parameter' with module kvm, kvm_intel or kvm_amd and a "
                "parameter of [a-z0-9_] (fix: e.g. \"kvm_intel.ept\" = 0)")
    kind = KNOWN_PARAMS.get(key)
    if isinstance(value, bool):
        if kind is None or kind.kind == "bool" or kind.also_bool:
            return None
        if kind.kind == "int":
            return f"{key}: takes an integer in {kind.low}..{kind.high}, not {value!r} " \
                f"(fix: give {key} an integer in {kind.low}..{kind.high})"
    if kind is not None and kind.kind == "bool":
        if (isinstance(value, int) and value in (0, 1)) or value in _BOOL_TEXT:
            return None
        return f"{key}: takes true or false, not {value!r} (fix: give {key} true or false)"
    if kind is not None and kind.kind == "int":
        number = value if isinstance(value, int) else (
            int(value) if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,10}", value)
            else None)
        if number is not None and kind.low <= number <= kind.high:
            return None
        return (f"{key}: takes an integer in {kind.low}..{kind.high}, not {value!r} "
                f"(fix: give {key} an integer in {kind.low}..{kind.high})")
    if kind is not None and kind.kind == "choice":
        if value in kind.choices or (kind.also_bool and (
                value in _BOOL_TEXT or (isinstance(value, int) and value in (0, 1)))):
            return None
        allowed = ", ".join(repr(c) for c in kind.choices) + (", true, false"
                                                                if kind.also_bool else "")
        return f"{key}: takes one of {allowed}, not {value!r} (fix: give {key} one of them)"
    if isinstance(value, int):
        return None if -(2**63) <= value < 2**63 else (
            f"{key}: {value} does not fit 64 bits (fix: give a smaller number)")
    if isinstance(value, str) and _VALUE.match(value):
        return None
    return (f"{key}: value {value!r} is not one token of letters, digits and _.,- (at most 64; "
            "no spaces: it becomes one modprobe argument) (fix: give one such value; a second "
            "parameter is a key of its own)")


class HostConfigError(RuntimeError):
    """A host configuration cannot be planned, applied or verified; the message says why."""


class HostConfigSpec(BaseModel):
    """One host configuration of a suite (``[[host_configs]]``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    description: str = ""
    kvm_params: dict[str, ParamValue] = Field(
        default_factory=dict,
        description='"module.parameter" -> value, e.g. "kvm_intel.ept" = 0, "kvm.tdp_mmu" = 1',
    )
    thp: ThpMode | None = Field(default=None, description="host THP mode (None: leave as is)")
    thp_defrag: ThpDefrag | None = None
    hugepages_2m: int | None = Field(
        default=None, ge=0, description="2 MiB hugetlb pages to reserve (guest hugetlbfs backing)"
    )
    hugepages_1g: int | None = Field(default=None, ge=0, description="1 GiB hugetlb pages")
    guest_hugepages: Literal["2M", "1G"] | None = Field(
        default=None,
        description="back every VM's memory with hugetlbfs pages of this size (libvirt "
        "<memoryBacking>); reserve them with hugepages_2m / hugepages_1g",
    )

    @field_validator("kvm_params")
    @classmethod
    def _strict_params(cls, params: dict[str, ParamValue]) -> dict[str, ParamValue]:
        problems = [p for k, v in params.items() if (p := check_param(k, v)) is not None]
        if problems:
            raise ValueError("; ".join(problems))
        return params

    @property
    def guest_hugepages_kib(self) -> int | None:
        """``guest_hugepages`` in KiB, as libvirt's ``<page size=... unit='KiB'>`` wants it."""
        return {None: None, "2M": 2048, "1G": 1048576}[self.guest_hugepages]

    def settings(self) -> list[tuple[str, str]]:
        """``(key, wanted value)`` of every setting, in application order."""
        out = [(k, _text(v)) for k, v in self.kvm_params.items()]
        if self.thp is not None:
            out.append(("thp.enabled", self.thp))
        if self.thp_defrag is not None:
            out.append(("thp.defrag", self.thp_defrag))
        if self.hugepages_2m is not None:
            out.append(("hugepages.2048kB", str(self.hugepages_2m)))
        if self.hugepages_1g is not None:
            out.append(("hugepages.1048576kB", str(self.hugepages_1g)))
        return out


def _text(v: ParamValue) -> str:
    if isinstance(v, bool):
        return "Y" if v else "N"
    return str(v)


def normalize(value: str) -> str:
    """A parameter value as sysfs shows it: booleans as Y/N, anything else stripped."""
    v = value.strip()
    if v.lower() in _TRUE:
        return "Y"
    if v.lower() in _FALSE:
        return "N"
    return v


@dataclass(frozen=True)
class PlannedSetting:
    """One setting: where it lives, what it is, what it should be, and how it gets there."""

    key: str
    path: Path
    current: str | None
    wanted: str
    method: Method
    why: str

    @property
    def module(self) -> str | None:
        """The module of a ``module.param`` key, else None."""
        m = _PARAM_KEY.match(self.key)
        return m.group(1) if m else None

    @property
    def param(self) -> str | None:
        """The parameter of a ``module.param`` key, else None."""
        m = _PARAM_KEY.match(self.key)
        return m.group(2) if m else None


@dataclass(frozen=True)
class Reload:
    """Unload ``unload`` (in order), then load ``load`` (module, params) in order."""

    unload: tuple[str, ...]
    load: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]

    def commands(self) -> list[list[str]]:
        """The exact commands, in order; each parameter one argv element."""
        cmds = [["modprobe", "-r", *self.unload]]
        for module, params in self.load:
            cmds.append(load_command(module, params))
        return cmds


def load_command(module: str, params: Sequence[tuple[str, str]]) -> list[str]:
    """``modprobe MODULE p=v ...``; refuses (HostConfigError) a value that is not one token."""
    argv = ["modprobe", module]
    for p, v in params:
        if _PARAM_KEY.match(f"{module}.{p}") is None or _VALUE.match(v) is None:
            raise HostConfigError(
                f"{module}.{p}: refusing to pass {v!r} to modprobe (not one token of "
                "[A-Za-z0-9_.,-]); set it by hand if it is right"
            )
        argv.append(f"{p}={v}")
    return argv


@dataclass(frozen=True)
class HostPlan:
    """What applying a :class:`HostConfigSpec` on this host would do."""

    name: str
    settings: tuple[PlannedSetting, ...]
    reload: Reload | None
    #: Things the plan checked but does not change (e.g. a hugetlbfs mount for libvirt).
    notes: tuple[str, ...] = ()
    guest_hugepages_kib: int | None = None

    @property
    def impossible(self) -> list[PlannedSetting]:
        """Settings this host cannot take."""
        return [s for s in self.settings if s.method == "impossible"]

    @property
    def changes(self) -> list[PlannedSetting]:
        """Settings that would be changed."""
        return [s for s in self.settings if s.method in ("sysfs", "reload")]

    def commands(self) -> list[str]:
        """Every change as a shell command, in the order it would run.

        Module reloads come first: a reload resets the module's writable
        parameters too, so those are written after it.
        """
        out = [] if self.reload is None else [" ".join(c) for c in self.reload.commands()]
        out += [f"echo {s.wanted} > /{_rel(s.path)}" for s in self.settings if s.method == "sysfs"]
        return out

    def describe(self) -> str:
        """Human-readable plan: one line per setting, then the commands."""
        lines = [f"host configuration {self.name!r}:"]
        for s in self.settings:
            lines.append(
                f"  {s.key}: {s.current if s.current is not None else '(absent)'} -> "
                f"{s.wanted}  [{s.method}] {s.why}"
            )
        lines += [f"  note: {n}" for n in self.notes]
        cmds = self.commands()
        if self.impossible:
            lines.append("  cannot be applied on this host (see above); nothing would run")
            return "\n".join(lines)
        lines.append("  commands:" if cmds else "  commands: none (nothing to change)")
        lines += [f"    {c}" for c in cmds]
        return "\n".join(lines)


def _rel(path: Path) -> str:
    """``path`` without the planner's root, for display (``/sys/...``)."""
    parts = path.parts
    i = parts.index("sys") if "sys" in parts else 0
    return "/".join(parts[i:])


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _writable(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & 0o222)
    except OSError:
        return False


def module_is_loadable(root: Path, module: str) -> bool:
    """True for a loaded module (``initstate`` exists); built-in modules have none."""
    return (root / SYS_MODULE / module / "initstate").exists()


def module_refcnt(root: Path, module: str) -> int | None:
    """``/sys/module/<m>/refcnt`` (open /dev/kvm and VMs hold the vendor module), or None."""
    text = _read(root / SYS_MODULE / module / "refcnt")
    return int(text) if text is not None and text.isdigit() else None


def _plan_setting(root: Path, key: str, wanted: str) -> PlannedSetting:
    if key in ("thp.enabled", "thp.defrag"):
        path = root / (THP_ENABLED if key == "thp.enabled" else THP_DEFRAG)
        current = parse_thp_mode(_read(path))
        if current is None:
            return PlannedSetting(key, path, None, wanted, "impossible",
                                  f"/{_rel(path)} is missing: kernel without THP")
        if current == wanted:
            return PlannedSetting(key, path, current, wanted, "unchanged", "already set")
        return PlannedSetting(key, path, current, wanted, "sysfs", "runtime sysfs write")
    if key.startswith("hugepages."):
        kib = key.split(".", 1)[1].removesuffix("kB")
        path = root / HUGEPAGES.format(kib=kib)
        current = _read(path)
        if current is None:
            return PlannedSetting(key, path, None, wanted, "impossible",
                                  f"/{_rel(path)} is missing: no hugetlb pages of that size")
        if current == wanted:
            return PlannedSetting(key, path, current, wanted, "unchanged", "already reserved")
        return PlannedSetting(key, path, current, wanted, "sysfs",
                              "runtime sysfs write; the kernel may reserve fewer (verified)")
    m = _PARAM_KEY.match(key)
    if m is None:
        raise HostConfigError(
            f"kvm_params: {key!r} is not 'module.parameter' with module kvm, kvm_intel or "
            "kvm_amd (e.g. \"kvm_intel.ept\" = 0)"
        )
    module, param = m.groups()
    path = root / SYS_MODULE / module / "parameters" / param
    current = _read(path)
    if current is None:
        loaded = (root / SYS_MODULE / module).is_dir()
        why = (f"module {module} has no parameter {param!r} on this kernel" if loaded
               else f"module {module} is not loaded (wrong CPU vendor, or not built)")
        return PlannedSetting(key, path, None, wanted, "impossible", why)
    if normalize(current) == normalize(wanted):
        return PlannedSetting(key, path, current, wanted, "unchanged", "already set")
    if _writable(path):
        return PlannedSetting(key, path, current, wanted, "sysfs",
                              "parameter is writable at run time")
    if not module_is_loadable(root, module):
        return PlannedSetting(
            key, path, current, wanted, "impossible",
            f"{module} is built into this kernel (no /sys/module/{module}/initstate) and "
            f"{param} is read-only: boot with {key}={wanted} on the kernel command line",
        )
    return PlannedSetting(key, path, current, wanted, "reload",
                          f"read-only parameter: reload {module} with {param}={wanted}")


def _reload_for(root: Path, settings: Sequence[PlannedSetting]) -> Reload | None:
    by_module: dict[str, list[tuple[str, str]]] = {}
    for s in settings:
        if s.method == "reload" and s.module is not None and s.param is not None:
            by_module.setdefault(s.module, []).append((s.param, s.wanted))
    if not by_module:
        return None
    vendors = [v for v in VENDOR_MODULES if (root / SYS_MODULE / v).is_dir()]
    if "kvm" in by_module:
        # kvm can only go once its vendor module is gone, and the vendor comes back after it.
        unload = (*vendors, "kvm")
        load = [("kvm", tuple(by_module.get("kvm", [])))]
        load += [(v, tuple(by_module.get(v, []))) for v in vendors]
    else:
        mods = [m for m in VENDOR_MODULES if m in by_module]
        unload = tuple(mods)
        load = [(m, tuple(by_module[m])) for m in mods]
    return Reload(unload=tuple(unload), load=tuple(load))


def plan(spec: HostConfigSpec, root: Path = Path("/")) -> HostPlan:
    """Read the host under ``root`` and decide how each setting of ``spec`` would be applied.

    Changes nothing. Raises :class:`HostConfigError` for a malformed key.
    """
    settings = tuple(_plan_setting(root, k, v) for k, v in spec.settings())
    notes: list[str] = []
    if spec.guest_hugepages is not None:
        kib = spec.guest_hugepages_kib
        mounts = hugetlbfs_mounts(root)
        if kib not in mounts.values():
            notes.append(
                f"guest_hugepages = {spec.guest_hugepages!r}: no hugetlbfs mount with "
                f"pagesize={spec.guest_hugepages} in /proc/mounts; libvirt looks for them "
                "when libvirtd starts: mount -t hugetlbfs -o pagesize="
                f"{spec.guest_hugepages} none /dev/hugepages, then restart libvirtd"
            )
        else:
            where = ", ".join(m for m, k in mounts.items() if k == kib)
            notes.append(f"guest memory from hugetlbfs ({where}); libvirt must have seen "
                         "this mount at its start")
    return HostPlan(spec.name, settings, _reload_for(root, settings), tuple(notes),
                    spec.guest_hugepages_kib)


def hugetlbfs_mounts(root: Path = Path("/")) -> dict[str, int]:
    """hugetlbfs mount points -> page size in KiB (2048 when the mount does not say)."""
    out: dict[str, int] = {}
    for line in (_read(root / "proc/mounts") or "").splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "hugetlbfs":
            m = re.search(r"pagesize=(\d+)([KMG])", parts[3])
            kib = int(m.group(1)) * {"K": 1, "M": 1024, "G": 1048576}[m.group(2)] if m else 2048
            out[parts[1]] = kib
    return out


# --- applying and restoring -------------------------------------------------------


class SettingRecord(BaseModel):
    """One setting as applied: before, wanted, read back after."""

    model_config = ConfigDict(extra="forbid")

    key: str
    path: str
    method: Method
    before: str | None
    wanted: str
    after: str | None


class HostConfigRecord(BaseModel):
    """A host configuration as it was applied (result provenance)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    settings: list[SettingRecord]
    commands: list[str] = Field(description="the commands run to apply it, in order")
    side_effects: list[str] = Field(
        default_factory=list,
        description="module parameters that read otherwise after the reload than before it, "
        "besides the settings asked for, as 'module.param: before -> after' (the kernel "
        "derives some, e.g. kvm_intel.unrestricted_guest is N under ept=0)",
    )
    restored: bool = Field(default=False, description="original values put back afterwards")
    restore_errors: list[str] = Field(default_factory=list)
    guest_hugepages_kib: int | None = Field(
        default=None, description="guest memory backed by hugetlbfs pages of this size (KiB)"
    )


class LeftSetting(BaseModel):
    """A host setting that still differs from what it was before another run changed it."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(description='"module.param", "thp.enabled", ... or "module NAME"')
    original: str | None
    now: str | None


class HostLeftChanged(BaseModel):
    """Another harness run's host configuration, still in force when this run started."""

    model_config = ConfigDict(extra="forbid")

    owner_pid: int | None = Field(description="the run that changed the host (None: unknown)")
    owner_alive: bool = Field(
        description="False: that run died without restoring (the usual case); True: it is "
        "running now, beside this run"
    )
    config: str = Field(description="its host configuration's name")
    record: str = Field(description="its restore record")
    settings: list[LeftSetting]
    fix: str


# Restore records: pydantic models, so a record read back from disk is checked as strictly
# as a suite (a value that is not one token never reaches modprobe).
# Pydantic matches these with its Rust engine, where "$" is the end of the text only.
_RECORD_KEY = (r"^((kvm|kvm_intel|kvm_amd)\.[a-z0-9_]{1,64}|thp\.enabled|thp\.defrag|"
               r"hugepages\.[0-9]{1,8}kB)$")
_RECORD_VALUE = r"^[A-Za-z0-9_.,+-]{1,64}$"  # "+": THP defrag's defer+madvise


class SavedSetting(BaseModel):
    """One changed setting in a restore record: how it was changed and its original value."""

    model_config = ConfigDict(extra="forbid")

    key: Annotated[str, StringConstraints(pattern=_RECORD_KEY)]
    method: Method = "sysfs"
    value: Annotated[str, StringConstraints(pattern=_RECORD_VALUE)] | None
    wanted: Annotated[str, StringConstraints(pattern=_RECORD_VALUE)] | None = None


class ModuleState(BaseModel):
    """A KVM module as it was loaded before a reload: every readable parameter's value."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["kvm", "kvm_intel", "kvm_amd"]
    params: dict[Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,64}$")],
                 Annotated[str, StringConstraints(max_length=256)]]


class RestoreRecord(BaseModel):
    """What a host-changing run must put back, written before it changes anything."""

    model_config = ConfigDict(extra="forbid")

    version: int = 2
    owner: ProcessId | None = Field(default=None, description="None: a record of an old "
                                    "harness version, taken as dead")
    name: str = Field(default="?", max_length=256)
    root: str = "/"
    settings: list[SavedSetting] = []
    modules: list[ModuleState] = Field(
        default_factory=list,
        description="modules a reload unloads, as they were before it (load order: kvm first)",
    )

    def module_params(self, module: str) -> list[tuple[str, str]]:
        """Original values of the reloaded parameters of ``module`` (modprobe arguments)."""
        out = []
        for s in self.settings:
            m = _PARAM_KEY.match(s.key)
            if s.method == "reload" and m and m.group(1) == module and s.value is not None:
                out.append((m.group(2), s.value))
        return out


Runner = Callable[[Sequence[str]], None]
Writer = Callable[[Path, str], None]


def run_command(argv: Sequence[str]) -> None:
    """Run ``argv``; raise :class:`HostConfigError` with its stderr when it fails."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=120)
    if proc.returncode != 0:
        raise HostConfigError(
            f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()}"
        )


class HostConfigInterrupted(KeyboardInterrupt):
    """SIGTERM arrived while a host configuration was applied; it is being restored."""


class HostConfigBusy(HostConfigError):
    """Another live process changes this host's configuration; nothing was done."""


@dataclass
class HostConfigurator:
    """Applies :class:`HostPlan` values under ``root`` and puts the originals back.

    ``runner`` executes module commands (``modprobe``), ``writer`` writes one
    sysfs file; ``restore_file`` keeps this process's restore record on disk
    while a configuration is applied.
    """

    root: Path = Path("/")
    runner: Runner = run_command
    writer: Writer = field(default=lambda path, value: write_sysfs(path, value))
    restore_file: Path | None = None
    _record: RestoreRecord | None = field(default=None, repr=False)

    def apply(self, host_plan: HostPlan) -> HostConfigRecord:
        """Apply ``host_plan``, verify each setting, and return the record.

        Raises :class:`HostConfigError` (after restoring whatever it changed)
        when a setting is impossible here, a module is in use, a command fails
        or a read-back differs from the wanted value. When the restore fails
        too, the error says so and names the restore record left for
        ``harness host restore``.
        """
        if self._record is not None:
            raise HostConfigError("a host configuration is already applied; restore it first")
        # Re-plan: the host may have changed since the plan was printed.
        fresh = replan(host_plan, self.root)
        if fresh.impossible:
            raise HostConfigError(
                f"host configuration {fresh.name!r} cannot be applied here: "
                + "; ".join(f"{s.key}: {s.why}" for s in fresh.impossible)
            )
        record = RestoreRecord(
            owner=owner.this_process(), name=fresh.name, root=str(self.root),
            settings=[SavedSetting(key=s.key, method=s.method, value=s.current, wanted=s.wanted)
                      for s in fresh.changes],
            # Remembered before anything is unloaded: afterwards sysfs no longer shows them.
            modules=[] if fresh.reload is None else snapshot_modules(self.root,
                                                                     fresh.reload.unload),
        )
        self._save(record)
        self._record = record
        commands: list[str] = []
        side_effects: list[str] = []
        try:
            if fresh.reload is not None:
                self._check_unused(fresh.reload.unload)
                # Every other parameter stays as it was (one given by hand at the last load
                # too): the run measures the recorded change and nothing else.
                wanted: dict[str, dict[str, str]] = {}
                for st in fresh.changes:
                    if st.module is not None and st.param is not None:
                        wanted.setdefault(st.module, {})[st.param] = st.wanted
                target = [ModuleState(name=m.name, params={**m.params, **wanted.get(m.name, {})})
                          for m in record.modules]
                errors = _reload_to(self.root, self.runner, self.writer, target,
                                    {m: list(ps) for m, ps in fresh.reload.load}, commands,
                                    only_disabled=True)
                if errors:
                    raise HostConfigError("; ".join(errors))
                asked = {st.key for st in fresh.settings}
                side_effects = [f"{w.key}: {w.original} -> {w.now}"
                                for w in _param_mismatches(self.root, record.modules)
                                if w.key not in asked]
            # After the reload: reloading a module resets its writable parameters too.
            for st in fresh.settings:
                if st.method == "sysfs":
                    self.writer(st.path, st.wanted)
                    commands.append(f"echo {st.wanted} > /{_rel(st.path)}")
            records = [_verify(st) for st in fresh.settings]
        except BaseException as exc:
            errors = self.restore()
            if errors:
                kept = (f"the restore record {self.restore_file} is kept: fix the cause, then "
                        "run `harness host restore`" if self.restore_file is not None else
                        "no restore record was kept: put these values back by hand")
                msg = f"restoring the host failed too: {'; '.join(errors)}; {kept}"
                if isinstance(exc, HostConfigError):
                    raise HostConfigError(f"{exc}; {msg}") from exc
                exc.add_note(msg)
            raise
        return HostConfigRecord(
            name=fresh.name,
            settings=records,
            commands=commands,
            side_effects=side_effects,
            guest_hugepages_kib=fresh.guest_hugepages_kib,
        )

    def restore(self) -> list[str]:
        """Put every changed setting back; return the errors (each step is tried regardless)."""
        if self._record is None:
            return []
        record, self._record = self._record, None
        _, errors = restore_record(record, self.root, self.runner, self.writer)
        if not errors and self.restore_file is not None:
            self.restore_file.unlink(missing_ok=True)
        return errors

    @contextlib.contextmanager
    def applied(self, host_plan: HostPlan) -> Iterator[HostConfigRecord]:
        """Apply ``host_plan`` for the ``with`` block; restore on exit, exception or signal.

        SIGINT arrives as KeyboardInterrupt anyway; SIGTERM is turned into
        :class:`HostConfigInterrupted` here when this is the main thread and
        nobody else handles it (the orchestrator has its own handler).
        """
        record = self.apply(host_plan)
        own_sigterm = (threading.current_thread() is threading.main_thread()
                       and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
        if own_sigterm:
            def _term(signum: int, frame: FrameType | None) -> None:
                raise HostConfigInterrupted(f"signal {signum}: restoring the host configuration")
            signal.signal(signal.SIGTERM, _term)
        try:
            yield record
        finally:
            if own_sigterm:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            errors = self.restore()
            record.restored = not errors
            record.restore_errors = errors

    def _check_unused(self, modules: Sequence[str]) -> None:
        check_unused(self.root, modules)

    def _save(self, record: RestoreRecord) -> None:
        if self.restore_file is not None:
            save_record(record, self.restore_file)


def check_unused(root: Path, modules: Sequence[str]) -> None:
    """Refuse unless nothing but the other modules being unloaded holds each module.

    Open /dev/kvm files and VMs hold the vendor module; the vendor module
    holds kvm (it is listed in /sys/module/kvm/holders/), which is fine
    when both go.
    """
    for m in modules:
        n = module_refcnt(root, m)
        if n is None:
            raise HostConfigError(
                f"{m}: no /sys/module/{m}/refcnt, cannot tell whether VMs use it; not reloading"
            )
        holders = root / SYS_MODULE / m / "holders"
        by_unloaded = sum(1 for h in modules if (holders / h).exists())
        if n - by_unloaded > 0:
            raise HostConfigError(
                f"{m} is in use (refcnt {n}): a VM or another /dev/kvm user is running; "
                "module parameters can only be reloaded with no VM running"
            )


def module_params(root: Path, module: str) -> dict[str, str]:
    """Every readable parameter of a loaded ``module`` and its value as sysfs shows it."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for f in sorted((root / SYS_MODULE / module / "parameters").iterdir()):
            if (text := _read(f)) is not None and re.fullmatch(r"[a-z0-9_]{1,64}", f.name):
                out[f.name] = text[:256]
    return out


def snapshot_modules(root: Path, modules: Sequence[str]) -> list[ModuleState]:
    """The loaded ones of ``modules`` with all their parameters, in load order (kvm first)."""
    order = sorted(modules, key=lambda m: m != "kvm")
    return [ModuleState(name=m, params=module_params(root, m))  # type: ignore[arg-type]
            for m in order if module_is_loadable(root, m)]


def save_record(record: RestoreRecord, path: Path) -> None:
    """Write ``record`` to ``path`` atomically, readable by root only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(record.model_dump_json(indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_sysfs(path: Path, value: str) -> None:
    """Write ``value`` to a sysfs file (one write, as ``echo VALUE > FILE`` does)."""
    with open(path, "w") as f:
        f.write(value + "\n")


def _readback(st: PlannedSetting) -> str | None:
    return _current(st.path, st.key)


def _current(path: Path, key: str) -> str | None:
    text = _read(path)
    return parse_thp_mode(text) if key.startswith("thp.") else text


def _verify(st: PlannedSetting) -> SettingRecord:
    after = _readback(st)
    if st.method != "unchanged" and (after is None or normalize(after) != normalize(st.wanted)):
        hint = (" (the kernel could not find that many free huge pages: free memory, or "
                "reserve them at boot with hugepages=N)" if st.key.startswith("hugepages.")
                else "")
        raise HostConfigError(
            f"{st.key}: wrote {st.wanted!r} but /{_rel(st.path)} reads {after!r}{hint}"
        )
    return SettingRecord(key=st.key, path="/" + _rel(st.path), method=st.method,
                         before=st.current, wanted=st.wanted, after=after)


def replan(host_plan: HostPlan, root: Path) -> HostPlan:
    """Plan the same wanted values again against the host as it is now."""
    settings = tuple(_plan_setting(root, st.key, st.wanted) for st in host_plan.settings)
    return replace(host_plan, settings=settings, reload=_reload_for(root, settings))


def setting_path(root: Path, key: str) -> Path:
    """The sysfs file of a setting key (``kvm_intel.ept``, ``thp.enabled``, ...)."""
    if key in ("thp.enabled", "thp.defrag"):
        return root / (THP_ENABLED if key == "thp.enabled" else THP_DEFRAG)
    if key.startswith("hugepages."):
        return root / HUGEPAGES.format(kib=key.split(".", 1)[1].removesuffix("kB"))
    m = _PARAM_KEY.match(key)
    if m is None:
        raise HostConfigError(f"{key!r}: not a host setting")
    return root / SYS_MODULE / m.group(1) / "parameters" / m.group(2)


def _param_mismatches(root: Path, modules: Sequence[ModuleState]) -> list[LeftSetting]:
    """Modules not loaded, and parameters that read otherwise than before the reload."""
    out: list[LeftSetting] = []
    for mod in modules:
        if not module_is_loadable(root, mod.name):
            out.append(LeftSetting(key=f"module {mod.name}", original="loaded", now="not loaded"))
            continue
        for p, was in mod.params.items():
            now = _read(root / SYS_MODULE / mod.name / "parameters" / p)
            if now is None or normalize(now) != normalize(was):
                out.append(LeftSetting(key=f"{mod.name}.{p}", original=was, now=now))
    return out


def _reload_modules(root: Path, runner: Runner, modules: Sequence[ModuleState],
                    params: dict[str, list[tuple[str, str]]], done: list[str]) -> list[str]:
    """Unload whichever of ``modules`` are loaded now, then load all of them, kvm first.

    Which modules to load comes from the record, never from sysfs: a module
    that a failed reload left unloaded has no sysfs directory any more.
    """
    names = {m.name for m in modules}
    unload = [m for m in (*VENDOR_MODULES, "kvm") if m in names and module_is_loadable(root, m)]
    try:
        if unload:
            check_unused(root, unload)
            runner(["modprobe", "-r", *unload])
            done.append("modprobe -r " + " ".join(unload))
    except HostConfigError as e:
        return [str(e)]
    errors: list[str] = []
    for mod in modules:
        try:
            cmd = load_command(mod.name, params.get(mod.name, []))
            runner(cmd)
            done.append(" ".join(cmd))
        except HostConfigError as e:
            errors.append(str(e))
    return errors


def _restore_modules(root: Path, runner: Runner, writer: Writer, record: RestoreRecord,
                     done: list[str]) -> list[str]:
    """Put the record's modules back as they were loaded, every parameter checked.

    Nothing runs when they already are (a run killed before its reload). The
    first load passes the original values of the parameters the run changed;
    a parameter that still reads otherwise (given by hand at the original
    load, say) is then written where writable, else passed to one more reload.
    """
    if not record.modules or not _param_mismatches(root, record.modules):
        return []
    params: dict[str, list[tuple[str, str]]] = {
        m.name: record.module_params(m.name) for m in record.modules}
    return _reload_to(root, runner, writer, record.modules, params, done)


def _reload_to(root: Path, runner: Runner, writer: Writer, target: Sequence[ModuleState],
               params: dict[str, list[tuple[str, str]]], done: list[str], *,
               only_disabled: bool = False) -> list[str]:
    """Reload ``target``'s modules with ``params``, then make every parameter read as in
    ``target``: a writable one is written, a read-only one is passed to one more reload.

    ``only_disabled`` passes again only parameters that should read N or 0: a
    default load turns a feature disabled by hand back on, while one that reads
    N where it read Y was turned off by the kernel itself (``unrestricted_guest``
    under ``ept=0``), which no argument changes.
    """
    errors = _reload_modules(root, runner, target, params, done)
    if errors:
        return errors
    extra = [w for w in _param_mismatches(root, target) if "." in w.key and w.original
             is not None and not _writable(setting_path(root, w.key)) and _VALUE.match(w.original)
             and (not only_disabled or normalize(w.original) in ("N", "0"))]
    if extra:
        for w in extra:
            mod, p = w.key.split(".", 1)
            params[mod] = [*(x for x in params.get(mod, []) if x[0] != p), (p, str(w.original))]
        errors = _reload_modules(root, runner, target, params, done)
    for w in _param_mismatches(root, target):
        path = setting_path(root, w.key) if "." in w.key else None
        if path is not None and w.original is not None and _writable(path):
            try:
                writer(path, w.original)
                done.append(f"echo {w.original} > /{_rel(path)}")
            except OSError as e:
                errors.append(f"{w.key}: writing {w.original!r} to /{_rel(path)}: {e}")
    return errors


def restore_record(record: RestoreRecord, root: Path, runner: Runner,
                   writer: Writer) -> tuple[list[str], list[str]]:
    """Put back what ``record`` says; return (what was done, errors), errors empty when every
    setting and every reloaded module's parameter reads as it did before.

    Each step is tried regardless of the others: modules first (a reload resets
    writable parameters too), then sysfs writes in reverse order, then a read-back.
    """
    done: list[str] = []
    errors = _restore_modules(root, runner, writer, record, done)
    for s in reversed(record.settings):
        if s.method != "sysfs" or s.value is None:
            continue
        path = setting_path(root, s.key)
        if _current(path, s.key) == s.value:
            continue
        try:
            writer(path, s.value)
            done.append(f"echo {s.value} > /{_rel(path)}")
        except OSError as e:
            errors.append(f"{s.key}: writing {s.value!r} to /{_rel(path)}: {e}")
    for w in still_changed(record, root):
        errors.append(f"{w.key}: should be back to {w.original!r} but reads {w.now!r}")
    return done, errors


def still_changed(record: RestoreRecord, root: Path | None = None) -> list[LeftSetting]:
    """The settings and modules of ``record`` that do not read as they did before."""
    base = Path(record.root) if root is None else root
    out = _param_mismatches(base, record.modules)
    seen = {w.key for w in out}
    for s in record.settings:
        if s.value is None or s.key in seen:
            continue
        now = _current(setting_path(base, s.key), s.key)
        if now is None or normalize(now) != normalize(s.value):
            out.append(LeftSetting(key=s.key, original=s.value, now=now))
    return out


def read_record(path: Path) -> RestoreRecord:
    """A restore record from disk, checked; HostConfigError naming the file and the fix."""
    try:
        with open(path, "rb") as f:  # a record is small; a huge file is not one
            data = f.read(1 << 20)
        return RestoreRecord.model_validate_json(data)
    except (OSError, ValueError) as e:
        raise HostConfigError(
            f"{path}: unreadable restore record ({str(e).splitlines()[0]}); fix: check the "
            "host settings it names against `harness host plan`, then remove the file"
        ) from e


def _record_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.glob("*.json") if not p.name.startswith("."))
    legacy = directory.parent / LEGACY_RESTORE_FILE
    return [*files, legacy] if legacy.is_file() else files


def _mine(rec: RestoreRecord, me: ProcessId) -> bool:
    return rec.owner is not None and rec.owner.pid == me.pid and (
        rec.owner.start_time is None or rec.owner.start_time == me.start_time)


def _other_boot(rec: RestoreRecord) -> bool:
    here = owner.boot_id()
    return (rec.owner is not None and rec.owner.boot_id is not None and here is not None
            and rec.owner.boot_id != here)


def restore_from_file(
    restore_file: Path,
    *,
    root: Path | None = None,
    runner: Runner = run_command,
    writer: Writer = write_sysfs,
) -> tuple[str, list[str]] | None:
    """Undo a configuration whose run died without restoring (its restore record is left).

    Returns None when there is nothing to restore, else a description of what
    was done and the errors (empty when all went back; the file is then
    removed). Raises :class:`HostConfigBusy` when the record's owner still
    runs (and is not this process): a live run's settings are its own to restore.
    """
    if not restore_file.exists():
        return None
    rec = read_record(restore_file)
    me = owner.this_process()
    if owner.is_alive(rec.owner) and not _mine(rec, me):
        assert rec.owner is not None
        raise HostConfigBusy(
            f"{restore_file}: host configuration {rec.name!r} belongs to pid {rec.owner.pid}, "
            "which is still running and restores it when it ends; not touched (fix: wait "
            f"for pid {rec.owner.pid} to end, or stop it, then run again)"
        )
    if _other_boot(rec):
        restore_file.unlink(missing_ok=True)
        return (f"{rec.name}: recorded before the last reboot, whose settings did not "
                "survive it; record removed", [])
    done, errors = restore_record(rec, Path(rec.root) if root is None else root, runner, writer)
    if not errors:
        restore_file.unlink(missing_ok=True)
    who = f"pid {rec.owner.pid}" if rec.owner is not None else "an older harness"
    what = "; ".join(done) if done else "nothing to run, already as before"
    return f"host configuration {rec.name!r} of {who}: {what}", errors


@dataclass(frozen=True)
class Leftover:
    """One restore record found by :func:`reap_leftovers` and what became of it."""

    path: Path
    description: str
    errors: tuple[str, ...] = ()
    live_owner: int | None = None  # set: not touched, its owner still runs


def reap_leftovers(
    directory: Path,
    *,
    root: Path | None = None,
    runner: Runner = run_command,
    writer: Writer = write_sysfs,
) -> list[Leftover]:
    """Restore every record in ``directory`` whose owner is dead; leave live owners' alone."""
    out: list[Leftover] = []
    for path in _record_files(directory):
        try:
            done = restore_from_file(path, root=root, runner=runner, writer=writer)
        except HostConfigBusy as e:
            rec = read_record(path)
            out.append(Leftover(path, str(e), live_owner=rec.owner.pid if rec.owner else None))
            continue
        except HostConfigError as e:
            out.append(Leftover(path, "unreadable", (str(e),)))
            continue
        if done is not None:
            out.append(Leftover(path, done[0], tuple(done[1])))
    return out


def leftover_changes(directory: Path) -> tuple[list[HostLeftChanged], list[str]]:
    """Other runs' host configurations still in force, and records that cannot be read.

    Read by every run, host-changing or not, so that a result made on a host a
    killed run left changed says so. Reads only; needs no lock (records are
    replaced atomically).
    """
    me = owner.this_process()
    found: list[HostLeftChanged] = []
    problems: list[str] = []
    for path in _record_files(directory):
        try:
            rec = read_record(path)
        except HostConfigError as e:
            problems.append(str(e))
            continue
        if _mine(rec, me) or _other_boot(rec):
            continue
        try:
            changed = still_changed(rec)
        except HostConfigError as e:
            problems.append(f"{path}: {e}")
            continue
        if not changed:
            continue
        alive = owner.is_alive(rec.owner)
        pid = rec.owner.pid if rec.owner is not None else None
        fix = (f"pid {pid} is running and restores these when it ends" if alive else
               "run `harness host restore` (or any run with --allow-host-changes), then "
               "measure again")
        found.append(HostLeftChanged(owner_pid=pid, owner_alive=alive, config=rec.name,
                                     record=str(path), settings=changed, fix=fix))
    return found, problems


def describe_left_changed(left: HostLeftChanged) -> str:
    """One line for a person: which run left what changed, and the fix."""
    who = (f"run pid {left.owner_pid} (still running)" if left.owner_alive
           else f"killed run pid {left.owner_pid}" if left.owner_pid is not None
           else "an older harness run")
    what = ", ".join(f"{s.key} is {s.now!r} (was {s.original!r})" for s in left.settings)
    return (f"host still changed by {who}, configuration {left.config!r}: {what}; "
            f"these numbers are not of the host as it was: {left.fix}")


@contextlib.contextmanager
def host_change_session(cache: Path) -> Iterator[Path]:
    """One host-changing run at a time: hold the host-change lock for the block.

    Yields the restore-record directory. Raises :class:`HostConfigBusy`
    naming the live holder's pid when another process holds the lock.
    """
    lock = cache / HOST_LOCK_FILE
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(owner.exclusive(lock))
        except owner.LockHeld as e:
            who = f"pid {e.holder.pid}" if e.holder is not None else "another process"
            raise HostConfigBusy(
                f"another harness run ({who}) is changing this host's configuration now ({lock} "
                "is locked); a second --allow-host-changes run would undo or mix its settings "
                f"(fix: wait for {who} to end, then run again)"
            ) from None
        except OSError as e:  # e.g. a symlink planted where the lock file belongs
            raise HostConfigError(
                f"{lock}: cannot take the host-change lock ({e.strerror or e}); fix: make it "
                "a regular file owned by root, or remove it"
            ) from e
        yield cache / HOST_RESTORE_DIR
