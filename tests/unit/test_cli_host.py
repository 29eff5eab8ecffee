"""`harness host plan` / `host restore` / `run --allow-host-changes` / `validate` on a sysfs
tree laid out by the test (SysfsTreeDouble, see tests/unit/test_host_mmuconfig.py), with
``HARNESS_CACHE`` in tmp_path: plans change nothing, bad values exit 2, a live run's lock or
record is never overridden, a dead run's record is restored."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from harness.cli import main
from harness.host import owner
from harness.host.mmuconfig import HOST_RESTORE_DIR, RestoreRecord, SavedSetting, save_record
from harness.results import RunResult
from harness.run import note_host_left_changed
from tests.unit import synthetic_results
from tests.unit.test_host_mmuconfig import SysfsTreeDouble

SUITE = """\
name = "matrix"

[[vms]]
name = "paging"
image = "paging"
memory_mib = 16
accelerator = "kvm"

[[runs]]
workload = "paging-cr3"
vm = "paging"

[[host_configs]]
name = "shadow"
kvm_params = {{ "kvm_intel.ept" = 0 }}
thp = "never"
{extra}
"""


def _tree_snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file()}


def test_plan_prints_exact_commands_and_changes_nothing(tmp_path: Path) -> None:
    tree = SysfsTreeDouble(tmp_path / "host")
    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE.format(extra=""))
    before = _tree_snapshot(tree.root)
    out = CliRunner().invoke(main, ["host", "plan", str(suite), "--root", str(tree.root)])
    assert out.exit_code == 0, out.output
    assert "kvm_intel.ept: Y -> 0  [reload]" in out.output
    assert "echo never > /sys/kernel/mm/transparent_hugepage/enabled" in out.output
    assert "modprobe -r kvm_intel\n" in out.output and "modprobe kvm_intel ept=0" in out.output
    assert "--allow-host-changes" in out.output
    assert _tree_snapshot(tree.root) == before


def test_plan_fails_when_a_configuration_cannot_apply(tmp_path: Path) -> None:
    tree = SysfsTreeDouble(tmp_path / "host", builtin_kvm=True)
    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE.format(
        extra='\n[[host_configs]]\nname = "no-tdp"\nkvm_params = { "kvm.tdp_mmu" = 0 }\n'))
    out = CliRunner().invoke(main, ["host", "plan", str(suite), "--root", str(tree.root)])
    assert out.exit_code == 2  # bad input for this host, as elsewhere (1 is compare's regression)
    assert "built into this kernel" in out.output
    assert "not applicable on this host: no-tdp" in out.output


def test_run_refuses_host_configurations_without_the_flag(tmp_path: Path) -> None:
    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE.format(extra=""))
    out = CliRunner().invoke(main, ["run", str(suite)])
    assert out.exit_code != 0
    assert "harness host plan" in out.output and "--allow-host-changes" in out.output


def test_validate_refuses_a_parameter_value_that_would_be_two_arguments(tmp_path: Path) -> None:
    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE.format(extra="").replace('"kvm_intel.ept" = 0',
                                                     '"kvm_intel.ept" = "0 nested=0"'))
    out = CliRunner().invoke(main, ["validate", str(suite)])
    assert out.exit_code == 2, out.output
    assert f"{suite}:" in out.output and "host_configs[0].kvm_params" in out.output
    assert "kvm_intel.ept: takes true or false, not '0 nested=0'" in out.output
    assert "fix: give kvm_intel.ept true or false" in out.output


def test_validate_refuses_a_key_with_a_trailing_newline(tmp_path: Path) -> None:
    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE.format(extra="").replace('"kvm_intel.ept" = 0',
                                                     '"kvm_intel.ept\\n" = 0'))
    out = CliRunner().invoke(main, ["validate", str(suite)])
    assert out.exit_code == 2, out.output
    assert r"'kvm_intel.ept\n' is not 'module.parameter'" in out.output


def _holding_the_lock(cache: Path) -> subprocess.Popen[str]:
    """A real second process that holds the host-change lock, as a live run does."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path\n"
         "from harness.host.mmuconfig import host_change_session\n"
         "with host_change_session(Path(sys.argv[1])):\n"
         "    print('held', flush=True); time.sleep(60)\n", str(cache)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def test_a_second_host_changing_run_exits_2_naming_the_live_one(tmp_path: Path) -> None:
    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE.format(extra=""))
    cache = tmp_path / "cache"
    holder = _holding_the_lock(cache)
    try:
        for args in (["run", str(suite), "--allow-host-changes"], ["host", "restore"]):
            out = CliRunner().invoke(main, args, env={"HARNESS_CACHE": str(cache)})
            assert out.exit_code == 2, out.output
            assert f"another harness run (pid {holder.pid})" in out.output
            assert f"wait for pid {holder.pid} to end" in out.output
    finally:
        holder.kill()
        holder.wait()


