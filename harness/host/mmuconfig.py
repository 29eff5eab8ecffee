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
it) SIGTERM. Before changing anything it writes the originals to a restore
file, so a run killed with SIGKILL can be undone later by
:func:`restore_from_file` (``harness host restore``).
"""

from __future__ import annotations

import contextlib
import json
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

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from harness.host.facts import parse_thp_mode

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

_PARAM_KEY = re.compile(r"^(kvm|kvm_intel|kvm_amd)\.([a-z0-9_]+)$")
_TRUE: Final = frozenset({"1", "y", "yes", "on", "true", "force"})
_FALSE: Final = frozenset({"0", "n", "no", "off", "false", "never"})


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
        """The exact commands, in order."""
        cmds = [["modprobe", "-r", *self.unload]]
        for module, params in self.load:
            cmds.append(["modprobe", module, *(f"{p}={v}" for p, v in params)])
        return cmds


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
        """Every change as a shell command, in the order it would run."""
        out = [f"echo {s.wanted} > /{_rel(s.path)}" for s in self.settings if s.method == "sysfs"]
        if self.reload is not None:
            out += [" ".join(c) for c in self.reload.commands()]
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
    restored: bool = Field(default=False, description="original values put back afterwards")
    restore_errors: list[str] = Field(default_factory=list)
    guest_hugepages_kib: int | None = Field(
        default=None, description="guest memory backed by hugetlbfs pages of this size (KiB)"
    )


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


@dataclass
class HostConfigurator:
    """Applies :class:`HostPlan` values under ``root`` and puts the originals back.

    ``runner`` executes module commands (``modprobe``), ``writer`` writes one
    sysfs file; ``restore_file`` keeps the original values on disk while a
    configuration is applied.
    """

    root: Path = Path("/")
    runner: Runner = run_command
    writer: Writer = field(default=lambda path, value: write_sysfs(path, value))
    restore_file: Path | None = None
    _applied: HostPlan | None = field(default=None, repr=False)

    def apply(self, host_plan: HostPlan) -> HostConfigRecord:
        """Apply ``host_plan``, verify each setting, and return the record.

        Raises :class:`HostConfigError` (after restoring whatever it changed)
        when a setting is impossible here, a module is in use, a command fails
        or a read-back differs from the wanted value.
        """
        if self._applied is not None:
            raise HostConfigError("a host configuration is already applied; restore it first")
        # Re-plan: the host may have changed since the plan was printed.
        fresh = replan(host_plan, self.root)
        if fresh.impossible:
            raise HostConfigError(
                f"host configuration {fresh.name!r} cannot be applied here: "
                + "; ".join(f"{s.key}: {s.why}" for s in fresh.impossible)
            )
        self._save_restore_file(fresh)
        self._applied = fresh
        commands: list[str] = []
        try:
            for st in fresh.settings:
                if st.method == "sysfs":
                    self.writer(st.path, st.wanted)
                    commands.append(f"echo {st.wanted} > /{_rel(st.path)}")
            if fresh.reload is not None:
                self._check_unused(fresh.reload.unload)
                for cmd in fresh.reload.commands():
                    self.runner(cmd)
                    commands.append(" ".join(cmd))
            records = [_verify(st) for st in fresh.settings]
        except BaseException:
            self.restore()
            raise
        return HostConfigRecord(
            name=fresh.name,
            settings=records,
            commands=commands,
            guest_hugepages_kib=fresh.guest_hugepages_kib,
        )

    def restore(self) -> list[str]:
        """Put every changed setting back; return the errors (each step is tried regardless)."""
        if self._applied is None:
            return []
        back = inverse(self._applied, self.root)
        self._applied = None
        errors = self.run_restore(back)
        if not errors and self.restore_file is not None:
            self.restore_file.unlink(missing_ok=True)
        return errors

    def run_restore(self, back: HostPlan) -> list[str]:
        """Execute a plan of original values: module reload first, then sysfs writes in
        reverse order, then a read-back of each; collect errors instead of stopping."""
        errors: list[str] = []
        if back.reload is not None:
            try:
                self._check_unused(back.reload.unload)
                for cmd in back.reload.commands():
                    self.runner(cmd)
            except HostConfigError as e:
                errors.append(str(e))
        for st in reversed(back.settings):
            if st.method != "sysfs":
                continue
            try:
                self.writer(st.path, st.wanted)
            except OSError as e:
                errors.append(f"{st.key}: writing {st.wanted!r} to /{_rel(st.path)}: {e}")
        for st in back.settings:
            after = _readback(st)
            if after is None or normalize(after) != normalize(st.wanted):
                errors.append(f"{st.key}: should be back to {st.wanted!r} but reads {after!r}")
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
        """Refuse unless nothing but the other modules being unloaded holds each module.

        Open /dev/kvm files and VMs hold the vendor module; the vendor module
        holds kvm (it is listed in /sys/module/kvm/holders/), which is fine
        when both go.
        """
        for m in modules:
            n = module_refcnt(self.root, m)
            if n is None:
                raise HostConfigError(
                    f"{m}: no /sys/module/{m}/refcnt, cannot tell whether VMs use it; not reloading"
                )
            holders = self.root / SYS_MODULE / m / "holders"
            by_unloaded = sum(1 for h in modules if (holders / h).exists())
            if n - by_unloaded > 0:
                raise HostConfigError(
                    f"{m} is in use (refcnt {n}): a VM or another /dev/kvm user is running; "
                    "module parameters can only be reloaded with no VM running"
                )

    def _save_restore_file(self, fresh: HostPlan) -> None:
        if self.restore_file is None:
            return
        data = {"name": fresh.name, "root": str(self.root),
                "settings": [{"key": st.key, "value": st.current} for st in fresh.changes]}
        self.restore_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.restore_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.restore_file)


def write_sysfs(path: Path, value: str) -> None:
    """Write ``value`` to a sysfs file (one write, as ``echo VALUE > FILE`` does)."""
    with open(path, "w") as f:
        f.write(value + "\n")


def _readback(st: PlannedSetting) -> str | None:
    text = _read(st.path)
    return parse_thp_mode(text) if st.key.startswith("thp.") else text


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


def inverse(applied: HostPlan, root: Path) -> HostPlan:
    """The plan that puts back the original values of ``applied``'s changes."""
    back = tuple(
        replace(st, current=st.wanted, wanted=st.current or "", why="restore")
        for st in applied.changes
    )
    return HostPlan(f"restore {applied.name}", back, _reload_for(root, back))


def restore_from_file(
    restore_file: Path,
    *,
    root: Path | None = None,
    runner: Runner = run_command,
    writer: Writer = write_sysfs,
) -> tuple[HostPlan, list[str]] | None:
    """Undo a configuration whose run died without restoring (its restore file is left).

    Returns None when there is nothing to restore, else the plan that put the
    originals back and its errors (empty when all went back; the file is then removed).
    """
    try:
        data = json.loads(restore_file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise HostConfigError(
            f"{restore_file}: unreadable restore file ({e}); fix or remove it"
        ) from e
    base = Path(str(data.get("root", "/"))) if root is None else root
    wanted = [(str(x["key"]), str(x["value"])) for x in data.get("settings", [])
              if x.get("value") is not None]
    planned = tuple(_plan_setting(base, k, v) for k, v in wanted)
    back = HostPlan(f"restore {data.get('name', '?')}", planned, _reload_for(base, planned))
    errors = HostConfigurator(root=base, runner=runner, writer=writer).run_restore(back)
    if not errors:
        restore_file.unlink(missing_ok=True)
    return back, errors
