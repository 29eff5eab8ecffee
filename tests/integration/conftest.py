"""Fixtures for tests against real libvirtd, QEMU, SSH and bpftrace."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.guest.ssh import SshGuest
from harness.host.facts import choose_accelerator, collect_host_facts
from harness.image.cloud_standin import CloudStandin, build_cloud_standin
from harness.image.linux import LinuxImage, build_linux_image
from harness.paths import cache_dir
from harness.trace import libbpf
from harness.trace.backend import Backend, BpftraceBackend, LibbpfBackend
from harness.vm import configs, lifecycle
from tests.conftest import harness_domains, on_ci, stray_tracers
from tests.leaks import host_state, leaks_since

#: Both tracer backends; exactness tests run against each.
BACKENDS = ("bpftrace", "libbpf")


def make_backend(name: str) -> Backend:
    """A tracer backend by name; libbpf is built for this kernel (cached) on first use."""
    if name == "bpftrace":
        return BpftraceBackend()
    return LibbpfBackend(libbpf.build())

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def linux_image() -> LinuxImage:
    """The default guest image, built once (cached across sessions by recipe digest)."""
    return build_linux_image(progress=print)


@pytest.fixture(scope="session")
def cloud_standin() -> CloudStandin:
    """The stand-in for a vendor cloud image (no keys, no user: cloud-init makes them from a
    NoCloud seed), built once (cached across sessions by recipe digest); boots with SeaBIOS
    and with OVMF."""
    return build_cloud_standin(progress=print)


#: A short real suite run twice (tests/integration/suites/compare-short.toml): the two
#: runs of test_compare_real.py, the first also the base side of test_guest_kernel_ab.py.
COMPARE_SHORT = Path(__file__).parent / "suites" / "compare-short.toml"


@pytest.fixture(scope="session")
def compare_short_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real runs of compare-short (the image's own kernel), each its own result file."""
    out = tmp_path_factory.mktemp("compare-runs")
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-m", "harness.cli", "run", str(COMPARE_SHORT), "--results-dir",
             str(out), "--quiet"],
            capture_output=True, text=True, timeout=600, check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    paths = sorted(out.glob("*.json"))
    assert len(paths) == 2
    return paths


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After all integration tests: no harness domain, QEMU, tracer or run directory is left.

    On CI nothing else runs, so nothing harness-made may remain at all. On a
    shared development host, what other sessions' live runs hold is theirs:
    there the check counts what appeared during this session and outlived the
    process that made it (tests/leaks.py).
    """
    before = host_state()
    yield
    deadline = time.monotonic() + 15  # libvirtd reaps an autodestroy domain asynchronously
    while (leaks := leaks_since(before)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not leaks, f"the integration tests left these behind: {leaks}"
    if on_ci():
        assert harness_domains() == [], "the harness left libvirt domains behind"
        assert stray_tracers() == [], "a tracer process outlived its test"


SUITE = """\
name = "{name}"
repetitions = {reps}

[[vms]]
name = "linux"
image = "linux"
vcpus = 2
memory_mib = 768
accelerator = "auto"
boot_timeout_s = 90

{runs}

[trace]
enabled = {trace}
probes = ["default"]
"""


def write_suite(
    dir_: Path, runs: str, *, name: str = "itest", reps: int = 1, trace: bool = True
) -> Path:
    """A suite file in ``dir_`` using the shipped workloads."""
    path = dir_ / f"{name}.toml"
    path.write_text(SUITE.format(name=name, reps=reps, runs=runs, trace=str(trace).lower()))
    return path


class Booted:
    """A started Linux guest with SSH connected; destroyed by ``close``."""

    def __init__(self, image: LinuxImage, workdir: Path, name: str) -> None:
        accel, _ = choose_accelerator("auto", collect_host_facts())
        self.conn = lifecycle.connect()
        overlay = workdir / f"{name}.qcow2"
        lifecycle.create_overlay(image.disk, overlay)
        cfg = configs.linux_config(
            name=f"{lifecycle.DOMAIN_PREFIX}test-{name}",
            accelerator=accel,
            memory_mib=768,
            vcpus=2,
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=image.cmdline,
            overlay=overlay,
            console_log=workdir / f"{name}.log",
            ssh_port=lifecycle.free_port(),
        )
        self.vm = lifecycle.start(self.conn, cfg)
        try:
            assert cfg.ssh_port is not None
            self.guest = SshGuest.connect(
                "127.0.0.1",
                cfg.ssh_port,
                user=image.ssh_user,
                key_file=image.ssh_private_key,
                host_key=image.host_key,
                deadline_s=90,
            )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if hasattr(self, "guest"):
            self.guest.close()
        lifecycle.destroy(self.vm)
        self.conn.close()


@contextlib.contextmanager
def vm_workdir(prefix: str) -> Iterator[Path]:
    """A scratch directory QEMU (user libvirt-qemu) can reach, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=cache_dir()))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def booted_guest(image: LinuxImage, name: str) -> Iterator[Booted]:
    """A booted Linux guest with SSH connected, in its own scratch directory."""
    with vm_workdir(f"{name}-") as path:
        b = Booted(image, path, name)
        try:
            yield b
        finally:
            b.close()
