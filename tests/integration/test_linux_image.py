"""Build (or reuse) the Linux guest image, boot it under TCG with plain QEMU, use it over SSH.

Plain qemu-system-x86_64 with the same machine, devices and networking that the
libvirt domain uses, on a throwaway qcow2 overlay; QEMU is killed in a finally.
"""

from __future__ import annotations

import base64
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from harness.image.linux import LinuxImage, build_linux_image

pytestmark = pytest.mark.integration

@dataclass(frozen=True)
class Booted:
    image: LinuxImage
    port: int
    console: Path
    boot_seconds: float


@pytest.fixture(scope="module")
def image() -> LinuxImage:
    return build_linux_image(progress=print)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ssh_banner(port: int) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
            c.settimeout(2)
            return c.recv(64)
    except OSError:
        return b""


@pytest.fixture
def booted(image: LinuxImage, tmp_path: Path) -> Iterator[Booted]:
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.disk),
         str(overlay)],
        check=True,
    )  # fmt: skip
    port = _free_port()
    console = tmp_path / "console.log"
    argv = [
        "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-m", "1024",
        "-smp", "2", "-kernel", str(image.kernel), "-append", image.cmdline,
        "-drive", f"file={overlay},if=none,id=d0", "-device", "virtio-blk-pci,drive=d0",
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", "virtio-net-pci,netdev=n0",
        "-serial", f"file:{console}", "-display", "none", "-no-reboot",
    ]  # fmt: skip
    if image.initrd is not None:
        argv += ["-initrd", str(image.initrd)]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not _ssh_banner(port).startswith(b"SSH-"):
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(
                    f"qemu exited {proc.returncode}: {err}\nconsole:\n{console.read_text()}"
                )
            if time.monotonic() - t0 > 90:
                pytest.fail(f"no SSH banner after 90 s; console:\n{console.read_text()}")
            time.sleep(0.1)
        boot = time.monotonic() - t0
        print(f"boot-to-SSH {boot:.2f} s")
        yield Booted(image, port, console, boot)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _client(b: Booted, host_key: str) -> paramiko.SSHClient:
    kind, b64 = host_key.split()[:2]
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.get_host_keys().add(
        f"[127.0.0.1]:{b.port}", kind, paramiko.Ed25519Key(data=base64.b64decode(b64))
    )
    client.connect(
        "127.0.0.1",
        port=b.port,
        username=b.image.ssh_user,
        pkey=paramiko.Ed25519Key.from_private_key_file(str(b.image.ssh_private_key)),
        look_for_keys=False,
        allow_agent=False,
        timeout=20,
        banner_timeout=20,
        auth_timeout=20,
    )
    return client


def _run(client: paramiko.SSHClient, cmd: str, timeout: float = 60) -> tuple[int, str, str]:
    _, stdout, stderr = client.exec_command(cmd, timeout=timeout)
    rc = stdout.channel.recv_exit_status()
    return rc, stdout.read().decode(), stderr.read().decode()


def test_boot_ssh_and_workloads(booted: Booted) -> None:
    # How long the boot took is printed, not asserted: timings are benchmarks
    # (tests/bench/test_linux_guest.py::test_boot_to_ssh, `tox -e bench`).
    tools = booted.image.guest_tools
    client = _client(booted, booted.image.host_key)
    try:
        rc, out, err = _run(client, f"{tools['page-touch']} --mib 64")
        assert rc == 0, err
        lines = out.splitlines()
        assert len(lines) == 2
        assert re.fullmatch(
            r"page-touch pass=1 kind=first-touch mib=64 pages=16384 "
            r"seconds=\d+\.\d{6} mib_per_s=\d+\.\d{2} pgfault=\d+ thp_fault_alloc=\d+ "
            r"thp_fault_fallback=\d+ huge_used=\d+ minflt=\d+",
            lines[0],
        ), lines[0]
        assert lines[1].startswith("page-touch pass=2 kind=retouch mib=64 pages=16384 ")

        rc, out, err = _run(
            client, f"{tools['stress-ng']} --vm 1 --vm-bytes 64M -t 2 --metrics-brief"
        )
        assert rc == 0, err
        # stress-ng prints its metrics (to stderr) with a bogo-ops row for the vm stressor.
        assert re.search(r"metrc:.*\bvm\s+\d+", out + err), out + err

        rc, out, err = _run(client, f"{tools['kvm-marker']} 1 1")
        assert (rc, out) == (0, ""), err
        rc, _, err = _run(client, f"{tools['kvm-marker']} 0 1")
        assert rc == 2 and "usage" in err

        # The guest basics the harness relies on.
        rc, out, err = _run(
            client, "touch /root/w /tmp/w && findmnt -no FSTYPE /tmp && ip -4 -br addr show eth0"
        )
        assert rc == 0, err
        assert "tmpfs" in out and "10.0.2.15/24" in out
        rc, out, _ = _run(client, f"{tools['python3']} -c 'print(6*7)'")
        assert (rc, out.strip()) == (0, "42")
    finally:
        client.close()


def test_wrong_host_key_is_rejected(booted: Booted) -> None:
    key = booted.console.parent / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    wrong = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    assert wrong != booted.image.host_key
    with pytest.raises(paramiko.BadHostKeyException):
        _client(booted, wrong).close()
