"""A guest-kernel A/B for real: the default image with its cloud kernel, and with Debian's
generic kernel (`--set vm.kernel_package=linux-image-amd64`: the same root file system,
that package's vmlinuz and an initramfs of its own virtio modules), the same short suite
on both (compare-short; its cloud-kernel run is one test_compare_real.py makes anyway),
then `harness compare`. Plus the bad input a kernel engineer meets first: a file
that is not a kernel, a kernel on a micro VM: exit 2 before anything boots.

Measured here (2 cores, TCG): the whole file 97 s with other sessions mostly idle (load
3 falling to 1): 58 s for the two sides when both were run here (now only the candidate,
37 s), 18 s for the kernel file, 16 s for the panicking kernel, 2 s for each refusal;
157 s with four other QEMUs running (load 5-6).
The variant is built once in about 10 s (a 70 MB download) and then cached.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.image.kernel import build_kernel_variant
from harness.results import load
from tests.integration.conftest import COMPARE_SHORT
from tests.leaks import host_state, leaks_since

pytestmark = pytest.mark.integration

SUITE = Path(__file__).parent / "suites" / "guest-kernel-ab.toml"
GENERIC = "linux-image-amd64"


def harness(
    *args: str | Path, timeout: float = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd,
    )


@pytest.fixture(scope="module")
def sides(
    tmp_path_factory: pytest.TempPathFactory, compare_short_runs: list[Path]
) -> tuple[Path, Path]:
    """The base: a run of compare-short as it is (the image's cloud kernel), shared with
    test_compare_real.py; the candidate: the same suite with the generic kernel."""
    cand = tmp_path_factory.mktemp("guest-kernel-ab") / "generic-kernel"
    proc = harness("run", COMPARE_SHORT, "--results-dir", cand, "--quiet",
                   "--set", f"vm.kernel_package={GENERIC}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return compare_short_runs[0], cand


def test_the_generic_kernel_against_the_cloud_kernel(sides: tuple[Path, Path]) -> None:
    base, cand = sides
    b = load(base)
    (c,) = [load(p) for p in cand.glob("*.json")]
    b_ids = [vm.guest_identity for vm in b.vms]
    c_ids = [vm.guest_identity for vm in c.vms]
    assert len(b_ids) == len(c_ids) == 2 and all(b_ids) and all(c_ids)
    bk, ck = b_ids[0], c_ids[0]
    assert bk is not None and ck is not None
    # What each guest said it ran, and what the host booted it from.
    assert bk.kernel_release is not None and bk.kernel_release.endswith("-cloud-amd64")
    assert ck.kernel_release is not None and ck.kernel_release.endswith("-amd64")
    assert "cloud" not in ck.kernel_release
    assert ck.kernel_package == GENERIC and ck.kernel_package_version
    assert bk.kernel_sha256 != ck.kernel_sha256
    assert bk.disk_sha256 == ck.disk_sha256  # the same root file system
    assert bk.os_id == ck.os_id == "debian" and bk.problems == ck.problems == []
    assert b.vms[0].image_digest == c.vms[0].image_digest

    proc = harness("compare", base, cand, timeout=120)
    print(proc.stdout)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    changed = proc.stdout.split("What changed", 1)[1].split("\n\n", 1)[0]
    assert "vm linux: guest kernel:" in changed
    assert bk.kernel_release in changed and ck.kernel_release in changed
    assert "UNFAIR" not in proc.stdout and "NOT COMPARABLE" not in proc.stdout


@pytest.mark.parametrize(("setting", "says"), [
    ("vm.linux.kernel={text}", "is not an x86 bzImage"),
    ("vm.micro.kernel={text}", "VM 'micro' boots the micro image"),
    ("vm.linux.kernel_package=linux-image-no-such-flavour-zz", "no package"),
])
def test_bad_kernel_input_exits_2_before_anything_boots(
    tmp_path: Path, setting: str, says: str
) -> None:
    text = tmp_path / "vmlinuz"
    text.write_text("not a kernel\n" * 100)
    suite = tmp_path / "two.toml"
    suite.write_text(SUITE.read_text() + '\n[[vms]]\nname = "micro"\nimage = "micro"\n'
                     "memory_mib = 64\n")
    before = host_state()
    proc = harness("run", suite, "--results-dir", tmp_path / "results", "--quiet",
                   "--set", setting.format(text=text), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert says in proc.stderr and "fix:" in proc.stderr
    if "kernel_package" not in setting:  # the package is looked up in the suite as loaded
        assert f"--set {setting.format(text=text)}" in proc.stderr  # names the --set
    # Refused while the suite loads: no result file (a run writes one before it boots).
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())
    assert leaks_since(before) == []


def test_a_kernel_without_built_in_drivers_is_reported_as_soon_as_it_panics(
    tmp_path: Path,
) -> None:
    """Debian's generic kernel has virtio and ext4 as modules: given as a kernel file with
    no initrd it boots with no initramfs and panics (no root disk). The harness says so
    within seconds of the panic, with what such a kernel needs, not after boot_timeout_s."""
    variant = build_kernel_variant(GENERIC)
    suite = tmp_path / "panic.toml"
    suite.write_text(
        f'name = "panic"\n[[vms]]\nname = "g"\nmemory_mib = 512\nboot_timeout_s = 300\n'
        f'kernel = "{variant.kernel}"\n[[runs]]\nworkload = "page-touch"\nvm = "g"\n'
        "params = { mib = 16 }\n[trace]\nenabled = false\n"
    )
    before = host_state()
    t0 = time.monotonic()
    proc = harness("run", suite, "--results-dir", tmp_path / "results", "--quiet", timeout=300)
    took = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "while booting, the guest kernel panicked" in proc.stderr
    assert "VFS: Unable to mount root fs" in proc.stderr
    assert "must build in virtio_pci, virtio_blk, virtio_net and ext4" in proc.stderr
    assert took < 120, f"took {took:.0f} s: the panic was not noticed while waiting for SSH"
    (result,) = [load(p) for p in (tmp_path / "results").glob("*.json")]
    assert result.status == "failed"
    assert leaks_since(before) == []


def test_a_kernel_file_with_its_own_initrd_boots_and_is_recorded_by_digest(
    tmp_path: Path,
) -> None:
    """A kernel and initrd given as files (here: the generic kernel variant's, copied out
    as a user would have them) boot on the image's root file system; the result records
    the file's sha256 and no package."""
    variant = build_kernel_variant(GENERIC)
    kernel, initrd = tmp_path / "bzImage", tmp_path / "initrd.img"
    kernel.write_bytes(variant.kernel.read_bytes())
    initrd.write_bytes(variant.initrd.read_bytes())
    suite = tmp_path / "file.toml"
    suite.write_text(
        'name = "kernel-file"\n[[vms]]\nname = "g"\nmemory_mib = 512\n'
        '[[runs]]\nworkload = "page-touch"\nvm = "g"\nwarmup = 0\nparams = { mib = 16 }\n'
        "[trace]\nenabled = false\n"
    )
    before = host_state()
    proc = harness("run", suite, "--results-dir", tmp_path / "results", "--quiet",
                   "--set", f"vm.kernel={kernel}", "--set", "vm.g.initrd=initrd.img",
                   timeout=300, cwd=tmp_path)  # a --set path is relative to where it is typed
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = [load(p) for p in (tmp_path / "results").glob("*.json")]
    ident = result.vms[0].guest_identity
    assert ident is not None
    assert ident.kernel_release == variant.release
    assert ident.kernel_sha256 == variant.kernel_sha256 and ident.kernel_package is None
    assert ident.kernel_label() == f"{variant.release} (sha256 {variant.kernel_sha256[:12]})"
    assert leaks_since(before) == []
