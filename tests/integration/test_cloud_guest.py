"""A guest the harness did not build, through the cloud platform and the real CLI.

The stand-in for a vendor cloud image (harness/image/cloud_standin.py: no key,
no user baked in) boots under TCG with nothing but the per-boot NoCloud seed,
under SeaBIOS and OVMF at once (tests/integration/suites/cloud-standin.toml),
reaches SSH with the seed's host key pinned, runs page-touch (copied in) and
stress-ng (found in the image), records a workload whose package program the
image lacks as skipped, and leaves nothing behind. Bad input is refused
before booting; a guest that never answers SSH fails its boot with the
console quoted, and still leaves nothing behind. A third VM boots the
stand-in's own kernel and initrd directly on the same disk (a guest kernel
under test on a cloud image).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.image.cloud_standin import CloudStandin
from harness.image.guest_tools import build_guest_tools
from harness.paths import cache_dir
from tests.integration.test_run_linux import assert_cleaned_up, only_result, run_harness

pytestmark = pytest.mark.integration

SUITE = Path(__file__).parent / "suites" / "cloud-standin.toml"


def with_disk(
    tmp_path: Path, disk: Path, edit: dict[str, str] | None = None, extra: str = ""
) -> Path:
    """A copy of the suite in ``tmp_path`` with ``disk`` linked beside it (text replaced,
    ``extra`` appended)."""
    (tmp_path / "cloud-standin.qcow2").symlink_to(disk)
    shutil.copytree(SUITE.parent / "cloud-workloads", tmp_path / "cloud-workloads")
    text = SUITE.read_text()
    for old, new in (edit or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    suite = tmp_path / SUITE.name
    suite.write_text(text + extra)
    return suite


#: The stand-in's own kernel booted directly on its disk (no bootloader), with a command
#: line of the test's: a guest kernel under test on a cloud image.
DIRECT_CMDLINE_MARK = "harness.direct_boot=1"
DIRECT_VM = """
[[vms]]
name = "cloud-kernel"
image = "cloud"
disk = "cloud-standin.qcow2"
os_user = "bench"
kernel = "vmlinuz"
initrd = "initrd.img"
cmdline = "{cmdline} {mark}"
vcpus = 1
memory_mib = 512
accelerator = "tcg"
boot_timeout_s = 420

[[runs]]
workload = "page-touch"
vm = "cloud-kernel"
params = {{ mib = 16, passes = 2 }}
warmup = 0
"""


def extract_kernel(image: CloudStandin, into: Path) -> tuple[Path, Path]:
    """The stand-in's /boot/vmlinuz-* and initrd.img-*, read with debugfs at the root
    partition's offset of a raw copy (nothing mounted)."""
    from harness.image import cloud_standin as cs

    raw = into / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image.disk), str(raw)], check=True)
    recipe = cs.load_recipe()
    root = cs.disk_layout(recipe.disk_gib, recipe.esp_mib, recipe.root_label).root
    out = []
    for name, dest in ((f"vmlinuz-{image.kernel_release}", "vmlinuz"),
                       (f"initrd.img-{image.kernel_release}", "initrd.img")):
        subprocess.run(["debugfs", "-R", f"dump /boot/{name} {into / dest}",
                        f"{raw}?offset={root.offset}"], check=True, capture_output=True)
        assert (into / dest).stat().st_size > 0, f"{name} not in the stand-in's /boot"
        out.append(into / dest)
    raw.unlink()
    return out[0], out[1]


def left_in_run_dir(run_id: str) -> list[Path]:
    run_dir = cache_dir() / "runs" / run_id
    return sorted(run_dir.rglob("*")) if run_dir.exists() else []


def assert_nothing_left(data: dict[str, Any], results: Path) -> None:
    """Domains, overlays, NVRAM copies, seeds and keys are gone; no key reached the results."""
    assert_cleaned_up(data["run_id"])
    assert not left_in_run_dir(data["run_id"])
    for f in results.iterdir():
        text = f.read_text(errors="replace")
        assert "PRIVATE KEY" not in text, f"a private key in {f}"


