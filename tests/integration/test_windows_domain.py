"""A Windows domain started for real: q35 + OVMF (per-run NVRAM) + swtpm TPM 2.0 + Hyper-V.

No Windows image exists on these hosts, so the domain boots a stand-in: a
tiny UEFI program built here with mingw-w64 (EFI/BOOT/BOOTX64.EFI on a
read-only FAT disk), under TCG. Firmware, NVRAM copy, TPM and the
enlightenment choices are QEMU 7.2's and libvirt 9.0's own; teardown must
leave nothing: domain, swtpm process, NVRAM, TPM state.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import libvirt
import pytest

from harness.vm import lifecycle
from harness.vm.domain import DomainConfig, UefiBoot
from harness.vm.windows import WindowsDomain, remove_run_files, swtpm_pids
from tests.integration.conftest import vm_workdir

pytestmark = [
    pytest.mark.integration,
    pytest.mark.requires(
        root=True, tools=["x86_64-w64-mingw32-gcc", "swtpm", "virsh", "qemu-system-x86_64"]
    ),
    pytest.mark.timeout(180),
]

STANDIN_C = r"""
typedef unsigned long long u64;
typedef unsigned short CHAR16;
struct text_out { void *reset; u64 (*output_string)(struct text_out *, const CHAR16 *); };
struct system_table { char hdr[24]; void *vendor; u64 revision; void *in_handle; void *con_in;
  void *out_handle; struct text_out *con_out; };
u64 efi_main(void *image, struct system_table *st) {
  (void)image;
  st->con_out->output_string(st->con_out, u"KVMH-STANDIN-EFI up\r\n");
  for (;;) __asm__ volatile("hlt");
  return 0;
}
"""
BANNER = "KVMH-STANDIN-EFI up"


def build_standin(root: Path) -> Path:
    """EFI/BOOT/BOOTX64.EFI under ``root``: the removable-media path OVMF boots by itself."""
    src = root.parent / "standin.c"
    root.mkdir(mode=0o755)
    src.write_text(STANDIN_C)
    efi = root / "EFI" / "BOOT" / "BOOTX64.EFI"
    efi.parent.mkdir(parents=True)
    subprocess.run(
        ["x86_64-w64-mingw32-gcc", "-O2", "-nostdlib", "-ffreestanding", "-fno-stack-protector",
         "-mno-red-zone", "-Wl,--subsystem,10", "-Wl,--image-base,0x400000",
         "-e", "efi_main", "-o", str(efi), str(src)],
        check=True,
    )
    return root


#: What OVMF with secure boot (Microsoft's keys enrolled) says of the unsigned stand-in.
REFUSED = "Access Denied"


@pytest.mark.parametrize("secure_boot", [False, True], ids=["uefi", "secure-boot"])
def test_windows_domain_boots_and_leaves_nothing(secure_boot: bool) -> None:
    with vm_workdir("windows-") as run_dir:
        _boot_and_tear_down(run_dir, secure_boot)


def _boot_and_tear_down(run_dir: Path, secure_boot: bool) -> None:
    standin = build_standin(run_dir / "standin")
    name = lifecycle.domain_name(f"wintest{int(time.time())}", "win")
    win = WindowsDomain(
        name=name, accelerator="tcg", memory_mib=512, vcpus=1,
        disk=run_dir / "unused.qcow2", nvram=run_dir / "win_VARS.fd",
        console_log=run_dir / "win.console.log", winrm_port=lifecycle.free_port(),
        secure_boot=secure_boot, standin_dir=standin,
    )
    cfg = DomainConfig(
        name=name, domain_type="qemu", memory_mib=512, vcpus=1, boot=UefiBoot(win),
        console_log=win.console_log,
    )
    conn = lifecycle.connect()
    vm = lifecycle.start(conn, cfg)
    try:
        # Without secure boot the stand-in runs; with it, the firmware refuses unsigned code.
        want = REFUSED if secure_boot else BANNER
        deadline = time.monotonic() + 90
        while want not in (console := win.console_log.read_text(errors="replace")):
            assert lifecycle.is_running(vm), lifecycle.console_tail(win.console_log)
            assert time.monotonic() < deadline, lifecycle.console_tail(win.console_log)
            time.sleep(1)
        assert (BANNER in console) != secure_boot
        assert swtpm_pids(win), "libvirt started no swtpm for the domain"
        assert win.nvram.is_file() and win.nvram.stat().st_size == win.nvram_template.stat().st_size
        assert win.tpm_state.is_dir()
        live = vm.domain.XMLDesc()
        assert "<tpm model='tpm-crb'>" in live and "<hyperv mode='custom'>" in live
        assert "<vpindex" not in live  # dropped under TCG, with the reason in a comment
        assert ("<smm state='on'/>" in live) == secure_boot
    finally:
        lifecycle.destroy(vm)
    deadline = time.monotonic() + 15
    while swtpm_pids(win) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert swtpm_pids(win) == []
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(name)
    assert remove_run_files(win) == []
    assert not win.nvram.exists() and not win.tpm_state.exists()
