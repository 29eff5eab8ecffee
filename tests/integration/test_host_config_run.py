"""`harness run --allow-host-changes` on this host: THP mode applied per configuration,
recorded in each result, and restored afterwards, also when the run is killed by SIGTERM.

The host THP mode is the setting this machine lets the harness change for
real; module parameters are covered on a test-made sysfs tree
(tests/unit/test_host_mmuconfig.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness.host.facts import parse_thp_mode
from harness.host.mmuconfig import THP_ENABLED
from tests.faults.helpers_a import private_cache

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="changing /sys needs root"),
    pytest.mark.skipif(not os.access("/" + THP_ENABLED, os.W_OK), reason="THP not writable"),
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm"),
]

THP = Path("/" + THP_ENABLED)

SUITE = """\
name = "thp-matrix"
repetitions = 1

[[vms]]
name = "paging"
image = "paging"
memory_mib = 16
accelerator = "kvm"
boot_timeout_s = {timeout}

[[runs]]
workload = "paging-cr3"
vm = "paging"
params = {{ address_spaces = 5, switches = {switches} }}

{configs}
[trace]
probes = ["default"]
"""


def _configs(modes: list[str]) -> str:
    return "".join(f'[[host_configs]]\nname = "thp-{m}"\nthp = "{m}"\n\n' for m in modes)


def _harness(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", *args]


def test_each_configuration_is_applied_recorded_and_restored(tmp_path: Path) -> None:
    before = parse_thp_mode(THP.read_text())
    modes = [m for m in ("never", "always", "madvise") if m != before]
    suite = tmp_path / "suite.toml"
    suite.write_text(SUITE.format(timeout=60, switches=100, configs=_configs(modes)))
    refused = subprocess.run(_harness("run", str(suite)), capture_output=True, text=True,
                             check=False)
    assert refused.returncode != 0 and "--allow-host-changes" in refused.stderr
    proc = subprocess.run(
        _harness("run", str(suite), "--allow-host-changes", "--quiet",
                 "--results-dir", str(tmp_path / "results")),
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert parse_thp_mode(THP.read_text()) == before
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "results").glob("*.json"))]
    by_config = {r["host_config"]["name"]: r for r in results}
    assert set(by_config) == {f"thp-{m}" for m in modes}
    for m in modes:
        r: dict[str, Any] = by_config[f"thp-{m}"]
        assert r["status"] == "complete"
        assert r["host"]["thp_enabled"] == m  # the facts were read under the configuration
        (setting,) = r["host_config"]["settings"]
        assert (setting["before"], setting["wanted"], setting["after"]) == (before, m, m)
        assert r["host_config"]["restored"] is True


def test_sigterm_during_the_run_restores_the_host(tmp_path: Path) -> None:
    before = parse_thp_mode(THP.read_text())
    other = "never" if before != "never" else "always"
    suite = tmp_path / "suite.toml"
    # About 45 s of CR3 writes: long enough to be interrupted inside the phase.
    suite.write_text(SUITE.format(timeout=120, switches=10_000_000, configs=_configs([other])))
    proc = subprocess.Popen(
        _harness("run", str(suite), "--allow-host-changes", "--quiet",
                 "--results-dir", str(tmp_path / "results")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while parse_thp_mode(THP.read_text()) != other or not list(
            (tmp_path / "results").glob("*.json")
        ):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the configuration was never applied"
            time.sleep(0.2)
        time.sleep(2)  # inside the guest's long phase
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert parse_thp_mode(THP.read_text()) == before, "SIGTERM left the host changed"
    (path,) = (tmp_path / "results").glob("*.json")
    result = json.loads(path.read_text())
    assert result["status"] == "incomplete"
    assert result["host_config"]["name"] == f"thp-{other}"


def test_a_killed_runs_changes_are_reported_by_a_plain_run_and_restored(tmp_path: Path) -> None:
    """SIGKILL leaves THP changed. While the host-changing run lived, a second one was refused
    (exit 2, naming it) and did not revert it; after the kill a plain run records and prints
    the host it measured as still changed; `harness host restore` puts it back."""
    before = parse_thp_mode(THP.read_text())
    other = "never" if before != "never" else "always"
    with private_cache(share_images=True) as cache:  # libvirt-qemu reaches it, tmp_path not
        _killed_run_left_changed(tmp_path, cache, before, other)


def _killed_run_left_changed(tmp_path: Path, cache: Path, before: str | None, other: str) -> None:
    env = {**os.environ, "HARNESS_CACHE": str(cache)}
    records = cache / "host-config-restore"
    changing = tmp_path / "changing.toml"
    changing.write_text(SUITE.format(timeout=120, switches=10_000_000,
                                     configs=_configs([other])))
    plain = tmp_path / "plain.toml"
    plain.write_text(SUITE.format(timeout=60, switches=100, configs=""))
    first = subprocess.Popen(
        _harness("run", str(changing), "--allow-host-changes", "--quiet",
                 "--results-dir", str(tmp_path / "killed")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while parse_thp_mode(THP.read_text()) != other or not (
            records / f"{first.pid}.json"
        ).exists():
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            assert time.monotonic() < deadline, "the configuration was never applied"
            time.sleep(0.2)
        second = subprocess.run(
            _harness("run", str(changing), "--allow-host-changes", "--quiet",
                     "--results-dir", str(tmp_path / "second")),
            capture_output=True, text=True, timeout=120, check=False, env=env,
        )
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"another harness run (pid {first.pid})" in second.stderr
        assert parse_thp_mode(THP.read_text()) == other, "the second run reverted a live run"
        first.kill()
        first.communicate(timeout=60)
        assert parse_thp_mode(THP.read_text()) == other  # SIGKILL: nobody restored it
        run = subprocess.run(
            _harness("run", str(plain), "--quiet", "--results-dir", str(tmp_path / "plain")),
            capture_output=True, text=True, timeout=300, check=False, env=env,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"host still changed by killed run pid {first.pid}" in run.stderr
        assert "harness host restore" in run.stderr
        (path,) = (tmp_path / "plain").glob("*.json")
        result = json.loads(path.read_text())
        assert result["host_config"] is None and result["host"]["thp_enabled"] == other
        (left,) = result["host_left_changed"]
        assert (left["owner_pid"], left["owner_alive"]) == (first.pid, False)
        assert left["settings"] == [{"key": "thp.enabled", "original": before, "now": other}]
        restore = subprocess.run(_harness("host", "restore"), capture_output=True, text=True,
                                 timeout=60, check=False, env=env)
        assert restore.returncode == 0, restore.stdout + restore.stderr
        assert parse_thp_mode(THP.read_text()) == before
        assert list(records.glob("*.json")) == []
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        if parse_thp_mode(THP.read_text()) != before:  # leave the shared host as it was
            THP.write_text(f"{before}\n")
