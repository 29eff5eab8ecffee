"""A Windows VM through `harness run`, as far as this host allows: the real session, domain
and teardown, with an image whose disk holds no Windows (none can be had here).

The image entry is made by the real build around INSTALL_DOUBLE (Windows Setup
replaced; the disk stays empty), so OVMF finds nothing to boot and WinRM never
answers: the run must say so after the VM's boot timeout, record the guest's
facts without any secret, and leave no domain, swtpm, NVRAM or TPM state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import libvirt
import pytest

from harness.image.windows import PASSWORD_ENV
from harness.image.windows_build import build_windows_image, check_inputs
from harness.vm import lifecycle
from harness.vm.windows import SWTPM_STATE_DIR
from tests.integration.conftest import vm_workdir
from tests.unit.test_windows_image_build import InstallDouble, make_iso

pytestmark = [
    pytest.mark.integration,
    pytest.mark.requires(root=True, tools=["xorriso", "x86_64-w64-mingw32-gcc", "swtpm"]),
    pytest.mark.timeout(300),
]

PASSWORD = "run-secret-93xQ"
SUITE = """
name = "win-session"
[[vms]]
name = "win"
image = "windows"
memory_mib = 512
accelerator = "tcg"
boot_timeout_s = 10
[[runs]]
workload = "page-touch-win"
vm = "win"
params = { mib = 1 }
"""


def harness_run(
    suite: Path, results: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(suite), "--no-trace", "-q",
         "--results-dir", str(results)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=240,
    )


def test_windows_run_without_windows_says_so_and_leaves_nothing(tmp_path: Path) -> None:
    with vm_workdir("wincache-") as cache:
        iso, virtio = make_iso(tmp_path / "w.iso", "W"), make_iso(tmp_path / "v.iso", "V")
        inputs = check_inputs(iso, virtio, "Windows 11 Pro", env={PASSWORD_ENV: PASSWORD})
        build_windows_image(inputs, InstallDouble(), progress=lambda s: None, cache=cache)
        suite = tmp_path / "s.toml"
        suite.write_text(SUITE)
        conn = lifecycle.connect()
        before = set(conn.listDomainsID())

        # No password: refused before any domain exists.
        r = harness_run(suite, tmp_path / "r1", {"HARNESS_CACHE": str(cache), PASSWORD_ENV: ""})
        assert r.returncode != 0 and PASSWORD_ENV in r.stderr + r.stdout
        assert set(conn.listDomainsID()) <= before

        results = tmp_path / "r2"
        r = harness_run(suite, results, {"HARNESS_CACHE": str(cache), PASSWORD_ENV: PASSWORD})
        out = r.stdout + r.stderr
        assert r.returncode != 0, out
        assert "did not answer WinRM within 10 s" in out and PASSWORD not in out
        (result_file,) = results.glob("*.json")
        text = result_file.read_text()
        assert PASSWORD not in text
        vm = json.loads(text)["vms"][0]
        assert vm["image"] == "windows" and vm["accelerator"] == "tcg"
        facts = vm["image_packages"]
        assert facts["os"] == "windows" and facts["build"] == "10.0.22631.2861"
        assert "vpindex" in facts["hyperv_dropped"]
        name = vm["domain"]
        deadline = time.monotonic() + 15
        while name in [d.name() for d in conn.listAllDomains()] and time.monotonic() < deadline:
            time.sleep(0.5)
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(name)
        vm_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, name))
        assert not (SWTPM_STATE_DIR / vm_uuid).exists()
        swtpm = subprocess.run(["pgrep", "-f", f"swtpm.*{vm_uuid}"], capture_output=True)
        assert swtpm.returncode == 1, swtpm.stdout
        assert list(cache.glob("runs/*/*.VARS.fd")) == []
        conn.close()
