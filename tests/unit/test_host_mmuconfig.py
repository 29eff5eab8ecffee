"""Host MMU configuration: plans, read-back verification and restore, on a test-made sysfs tree.

Reloading KVM modules cannot be tried on the machines these tests run on (it
would take their own KVM away), so these tests use two doubles, named as such:

* ``SysfsTreeDouble``: a directory under tmp_path laid out like the parts of
  /sys the planner reads (module parameters with their real file modes,
  ``initstate``/``refcnt`` of loadable modules, THP and hugetlb files);
* ``SysfsTreeDouble.write``: stands in for the kernel's side of a sysfs
  write: a choice file (THP ``enabled``/``defrag``) then reads back as the
  kernel shows it, ``always madvise [never]``;
* ``ModprobeDouble``: stands in for ``modprobe``: records every command and
  "reloads" a module by rewriting its parameter files in that tree, the way
  the kernel would show them after a real reload.

The real host's THP mode and hugetlb reservation are changed for real in
tests/integration/test_host_mmuconfig_live.py.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from harness.host import owner
from harness.host.mmuconfig import (
    KNOWN_PARAMS,
    HostConfigBusy,
    HostConfigError,
    HostConfigInterrupted,
    HostConfigSpec,
    HostConfigurator,
    RestoreRecord,
    SavedSetting,
    check_param,
    host_change_session,
    leftover_changes,
    load_command,
    module_refcnt,
    plan,
    reap_leftovers,
    restore_from_file,
    save_record,
    write_sysfs,
)

#: What a real load gives each parameter not passed to modprobe, and whether the parameter is
#: writable at run time (mode 0644) or read-only (0444).
CATALOGUE: dict[str, dict[str, tuple[str, bool]]] = {
    "kvm": {"tdp_mmu": ("Y", False), "nx_huge_pages": ("N", True)},
    "kvm_intel": {"ept": ("Y", False), "nested": ("Y", False),
                  "unrestricted_guest": ("Y", False)},
    "kvm_amd": {"npt": ("Y", False)},
}


class SysfsTreeDouble:
    """A /sys-like tree under tmp_path (test double for the host's sysfs)."""

    def __init__(
        self, root: Path, *, builtin_kvm: bool = False, vendor: str = "kvm_intel"
    ) -> None:
        self.root = root
        self.vendor = vendor
        self.builtin_kvm = builtin_kvm
        self.load_module("kvm", {})
        self.load_module(vendor, {})
        thp = root / "sys/kernel/mm/transparent_hugepage"
        thp.mkdir(parents=True)
        (thp / "enabled").write_text("always [madvise] never\n")
        (thp / "defrag").write_text("always defer defer+madvise [madvise] never\n")
        hp = root / "sys/kernel/mm/hugepages/hugepages-2048kB"
        hp.mkdir(parents=True)
        (hp / "nr_hugepages").write_text("0\n")

    def load_module(self, module: str, params: dict[str, str]) -> None:
        """What the kernel shows after loading ``module`` with ``params``."""
        for name, (default, writable) in CATALOGUE[module].items():
            self.param(module, name, params.get(name, default), writable=writable)
        if self.builtin_kvm and module == "kvm":
            return  # built in: no initstate, no refcnt
        (self.root / f"sys/module/{module}/initstate").write_text("live\n")
        self.set_refcnt(module, 0)
        if module != "kvm" and not self.builtin_kvm:
            # The vendor module holds kvm, as the kernel shows it.
            (self.root / "sys/module/kvm/holders").mkdir(exist_ok=True)
            (self.root / f"sys/module/kvm/holders/{module}").touch()
            self.set_refcnt("kvm", (module_refcnt(self.root, "kvm") or 0) + 1)

    def unload_module(self, module: str) -> None:
        """What the kernel shows after ``rmmod``: the module's directory is gone."""
        shutil.rmtree(self.root / f"sys/module/{module}")
        holder = self.root / f"sys/module/kvm/holders/{module}"
        if holder.exists():
            holder.unlink()
            self.set_refcnt("kvm", (module_refcnt(self.root, "kvm") or 1) - 1)

    def loaded(self, module: str) -> bool:
        return (self.root / f"sys/module/{module}/initstate").exists()

    def param(self, module: str, name: str, value: str, *, writable: bool) -> None:
        d = self.root / f"sys/module/{module}/parameters"
        d.mkdir(parents=True, exist_ok=True)
        f = d / name
        if f.exists():
            f.chmod(0o644)
        f.write_text({"0": "N", "1": "Y"}.get(value, value) + "\n")
        f.chmod(0o644 if writable else 0o444)

    def write(self, path: Path, value: str) -> None:
        """Write like the kernel's sysfs handlers: choice files keep all choices, one bracketed."""
        old = path.read_text()
        if "[" in old:
            choices = old.replace("[", "").replace("]", "").split()
            if value not in choices:
                raise OSError(22, "Invalid argument")
            path.write_text(" ".join(f"[{c}]" if c == value else c for c in choices) + "\n")
        elif old.strip() in ("Y", "N"):  # a bool parameter reads back as Y or N
            write_sysfs(path, {"1": "Y", "0": "N"}.get(value, value))
        else:
            write_sysfs(path, value)

    def read(self, rel: str) -> str:
        return (self.root / rel).read_text().strip()

    def set_refcnt(self, module: str, n: int) -> None:
        (self.root / f"sys/module/{module}/refcnt").write_text(f"{n}\n")


class ModprobeDouble:
    """Stands in for modprobe: records commands and loads/unloads modules in the tree the way
    the kernel would show it. Like the kernel, it refuses a bool parameter that is not one,
    refuses to unload a module that is not loaded or is held, and like modprobe it loads kvm
    first when a vendor module needs it, and does nothing for a module already loaded."""

    def __init__(self, tree: SysfsTreeDouble, fail_on: str | None = None) -> None:
        self.tree = tree
        self.commands: list[list[str]] = []
        self.fail_on = fail_on
        self.broken = False  # every load fails (a kernel that refuses the module)

    def __call__(self, argv: Sequence[str]) -> None:
        argv = list(argv)
        self.commands.append(argv)
        if self.fail_on is not None and self.fail_on in " ".join(argv):
            raise HostConfigError(f"{' '.join(argv)} failed (exit 1): double told to fail")
        if argv[:2] == ["modprobe", "-r"]:
            for module in argv[2:]:
                if not self.tree.loaded(module):
                    raise HostConfigError(f"modprobe: FATAL: Module {module} is not loaded")
                if any((self.tree.root / f"sys/module/{module}/holders").glob("*")):
                    raise HostConfigError(f"modprobe: FATAL: Module {module} is in use")
                self.tree.unload_module(module)
            return
        if self.broken:
            raise HostConfigError(f"{' '.join(argv)} failed (exit 1): the double's kernel "
                                  "refuses every load")
        module, params = argv[1], dict(a.split("=", 1) for a in argv[2:])
        for name, value in params.items():
            if CATALOGUE[module][name][0] in ("Y", "N") and value not in ("Y", "N", "0", "1"):
                raise HostConfigError(f"{' '.join(argv)} failed (exit 1): modprobe: ERROR: "
                                      f"could not insert '{module}': Invalid argument")
        if self.tree.loaded(module):
            return  # modprobe of a loaded module does nothing, parameters included
        if module != "kvm" and not self.tree.loaded("kvm"):
            self.tree.load_module("kvm", {})
        if module == "kvm_intel" and params.get("ept") in ("0", "N"):
            params["unrestricted_guest"] = "N"  # vmx hardware_setup: no EPT, no unrestricted guest
        self.tree.load_module(module, params)


@pytest.fixture
def tree(tmp_path: Path) -> SysfsTreeDouble:
    return SysfsTreeDouble(tmp_path / "host")


def spec(**kw: object) -> HostConfigSpec:
    return HostConfigSpec.model_validate({"name": "cfg", **kw})


def test_plan_chooses_sysfs_reload_unchanged_and_names_exact_commands(
    tree: SysfsTreeDouble,
) -> None:
    p = plan(spec(kvm_params={"kvm_intel.ept": 0, "kvm.nx_huge_pages": True,
                              "kvm.tdp_mmu": True}, thp="never", hugepages_2m=64), tree.root)
    methods = {s.key: s.method for s in p.settings}
    assert methods == {
        "kvm_intel.ept": "reload",  # 0444: needs a reload
        "kvm.nx_huge_pages": "sysfs",  # 0644: written at run time
        "kvm.tdp_mmu": "unchanged",  # already Y
        "thp.enabled": "sysfs",
        "hugepages.2048kB": "sysfs",
    }
    assert p.commands() == [  # a reload resets writable parameters: it goes first
        "modprobe -r kvm_intel",
        "modprobe kvm_intel ept=0",
        "echo Y > /sys/module/kvm/parameters/nx_huge_pages",
        "echo never > /sys/kernel/mm/transparent_hugepage/enabled",
        "echo 64 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
    ]
    text = p.describe()
    assert "kvm_intel.ept: Y -> 0  [reload]" in text and "modprobe kvm_intel ept=0" in text


def test_a_kvm_core_parameter_reloads_the_vendor_module_around_kvm(
    tree: SysfsTreeDouble,
) -> None:
    p = plan(spec(kvm_params={"kvm.tdp_mmu": 0, "kvm_intel.ept": 0}), tree.root)
    assert p.reload is not None
    assert p.reload.commands() == [
        ["modprobe", "-r", "kvm_intel", "kvm"],
        ["modprobe", "kvm", "tdp_mmu=0"],
        ["modprobe", "kvm_intel", "ept=0"],
    ]


def test_plan_says_what_cannot_be_done_and_why(tmp_path: Path) -> None:
    t = SysfsTreeDouble(tmp_path / "h", builtin_kvm=True, vendor="kvm_amd")
    p = plan(spec(kvm_params={"kvm.tdp_mmu": 0, "kvm_intel.ept": 0, "kvm_amd.bogus": 1}), t.root)
    why = {s.key: (s.method, s.why) for s in p.settings}
    assert why["kvm.tdp_mmu"][0] == "impossible"
    assert "built into this kernel" in why["kvm.tdp_mmu"][1]
    assert "kvm.tdp_mmu=0 on the kernel command line" in why["kvm.tdp_mmu"][1]
    assert why["kvm_intel.ept"] == ("impossible", "module kvm_intel is not loaded (wrong CPU "
                                    "vendor, or not built)")
    assert "has no parameter 'bogus'" in why["kvm_amd.bogus"][1]
    with pytest.raises(HostConfigError, match=r"cannot be applied here: kvm\.tdp_mmu"):
        HostConfigurator(root=t.root, writer=t.write, runner=ModprobeDouble(t)).apply(p)


def test_bad_keys_and_values_are_rejected_with_the_field() -> None:
    with pytest.raises(ValidationError, match=r"kvm_params\n.*'ept' is not 'module\.parameter'"):
        spec(kvm_params={"ept": 0})
    with pytest.raises(ValidationError, match="thp"):
        spec(thp="sometimes")
    with pytest.raises(ValidationError, match="hugepages_2m"):
        spec(hugepages_2m=-1)


def test_apply_verifies_records_and_restores_everything(tree: SysfsTreeDouble) -> None:
    modprobe = ModprobeDouble(tree)
    restore_file = tree.root / "state" / "restore.json"
    conf = HostConfigurator(root=tree.root, writer=tree.write, runner=modprobe,
                            restore_file=restore_file)
    p = plan(spec(kvm_params={"kvm_intel.ept": 0, "kvm.nx_huge_pages": 1}, thp="never",
                  thp_defrag="never", hugepages_2m=16), tree.root)
    with conf.applied(p) as record:
        assert tree.read("sys/module/kvm_intel/parameters/ept") == "N"
        assert tree.read("sys/module/kvm/parameters/nx_huge_pages") == "Y"
        assert tree.read("sys/kernel/mm/transparent_hugepage/enabled") == "always madvise [never]"
        assert tree.read("sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages") == "16"
        saved = json.loads(restore_file.read_text())
        assert {s["key"]: s["value"] for s in saved["settings"]} == {
            "kvm_intel.ept": "Y", "kvm.nx_huge_pages": "N", "thp.enabled": "madvise",
            "thp.defrag": "madvise", "hugepages.2048kB": "0"}
    after = {s.key: (s.before, s.after) for s in record.settings}
    assert after["kvm_intel.ept"] == ("Y", "N")
    assert after["thp.enabled"] == ("madvise", "never")
    assert record.restored and record.restore_errors == []
    assert modprobe.commands == [
        ["modprobe", "-r", "kvm_intel"], ["modprobe", "kvm_intel", "ept=0"],
        ["modprobe", "-r", "kvm_intel"], ["modprobe", "kvm_intel", "ept=Y"],
    ]
    # Back to the original host, and the restore file is gone.
    assert tree.read("sys/module/kvm_intel/parameters/ept") == "Y"
    assert tree.read("sys/module/kvm/parameters/nx_huge_pages") == "N"
    assert tree.read("sys/kernel/mm/transparent_hugepage/enabled") == "always [madvise] never"
    assert tree.read("sys/kernel/mm/transparent_hugepage/defrag").endswith("[madvise] never")
    assert tree.read("sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages") == "0"
    assert not restore_file.exists()


def test_failure_inside_the_block_restores(tree: SysfsTreeDouble) -> None:
    conf = HostConfigurator(root=tree.root, writer=tree.write, runner=ModprobeDouble(tree))
    p = plan(spec(kvm_params={"kvm_intel.ept": 0}, thp="never"), tree.root)
    with pytest.raises(RuntimeError, match="workload failed"), conf.applied(p):
        raise RuntimeError("workload failed")
    assert tree.read("sys/module/kvm_intel/parameters/ept") == "Y"
    assert tree.read("sys/kernel/mm/transparent_hugepage/enabled") == "always [madvise] never"


def test_sigterm_inside_the_block_restores(tree: SysfsTreeDouble) -> None:
    conf = HostConfigurator(root=tree.root, writer=tree.write, runner=ModprobeDouble(tree))
    p = plan(spec(thp="always"), tree.root)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with pytest.raises(HostConfigInterrupted), conf.applied(p):
        assert tree.read("sys/kernel/mm/transparent_hugepage/enabled") == "[always] madvise never"
        signal.raise_signal(signal.SIGTERM)
    assert tree.read("sys/kernel/mm/transparent_hugepage/enabled") == "always [madvise] never"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_failing_modprobe_rolls_back_the_sysfs_writes_already_made(
    tree: SysfsTreeDouble,
) -> None:
    modprobe = ModprobeDouble(tree, fail_on="kvm_intel ept=0")
    conf = HostConfigurator(root=tree.root, writer=tree.write, runner=modprobe)
    p = plan(spec(kvm_params={"kvm_intel.ept": 0}, thp="never", hugepages_2m=8), tree.root)
    with pytest.raises(HostConfigError, match="double told to fail"):
        conf.apply(p)
    assert tree.read("sys/kernel/mm/transparent_hugepage/enabled") == "always [madvise] never"
    assert tree.read("sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages") == "0"
    # The module is loaded again with its original value.
    assert modprobe.commands[-1] == ["modprobe", "kvm_intel", "ept=Y"]


def test_a_read_back_that_differs_fails_and_restores(tree: SysfsTreeDouble) -> None:
    """The kernel reserving fewer huge pages than asked is caught by the read-back."""
    hp = tree.root / "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"

    def fragmented_kernel(path: Path, value: str) -> None:
        # Like a fragmented host: asked for 100 pages, it finds 40.
        tree.write(path, "40" if path == hp and value == "100" else value)

    conf = HostConfigurator(root=tree.root, writer=fragmented_kernel,
                            runner=ModprobeDouble(tree))
    p = plan(spec(thp="never", hugepages_2m=100), tree.root)
    with pytest.raises(HostConfigError, match=r"reads '40'.*reserve them at boot"):
        conf.apply(p)
    assert hp.read_text().strip() == "0"
    assert tree.read("sys/kernel/mm/transparent_hugepage/enabled") == "always [madvise] never"


def test_reload_is_refused_while_a_vm_holds_the_module(tree: SysfsTreeDouble) -> None:
    tree.set_refcnt("kvm_intel", 2)
    modprobe = ModprobeDouble(tree)
    conf = HostConfigurator(root=tree.root, writer=tree.write, runner=modprobe)
    p = plan(spec(kvm_params={"kvm_intel.ept": 0}, thp="never"), tree.root)
    with pytest.raises(HostConfigError, match=r"kvm_intel is in use \(refcnt 2\)"):
        conf.apply(p)
    assert modprobe.commands == []
    assert tree.read("sys/kernel/mm/transparent_hugepage/enabled") == "always [madvise] never"


def test_restore_file_left_by_a_killed_run_is_undone(tree: SysfsTreeDouble) -> None:
    modprobe = ModprobeDouble(tree)
    restore_file = tree.root / "restore.json"
    conf = HostConfigurator(root=tree.root, writer=tree.write, runner=modprobe,
                            restore_file=restore_file)
    conf.apply(plan(spec(kvm_params={"kvm_intel.ept": 0}, thp="never"), tree.root))
    # The run is SIGKILLed here: no restore ran, the file is what is left.
    assert restore_file.exists()
    assert tree.read("sys/module/kvm_intel/parameters/ept") == "N"
    result = restore_from_file(restore_file, runner=modprobe, writer=tree.write)
    assert result is not None
    _, errors = result
    assert errors == []
    assert tree.read("sys/module/kvm_intel/parameters/ept") == "Y"
    assert tree.read("sys/kernel/mm/transparent_hugepage/enabled") == "always [madvise] never"
    assert not restore_file.exists()
    assert restore_from_file(restore_file, runner=modprobe, writer=tree.write) is None


def test_guest_hugepages_checks_for_a_hugetlbfs_mount(tree: SysfsTreeDouble) -> None:
    (tree.root / "proc").mkdir()
    mounts = tree.root / "proc/mounts"
    mounts.write_text("sysfs /sys sysfs rw 0 0\n")
    p = plan(spec(guest_hugepages="2M", hugepages_2m=8), tree.root)
    assert p.guest_hugepages_kib == 2048
    (note,) = p.notes
    assert "no hugetlbfs mount with pagesize=2M" in note and "restart libvirtd" in note
    mounts.write_text("none /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n"
                      "none /mnt/huge1g hugetlbfs rw,relatime,pagesize=1024M 0 0\n")
    assert "/dev/hugepages" in plan(spec(guest_hugepages="2M"), tree.root).notes[0]
    assert "/mnt/huge1g" in plan(spec(guest_hugepages="1G"), tree.root).notes[0]
    assert plan(spec(), tree.root).guest_hugepages_kib is None


def test_kvm_reload_discounts_the_vendor_module_holding_it(tree: SysfsTreeDouble) -> None:
    modprobe = ModprobeDouble(tree)
    conf = HostConfigurator(root=tree.root, writer=tree.write, runner=modprobe)
    p = plan(spec(kvm_params={"kvm.tdp_mmu": 0}), tree.root)
    with conf.applied(p):
        assert tree.read("sys/module/kvm/parameters/tdp_mmu") == "N"
    assert modprobe.commands[:3] == [["modprobe", "-r", "kvm_intel", "kvm"],
                                     ["modprobe", "kvm", "tdp_mmu=0"], ["modprobe", "kvm_intel"]]
    assert tree.read("sys/module/kvm/parameters/tdp_mmu") == "Y"
    # Something besides kvm_intel holds kvm (refcnt 2): a VM, so no reload.
    tree.set_refcnt("kvm", 2)
    modprobe.commands.clear()
    with pytest.raises(HostConfigError, match=r"kvm is in use \(refcnt 2\)"):
        conf.apply(p)
    assert modprobe.commands == []


# --- issue 17 item 1: a failed module reload puts back exactly what was loaded -----------


def test_a_failed_kvm_reload_puts_back_both_modules_and_every_parameter(
    tree: SysfsTreeDouble,
) -> None:
    """`modprobe kvm tdp_mmu=bogus` fails after `modprobe -r kvm_intel kvm`: both modules come
    back with every parameter they had, also one given by hand at their load (nested=N)."""
    tree.unload_module("kvm_intel")
    tree.load_module("kvm_intel", {"nested": "N"})  # loaded by hand with nested=0
    modprobe = ModprobeDouble(tree)
    conf = HostConfigurator(root=tree.root, writer=tree.write, runner=modprobe,
                            restore_file=tree.root / "restore.json")
    # "bogus" is refused by the suite check; here it reaches the (double's) kernel anyway.
    bogus = HostConfigSpec.model_construct(name="bogus", kvm_params={"kvm.tdp_mmu": "bogus"},
                                           thp=None, thp_defrag=None, hugepages_2m=None,
                                           hugepages_1g=None, guest_hugepages=None)
    with pytest.raises(HostConfigError, match="Invalid argument") as err:
        conf.apply(plan(bogus, tree.root))
    assert "restoring the host failed too" not in str(err.value)
    assert tree.loaded("kvm") and tree.loaded("kvm_intel")
    assert tree.read("sys/module/kvm/parameters/tdp_mmu") == "Y"
    assert tree.read("sys/module/kvm/parameters/nx_huge_pages") == "N"
    assert tree.read("sys/module/kvm_intel/parameters/ept") == "Y"
    assert tree.read("sys/module/kvm_intel/parameters/nested") == "N"
    assert modprobe.commands[:2] == [["modprobe", "-r", "kvm_intel", "kvm"],
                                     ["modprobe", "kvm", "tdp_mmu=bogus"]]
    # The first put-back load lost nested=N (a default load); a second one passes it.
    assert modprobe.commands[-1] == ["modprobe", "kvm_intel", "nested=N"]
    assert not (tree.root / "restore.json").exists()


def test_a_restore_that_fails_too_is_reported_and_left_for_host_restore(
    tree: SysfsTreeDouble,
) -> None:
    modprobe = ModprobeDouble(tree)
    record = tree.root / "records" / "1.json"
    conf = HostConfigurator(root=tree.root, writer=tree.write, runner=modprobe,
                            restore_file=record)
    p = plan(spec(kvm_params={"kvm.tdp_mmu": 0}, thp="never"), tree.root)
    modprobe.broken = True  # every load fails, the put-back loads too
    with pytest.raises(HostConfigError) as err:
        conf.apply(p)
    text = str(err.value)
    assert "refuses every load" in text and "restoring the host failed too" in text
    assert str(record) in text and "harness host restore" in text
    # Both modules are gone from sysfs; the record alone says what to load.
    assert not (tree.root / "sys/module/kvm").exists()
    assert not (tree.root / "sys/module/kvm_intel").exists()
    assert [m["name"] for m in json.loads(record.read_text())["modules"]] == ["kvm", "kvm_intel"]
    modprobe.broken = False  # the cause is fixed
    done = restore_from_file(record, runner=modprobe, writer=tree.write)
    assert done is not None and done[1] == []
    assert tree.loaded("kvm") and tree.loaded("kvm_intel")
    assert tree.read("sys/module/kvm/parameters/tdp_mmu") == "Y"
    assert tree.read("sys/kernel/mm/transparent_hugepage/enabled") == "always [madvise] never"
    assert not record.exists()


def test_sysfs_writes_come_after_a_reload_that_would_reset_them(tree: SysfsTreeDouble) -> None:
    """nx_huge_pages is writable, tdp_mmu needs a kvm reload: the reload must not undo it."""
    conf = HostConfigurator(root=tree.root, writer=tree.write, runner=ModprobeDouble(tree))
    with conf.applied(plan(spec(kvm_params={"kvm.tdp_mmu": 0, "kvm.nx_huge_pages": 1}),
                           tree.root)) as record:
        assert tree.read("sys/module/kvm/parameters/nx_huge_pages") == "Y"
    assert record.restored, record.restore_errors
    assert tree.read("sys/module/kvm/parameters/nx_huge_pages") == "N"


# --- issue 17 item 3: restore records owned by a pid, liveness, one host-changer ---------


def _record(tree: SysfsTreeDouble, who: owner.ProcessId | None) -> RestoreRecord:
    """What a run that set THP to never (from madvise) leaves behind."""
    return RestoreRecord(owner=who, name="thp-never", root=str(tree.root),
                         settings=[SavedSetting(key="thp.enabled", value="madvise",
                                                wanted="never")])


def _dead_process() -> owner.ProcessId:
    proc = subprocess.Popen(["sleep", "60"])
    who = owner.process_id(proc.pid)
    proc.kill()
    proc.wait()
    assert who is not None and not owner.is_alive(who)
    return who


def test_a_live_owner_is_never_reverted_a_dead_one_is_reaped(tree: SysfsTreeDouble) -> None:
    records = tree.root / "records"
    tree.write(tree.root / "sys/kernel/mm/transparent_hugepage/enabled", "never")
    live = subprocess.Popen(["sleep", "60"])  # a real live owner: another run
    try:
        who = owner.process_id(live.pid)
        save_record(_record(tree, who), records / f"{live.pid}.json")
        (left,) = reap_leftovers(records, writer=tree.write)
        assert left.live_owner == live.pid and f"pid {live.pid}" in left.description
        assert tree.read("sys/kernel/mm/transparent_hugepage/enabled") == "always madvise [never]"
        with pytest.raises(HostConfigBusy, match=f"belongs to pid {live.pid}, which is still"):
            restore_from_file(records / f"{live.pid}.json", writer=tree.write)
        (changed,), _ = leftover_changes(records)
        assert changed.owner_alive and changed.owner_pid == live.pid
    finally:
        live.kill()
        live.wait()
    # Its owner is dead now: the next run restores it.
    (left,) = reap_leftovers(records, writer=tree.write)
    assert left.live_owner is None and left.errors == ()
    assert tree.read("sys/kernel/mm/transparent_hugepage/enabled") == "always [madvise] never"
    assert list(records.iterdir()) == []


def test_a_reused_pid_is_not_taken_for_the_owner(tree: SysfsTreeDouble) -> None:
    records = tree.root / "records"
    tree.write(tree.root / "sys/kernel/mm/transparent_hugepage/enabled", "never")
    other = subprocess.Popen(["sleep", "60"])  # now holds the pid the dead owner had
    try:
        now = owner.process_id(other.pid)
        assert now is not None and now.start_time is not None
        gone = now.model_copy(update={"start_time": now.start_time - 1})
        assert owner.is_alive(now) and not owner.is_alive(gone)
        save_record(_record(tree, gone), records / f"{other.pid}.json")
        (left,) = reap_leftovers(records, writer=tree.write)
        assert left.live_owner is None
        assert tree.read("sys/kernel/mm/transparent_hugepage/enabled") == "always [madvise] never"
    finally:
        other.kill()
        other.wait()


def test_every_run_sees_a_host_a_dead_run_left_changed(tree: SysfsTreeDouble) -> None:
    records = tree.root / "records"
    assert leftover_changes(records) == ([], [])
    tree.write(tree.root / "sys/kernel/mm/transparent_hugepage/enabled", "never")
    dead = _dead_process()
    save_record(_record(tree, dead), records / f"{dead.pid}.json")
    (left,), problems = leftover_changes(records)
    assert problems == [] and not left.owner_alive and left.owner_pid == dead.pid
    assert [(s.key, s.original, s.now) for s in left.settings] == [
        ("thp.enabled", "madvise", "never")]
    assert "harness host restore" in left.fix
    # Put back by hand: nothing is reported any more.
    tree.write(tree.root / "sys/kernel/mm/transparent_hugepage/enabled", "madvise")
    assert leftover_changes(records) == ([], [])


def test_a_second_host_changing_run_is_refused_naming_the_live_one(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path\n"
         "from harness.host.mmuconfig import host_change_session\n"
         "with host_change_session(Path(sys.argv[1])):\n"
         "    print('held', flush=True); time.sleep(60)\n", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        busy = rf"another harness run \(pid {holder.pid}\)"
        with pytest.raises(HostConfigBusy, match=busy), host_change_session(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    with host_change_session(tmp_path) as records:  # the kernel dropped the dead one's lock
        assert records == tmp_path / "host-config-restore"


def test_a_record_is_checked_like_a_suite(tree: SysfsTreeDouble) -> None:
    path = tree.root / "records" / "7.json"
    path.parent.mkdir()
    bad = _record(tree, None).model_dump()
    bad["settings"][0]["value"] = "madvise\n"
    path.write_text(json.dumps(bad))
    with pytest.raises(HostConfigError, match=r"7\.json: unreadable restore record"):
        restore_from_file(path, writer=tree.write)


# --- issue 17 item 8: strict values, one argv element each -------------------------------


@pytest.mark.parametrize(("params", "message"), [
    ({"kvm_intel.ept": "0 nested=0"}, "kvm_intel.ept: takes true or false"),
    ({"kvm_intel.ept\n": 0}, r"'kvm_intel.ept\\n' is not 'module.parameter'"),
    ({"kvm_intel.future_knob": "0 nested=0"}, "not one token"),
    ({"kvm_intel.future_knob": "a\nb"}, "not one token"),
    ({"kvm.halt_poll_ns": -5}, r"integer in 0\.\.4294967295"),
    ({"kvm.tdp_mmu": "bogus"}, "takes true or false"),
    ({"kvm_intel.vmentry_l1d_flush": "sometimes"}, "takes one of 'always', 'cond', 'never'"),
])
def test_host_parameter_values_are_strict(params: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(kvm_params=params)
    ((key, value),) = params.items()
    problem = check_param(key, value)
    assert problem is not None and "fix:" in problem


def test_good_values_pass_and_each_becomes_one_argument() -> None:
    for key, value in [("kvm_intel.ept", 0), ("kvm_intel.ept", True), ("kvm.tdp_mmu", "N"),
                       ("kvm.nx_huge_pages", "never"), ("kvm_amd.nested", 1),
                       ("kvm.lapic_timer_advance_ns", -1), ("kvm_intel.future_knob", "a,b-1")]:
        assert check_param(key, value) is None, (key, value)
    assert load_command("kvm_intel", [("ept", "0")]) == ["modprobe", "kvm_intel", "ept=0"]
    with pytest.raises(HostConfigError, match="refusing to pass '0 nested=0'"):
        load_command("kvm_intel", [("ept", "0 nested=0")])


def test_a_reload_keeps_the_parameters_it_was_not_asked_to_change(tree: SysfsTreeDouble) -> None:
    """kvm_intel was loaded by hand with nested=0; a reload for ept=0 keeps nested=0."""
    tree.unload_module("kvm_intel")
    tree.load_module("kvm_intel", {"nested": "N"})
    modprobe = ModprobeDouble(tree)
    conf = HostConfigurator(root=tree.root, writer=tree.write, runner=modprobe)
    with conf.applied(plan(spec(kvm_params={"kvm_intel.ept": 0}), tree.root)) as record:
        assert tree.read("sys/module/kvm_intel/parameters/ept") == "N"
        assert tree.read("sys/module/kvm_intel/parameters/nested") == "N"
        assert record.commands[-1] == "modprobe kvm_intel ept=0 nested=N"
        # The kernel's own consequence of ept=0 is recorded, not fought with another reload.
        assert record.side_effects == ["kvm_intel.unrestricted_guest: Y -> N"]
        assert modprobe.commands.count(["modprobe", "-r", "kvm_intel"]) == 2
    assert record.restored, record.restore_errors
    assert tree.read("sys/module/kvm_intel/parameters/ept") == "Y"
    assert tree.read("sys/module/kvm_intel/parameters/nested") == "N"


def test_a_record_from_before_a_reboot_is_dropped_not_replayed(tree: SysfsTreeDouble) -> None:
    records = tree.root / "records"
    tree.write(tree.root / "sys/kernel/mm/transparent_hugepage/enabled", "never")
    earlier = _dead_process().model_copy(update={"boot_id": "00000000-0000-0000-0000-0"})
    save_record(_record(tree, earlier), records / f"{earlier.pid}.json")
    assert leftover_changes(records) == ([], [])
    (left,) = reap_leftovers(records, writer=tree.write)
    assert "before the last reboot" in left.description
    assert tree.read("sys/kernel/mm/transparent_hugepage/enabled") == "always madvise [never]"
    assert list(records.iterdir()) == []


_KEYS = st.one_of(
    st.sampled_from(sorted(KNOWN_PARAMS)),
    st.from_regex(r"\A(kvm|kvm_intel|kvm_amd)\.[a-z0-9_]{1,20}\n?\Z"),  # unknown parameters
    st.builds(lambda m, p: f"{m}.{p}", st.sampled_from(["kvm", "kvm_intel", "kvm_amd", "kvmx"]),
              st.text(min_size=0, max_size=70)),
    st.text(max_size=40),
)
_VALUES = st.one_of(st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.text(max_size=80),
                    st.text(alphabet="aY0,.-_ =", min_size=1, max_size=20),  # near misses
                    st.text(alphabet="aY0 =\n\t,.-_'\"$;", max_size=70))


@settings(max_examples=400, deadline=None)
@given(key=_KEYS, value=_VALUES)
def test_any_parameter_is_refused_with_a_fix_or_becomes_exactly_one_argument(
    key: str, value: bool | int | str
) -> None:
    problem = check_param(key, value)
    if problem is not None:
        assert "fix:" in problem
        with pytest.raises(ValidationError):
            spec(kvm_params={key: value})
        return
    module, param = key.split(".", 1)
    text = spec(kvm_params={key: value}).settings()[0][1]
    argv = load_command(module, [(param, text)])
    assert argv[:2] == ["modprobe", module] and len(argv) == 3
    assert argv[2].split("=", 1)[0] == param
    assert not any(c.isspace() for c in argv[2]) and argv[2].count("=") == 1


def test_a_symlink_planted_as_the_lock_is_refused_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (tmp_path / "host-config.lock").symlink_to(victim)
    refused = r"host-config\.lock: cannot take the host-change"
    with pytest.raises(HostConfigError, match=refused), host_change_session(tmp_path):
        pass
    assert victim.read_text() == "keep\n"
