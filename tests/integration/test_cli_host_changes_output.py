"""`harness run --allow-host-changes` prints what a plain run prints: the per-phase
table, or with --json the results (a JSON array, one per host configuration).

The configuration sets THP to the mode the host already has, so the shared host is
never changed by this test; the apply/restore path runs in full all the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.host.facts import parse_thp_mode
from harness.host.mmuconfig import THP_ENABLED

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="changing /sys needs root"),
    pytest.mark.skipif(not os.access("/" + THP_ENABLED, os.W_OK), reason="THP not writable"),
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm"),
]

SUITE = """\
name = "thp-same"
repetitions = 1

[[vms]]
name = "paging"
image = "paging"
memory_mib = 16
accelerator = "kvm"
boot_timeout_s = 60

[[runs]]
workload = "paging-cr3"
vm = "paging"
params = {{ address_spaces = 5, switches = 100 }}

[[host_configs]]
name = "thp-as-is"
thp = "{mode}"
"""


def _run(tmp_path: Path, suite: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    # The default cache: QEMU (as libvirt-qemu) cannot reach a ROM under pytest's tmp_path.
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(suite), "--allow-host-changes",
         "--results-dir", str(tmp_path / "results"), *flags],
        capture_output=True, text=True, timeout=300, check=False,
    )


def test_json_and_table_are_printed_with_host_changes(tmp_path: Path) -> None:
    mode = parse_thp_mode(Path("/" + THP_ENABLED).read_text())
    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE.format(mode=mode))

    as_json = _run(tmp_path, suite, "--json")
    assert as_json.returncode == 0, as_json.stderr[-3000:]
    (result,) = json.loads(as_json.stdout)  # stdout is the JSON alone
    assert result["host_config"]["name"] == "thp-as-is"
    assert result["status"] == "complete"
    assert "result (thp-as-is):" in as_json.stderr

    table = _run(tmp_path, suite)
    assert table.returncode == 0, table.stderr[-3000:]
    assert "cr3-visit" in table.stdout and "attribution" in table.stdout  # the phase table
    assert "result (thp-as-is):" in table.stdout
    assert parse_thp_mode(Path("/" + THP_ENABLED).read_text()) == mode