def test_stand_in_cloud_image_boots_with_bios_and_uefi(
    tmp_path: Path, cloud_standin: CloudStandin
) -> None:
    kernel, _initrd = extract_kernel(cloud_standin, tmp_path)
    suite = with_disk(
        tmp_path, cloud_standin.disk,
        edit={'vms = ["cloud-bios", "cloud-uefi"]': 'vms = ["cloud-bios", "cloud-uefi", '
              '"cloud-kernel"]'},
        extra=DIRECT_VM.format(cmdline=cloud_standin.cmdline, mark=DIRECT_CMDLINE_MARK),
    )
    results = tmp_path / "results"
    proc = run_harness(suite, results, timeout=900)
    data = only_result(results)
    print("\n".join(line for line in proc.stderr.splitlines() if "after" in line))
    # kv-store, skipped (no redis in the image), and cloud-hang, past its timeout, are work
    # asked for and not done: the run is "failed" (exit 1) with no error; the rest is ok.
    assert (proc.returncode, data["status"], data["errors"]) == (1, "failed", []), (
        proc.stderr[-4000:])
    tools = build_guest_tools()
    disk_sha = hashlib.sha256(cloud_standin.disk.read_bytes()).hexdigest()
    vms = {vm["name"]: vm for vm in data["vms"]}
    assert set(vms) == {"cloud-bios", "cloud-uefi", "cloud-kernel"}
    for firmware in ("bios", "uefi"):
        vm = vms[f"cloud-{firmware}"]
        assert vm["image"] == "cloud" and vm["group"] == "firmwares"
        assert vm["image_digest"] == disk_sha
        packages = vm["image_packages"]
        assert packages["firmware"] == firmware and packages["disk_format"] == "qcow2"
        assert packages["disk"] == str(cloud_standin.disk.resolve())
        assert packages["cloud_init"] == "done"
        identity = vm["guest_identity"]
        assert identity["os_id"] == "debian" and identity["disk_sha256"] == disk_sha
        assert identity["kernel_release"] == cloud_standin.kernel_release
        assert 0 < vm["boot_to_ready_s"] < 420
        print(f"{firmware}: ready (SSH, cloud-init done, tools in) after "
              f"{vm['boot_to_ready_s']:.1f} s")
        console = Path(vm["console_log"])
        assert console.parent == results and console.stat().st_size > 0
    # The kernel under test: booted directly (no firmware's bootloader), with the test's
    # command line, recorded by the digest of the file the host booted.
    direct = vms["cloud-kernel"]
    assert direct["image_packages"]["firmware"] == "direct kernel boot"
    assert direct["image_packages"]["kernel"] == cloud_standin.kernel_release
    identity = direct["guest_identity"]
    assert DIRECT_CMDLINE_MARK in identity["kernel_cmdline"]
    assert identity["kernel_sha256"] == hashlib.sha256(kernel.read_bytes()).hexdigest()
    assert identity["kernel_release"] == cloud_standin.kernel_release
    assert identity["disk_sha256"] == disk_sha

    runs = {(r["vm"], r["workload"]): r for r in data["runs"]}
    for vm_name in vms:
        touch = runs[(vm_name, "page-touch")]
        assert touch["status"] == "ok", touch
        (phase,) = touch["phases"]
        assert phase["metrics"]["first_touch_mib_per_s"] > 0
        assert phase["metrics"]["retouch_mib_per_s"] > 0
        assert "unable to resolve host" not in phase["stderr_tail"]  # /etc/hosts has the name
        if vm_name == "cloud-kernel":
            continue  # page-touch only
        stress = runs[(vm_name, "stress-ng-vm")]
        assert stress["status"] == "ok", stress
        assert stress["phases"][0]["metrics"]["bogo_ops"] > 0
    hang = runs[("cloud-uefi", "cloud-hang")]
    assert hang["status"] == "failed" and hang["phases"][0]["status"] == "timeout"
    assert "killed 1 process group(s)" in hang["phases"][0]["error"], hang["phases"][0]["error"]
    assert "the boot goes on" in hang["phases"][0]["error"]
    skipped = runs[("cloud-bios", "kv-store")]
    assert skipped["status"] == "skipped" and not skipped["phases"]
    assert "redis-server" in skipped["reason"] and "network = true" in skipped["reason"]
    assert tools.sha256["page-touch"]  # the copy was checked against this build
    assert_nothing_left(data, results)


