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
import signal
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydantic import ValidationError

from harness.host.mmuconfig import (
    HostConfigError,
    HostConfigInterrupted,
    HostConfigSpec,
    HostConfigurator,
    plan,
    restore_from_file,
    write_sysfs,
)

#: Defaults a real reload would give a parameter not passed to modprobe.
DEFAULTS = {"kvm": {"tdp_mmu": "Y", "nx_huge_pages": "N"}, "kvm_intel": {"ept": "Y"}}


class SysfsTreeDouble:
    """A /sys-like tree under tmp_path (test double for the host's sysfs)."""

    def __init__(
        self, root: Path, *, builtin_kvm: bool = False, vendor: str = "kvm_intel"
    ) -> None:
        self.root = root
        self.vendor = vendor
        self.param("kvm", "tdp_mmu", "Y", writable=False)
        self.param("kvm", "nx_huge_pages", "N", writable=True)
        self.param(vendor, "ept" if vendor == "kvm_intel" else "npt", "Y", writable=False)
        for mod in ("kvm", vendor):
            if not (builtin_kvm and mod == "kvm"):
                (root / f"sys/module/{mod}/initstate").write_text("live\n")
                self.set_refcnt(mod, 0)
        if not builtin_kvm:
            # The vendor module holds kvm, as the kernel shows it.
            (root / "sys/module/kvm/holders").mkdir()
            (root / f"sys/module/kvm/holders/{vendor}").touch()
            self.set_refcnt("kvm", 1)
        thp = root / "sys/kernel/mm/transparent_hugepage"
        thp.mkdir(parents=True)
        (thp / "enabled").write_text("always [madvise] never\n")
        (thp / "defrag").write_text("always defer defer+madvise [madvise] never\n")
        hp = root / "sys/kernel/mm/hugepages/hugepages-2048kB"
        hp.mkdir(parents=True)
        (hp / "nr_hugepages").write_text("0\n")

    def param(self, module: str, name: str, value: str, *, writable: bool) -> None:
        d = self.root / f"sys/module/{module}/parameters"
        d.mkdir(parents=True, exist_ok=True)
        f = d / name
        f.write_text(value + "\n")
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
    """Stands in for modprobe: records commands and rewrites the tree's parameter files."""

    def __init__(self, tree: SysfsTreeDouble, fail_on: str | None = None) -> None:
        self.tree = tree
        self.commands: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, argv: Sequence[str]) -> None:
        argv = list(argv)
        self.commands.append(argv)
        if self.fail_on is not None and self.fail_on in " ".join(argv):
            raise HostConfigError(f"{' '.join(argv)} failed (exit 1): double told to fail")
        if argv[:2] == ["modprobe", "-r"]:
            return
        module, params = argv[1], dict(a.split("=", 1) for a in argv[2:])
        for name, default in DEFAULTS.get(module, {}).items():
            path = self.tree.root / f"sys/module/{module}/parameters/{name}"
            mode = path.stat().st_mode & 0o777
            path.chmod(0o644)
            value = params.get(name, default)
            path.write_text({"0": "N", "1": "Y"}.get(value, value) + "\n")
            path.chmod(mode)


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
    assert p.commands() == [
        "echo Y > /sys/module/kvm/parameters/nx_huge_pages",
        "echo never > /sys/kernel/mm/transparent_hugepage/enabled",
        "echo 64 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
        "modprobe -r kvm_intel",
        "modprobe kvm_intel ept=0",
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
    with pytest.raises(HostConfigError, match=r"'ept' is not 'module\.parameter'"):
        plan(spec(kvm_params={"ept": 0}), Path("/nonexistent"))
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