def _leave_record(tree: SysfsTreeDouble, cache: Path, who: owner.ProcessId) -> Path:
    """What a run that reserved 16 huge pages (from 0) leaves when it is killed."""
    hp = "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
    (tree.root / hp).write_text("16\n")
    path = cache / HOST_RESTORE_DIR / f"{who.pid}.json"
    save_record(RestoreRecord(owner=who, name="hp16", root=str(tree.root),
                              settings=[SavedSetting(key="hugepages.2048kB", value="0",
                                                     wanted="16")]), path)
    return path


def test_host_restore_finishes_a_dead_run_and_leaves_a_live_one(tmp_path: Path) -> None:
    tree = SysfsTreeDouble(tmp_path / "host")
    cache = tmp_path / "cache"
    live = subprocess.Popen(["sleep", "60"])
    try:
        who = owner.process_id(live.pid)
        assert who is not None
        record = _leave_record(tree, cache, who)
        out = CliRunner().invoke(main, ["host", "restore"], env={"HARNESS_CACHE": str(cache)})
        assert out.exit_code == 2, out.output
        assert f"pid {live.pid}" in out.output and "still running" in out.output
        assert tree.read("sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages") == "16"
        assert record.exists()
    finally:
        live.kill()
        live.wait()
    out = CliRunner().invoke(main, ["host", "restore"], env={"HARNESS_CACHE": str(cache)})
    assert out.exit_code == 0, out.output
    assert "host configuration restored" in out.output
    assert tree.read("sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages") == "0"
    assert not record.exists()
    out = CliRunner().invoke(main, ["host", "restore"], env={"HARNESS_CACHE": str(cache)})
    assert out.exit_code == 0 and "nothing to restore" in out.output


def test_a_plain_run_records_and_reports_a_host_a_killed_run_left_changed(
    tmp_path: Path,
) -> None:
    """What run_suite does for every run, plain ones included, before anything boots."""
    tree = SysfsTreeDouble(tmp_path / "host")
    cache = tmp_path / "cache"
    gone = subprocess.Popen(["sleep", "60"])
    who = owner.process_id(gone.pid)
    gone.kill()
    gone.wait()
    assert who is not None
    _leave_record(tree, cache, who)
    result = synthetic_results.result("left-changed", 1.0)
    steps = StepsDouble()
    note_host_left_changed(result, steps, cache / HOST_RESTORE_DIR)
    (left,) = result.host_left_changed
    assert (left.owner_pid, left.owner_alive, left.config) == (who.pid, False, "hp16")
    assert [(s.key, s.original, s.now) for s in left.settings] == [("hugepages.2048kB", "0", "16")]
    (line,) = steps.lines
    assert f"killed run pid {who.pid}" in line and "harness host restore" in line
    # The field survives the result file's round trip.
    again = RunResult.model_validate_json(result.model_dump_json())
    assert again.host_left_changed == result.host_left_changed


class StepsDouble:
    """A progress reporter double: keeps the step lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def step(self, text: str) -> None:
        self.lines.append(text)

    def phase(self, run: object, phase: object) -> None:
        pass