@pytest.mark.parametrize(
    ("edit", "field", "words"),
    [
        ({'disk = "cloud-standin.qcow2"\nos_user = "bench"\nfirmware = "bios"':
          'disk = "gone.qcow2"\nos_user = "bench"\nfirmware = "bios"'},
         "vms[0].disk", "does not exist"),
        ({'disk = "cloud-standin.qcow2"\nos_user = "bench"\nfirmware = "bios"':
          'disk = "notes.txt"\nos_user = "bench"\nfirmware = "bios"'},
         "vms[0].disk", "not a disk image"),
        ({'firmware = "bios"': 'firmware = "bios"\npackages = ["redis-server"]'},
         "vms[0].packages", "set network = true"),
    ],
)
def test_bad_input_is_refused_before_booting(
    tmp_path: Path, edit: dict[str, str], field: str, words: str
) -> None:
    (tmp_path / "notes.txt").write_text("these are notes, not a disk\n" * 50)
    disk = tmp_path / "real.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    suite = with_disk(tmp_path, disk, edit)
    results = tmp_path / "results"
    proc = run_harness(suite, results, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{suite}:" in proc.stderr and field in proc.stderr and words in proc.stderr
    assert "fix" in proc.stderr
    assert not results.exists() or not list(results.glob("*.json"))


@pytest.fixture
def reachable(tmp_path: Path) -> Iterator[Path]:
    """A directory QEMU (libvirt's user) can reach, unlike pytest's 0700 tmp_path."""
    where = Path(tempfile.mkdtemp(prefix="kvmh-cloud-test-", dir="/var/tmp"))
    where.chmod(0o755)
    yield where
    shutil.rmtree(where)


def test_a_guest_that_never_answers_fails_its_boot_quoting_the_console(
    tmp_path: Path, reachable: Path
) -> None:
    # A disk with a partition table's boot signature and nothing else: it passes the
    # pre-boot checks, the firmware starts it, and no cloud-init or sshd ever runs.
    disk = reachable / "blank.img"
    data = bytearray(1 << 20)
    data[510:512] = b"\x55\xaa"
    data[0:2] = b"\xeb\xfe"  # jmp $: the boot sector spins
    disk.write_bytes(bytes(data))
    disk.chmod(0o644)
    suite = reachable / "blank.toml"
    suite.write_text(
        'name = "blank"\n[[vms]]\nname = "blank"\nimage = "cloud"\ndisk = "blank.img"\n'
        'os_user = "bench"\nvcpus = 1\nmemory_mib = 256\naccelerator = "tcg"\n'
        'boot_timeout_s = 5\n[[runs]]\nworkload = "page-touch"\nvm = "blank"\n'
        "warmup = 0\n[trace]\nenabled = false\n"
    )
    results = tmp_path / "results"
    proc = run_harness(suite, results, "--quiet", timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = only_result(results)
    assert data["status"] == "failed"
    error = "\n".join(data["errors"])
    assert "did not answer SSH within 5 s" in error, error
    assert "no SSH server answered" in error and "sshd" in error
    assert "cloud-init: no error line on the console" in error
    assert "last console lines" in error
    assert_nothing_left(data, results)


@pytest.fixture(autouse=True)
def _tools_cached() -> None:
    """The guest programs are built before any run (a few seconds once; cached after)."""
    if shutil.which("gcc") is not None:
        build_guest_tools()
