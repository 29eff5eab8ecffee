"""QEMU running the micro guest directly (no libvirt), paused until the test resumes it.

Tests of the tracer and its peers start the guest this way so that its pid is
known (and filtered on) before its first instruction runs.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from harness.image.micro import MicroImage
from harness.image.paging import PagingImage

GUEST_TIMEOUT_S = 120


def paused_qemu_argv(qmp_socket: Path, boot_args: list[str]) -> list[str]:
    """The micro guest under plain QEMU/KVM, paused (-S) until ``cont`` on ``qmp_socket``."""
    return [
        "qemu-system-x86_64",
        "-accel",
        "kvm",
        "-m",
        "16",
        "-display",
        "none",
        "-no-reboot",
        "-nodefaults",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        *boot_args,
        "-S",
        "-qmp",
        f"unix:{qmp_socket},server=on,wait=off",
    ]


class PausedMicroVM:
    """QEMU running the micro guest, started paused (-S) so a tracer can attach first."""

    def __init__(
        self, image: MicroImage | PagingImage, workdir: Path, extra_args: Sequence[str] = ()
    ) -> None:
        self.qmp_path = workdir / f"qmp-{image.token}.sock"
        self.qmp_path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            # The guest as its own firmware: SeaBIOS, when every instruction is
            # traced, sometimes failed its floppy read or sat for minutes in HLT.
            paused_qemu_argv(self.qmp_path, ["-bios", str(image.rom_path), *extra_args]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 10
        while not self.qmp_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not start: {self.proc.stderr}")
            time.sleep(0.02)
        self.pid = self.proc.pid

    def cont(self) -> int:
        """Resume the vCPU over QMP; returns time.monotonic_ns() just before the command."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.qmp_path))
            f = s.makefile("rw")
            f.readline()  # greeting
            for cmd in ("qmp_capabilities", "cont"):
                if cmd == "cont":
                    t = time.monotonic_ns()
                f.write(json.dumps({"execute": cmd}) + "\n")
                f.flush()
                reply = json.loads(f.readline())
                while "event" in reply:
                    reply = json.loads(f.readline())
                assert "return" in reply, reply
        return t

    def wait(self, timeout_s: float = GUEST_TIMEOUT_S) -> int:
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@contextlib.contextmanager
def micro_vm(
    image: MicroImage | PagingImage, workdir: Path, extra_args: Sequence[str] = ()
) -> Iterator[PausedMicroVM]:
    vm = PausedMicroVM(image, workdir, extra_args)
    try:
        yield vm
    finally:
        vm.kill()
