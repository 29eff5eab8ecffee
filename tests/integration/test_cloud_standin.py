"""The cloud-image stand-in, built for real and booted under TCG with SeaBIOS and with OVMF.

The stand-in (harness/image/cloud_standin.py) takes the place of a vendor
cloud image, which cannot be downloaded here. Its one disk must boot with
both firmwares from the same bytes; with nothing but a NoCloud seed (volume
``cidata``) cloud-init must make the host keys and the user, reach its final
stage and start sshd. The domain XML is written here (a plain disk boot with
either firmware); the ``cloud`` platform boots the same image its own way.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from harness.guest.ssh import SshGuest
from harness.image import cloud_standin as cs
from harness.vm import lifecycle
from harness.vm.windows import OVMF_CODE, OVMF_VARS
from tests.integration.conftest import vm_workdir
from tests.leaks import host_state, leaks_since

pytestmark = [
    pytest.mark.integration,
    pytest.mark.requires(
        root=True,
        tools=["qemu-system-x86_64", "virsh", "xorriso", "sfdisk", "qemu-img", "ssh-keygen"],
    ),
    pytest.mark.timeout(900),
]

#: What cloud-init prints on the console once its last stage ran (cc_final_message).
FINAL = "Cloud-init v. "
FINISHED = " finished at "
#: cc_keys_to_console: the host keys it made, between these lines.
KEYS_BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
BOOT_TIMEOUT_S = 420


def make_seed(directory: Path, name: str, pubkey: str) -> Path:
    """A NoCloud seed ISO (volume id cidata): instance id, hostname, one user with a key.

    It is attached as a read-only virtio disk: Debian's cloud kernel has no AHCI
    driver, so a SATA CD on q35 is invisible to it (as to Debian's genericcloud image).
    """
    src = directory / f"{name}-seed"
    src.mkdir()
    (src / "meta-data").write_text(f"instance-id: {name}-1\nlocal-hostname: {name}\n")
    (src / "user-data").write_text(
        "#cloud-config\n"
        "users:\n"
        "  - name: tester\n"
        "    sudo: ALL=(ALL) NOPASSWD:ALL\n"
        "    shell: /bin/bash\n"
        f"    ssh_authorized_keys: [{json.dumps(pubkey)}]\n"
        "ssh_pwauth: false\n"
    )
    iso = directory / f"{name}-seed.iso"
    subprocess.run(
        ["xorriso", "-as", "mkisofs", "-quiet", "-o", str(iso), "-V", "cidata", "-J", "-r",
         str(src / "user-data"), str(src / "meta-data")],
        check=True, capture_output=True,
    )  # fmt: skip
    iso.chmod(0o644)
    return iso


def domain_xml(
    name: str, firmware: str, overlay: Path, seed: Path, console: Path, nvram: Path, port: int
) -> str:
    """A disk boot under TCG, q35, with SeaBIOS ("bios") or OVMF ("uefi", per-boot NVRAM)."""
    loader = (
        f"<loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>"
        f"<nvram template='{OVMF_VARS}'>{nvram}</nvram>"
        if firmware == "uefi"
        else ""
    )
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>1024</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>{loader}<boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <cpu mode='maximum' check='none'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='unsafe'/>
      <source file='{overlay}'/><target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{seed}'/><target dev='vdb' bus='virtio'/><readonly/>
    </disk>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <memballoon model='none'/>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='virtio-net-pci,netdev=n0,bus=pcie.0,addr=0x9,romfile='/>
  </qemu:commandline>
</domain>
"""


def ssh_banner(port: int) -> str:
    """The first line sshd sends on the forwarded port ("" if nothing answers yet)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.settimeout(10)
            return s.recv(256).decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass
class Boot:
    """What one firmware's boot showed."""

    firmware: str
    seconds: float = 0.0  # to cloud-init done and sshd answering
    login_s: float = 0.0  # to the serial console's login prompt
    console: str = ""
    banner: str = ""
    error: str = ""
    leftover_nvram: bool = False
    guest_said: str = ""  # over SSH, the host key pinned from cloud-init's console report


def console_host_key(console: str) -> str:
    """The ed25519 host key cloud-init printed between its SSH HOST KEY KEYS lines."""
    block = console.split(KEYS_BEGIN, 1)[-1] if KEYS_BEGIN in console else ""
    found = re.search(r"ssh-ed25519 (AAAA[0-9A-Za-z+/=]+)", block)
    return f"ssh-ed25519 {found.group(1)}" if found else ""


def boot_once(image: cs.CloudStandin, firmware: str, workdir: Path, key: Path) -> Boot:
    """Boot an overlay of the stand-in until cloud-init is done and sshd answers; destroy it."""
    out = Boot(firmware)
    name = lifecycle.domain_name(f"standin{int(time.time())}", firmware)
    overlay = workdir / f"{firmware}.qcow2"
    lifecycle.create_overlay(image.disk, overlay)
    seed = make_seed(workdir, firmware, key.with_suffix(".pub").read_text().strip())
    console = workdir / f"{firmware}.console.log"
    console.touch(mode=0o600)
    nvram = workdir / f"{firmware}_VARS.fd"
    port = lifecycle.free_port()
    xml = domain_xml(name, firmware, overlay, seed, console, nvram, port)
    conn = lifecycle.connect()
    t0 = time.monotonic()
    dom = conn.createXML(lifecycle.with_owner(xml, os.getpid()),
                         libvirt.VIR_DOMAIN_START_AUTODESTROY)
    vm = lifecycle.RunningVm(name, dom, lifecycle.qemu_pid(name), console, overlay, port, 0)
    try:
        deadline = t0 + BOOT_TIMEOUT_S
        while True:
            text = console.read_text(errors="replace")
            if not out.login_s and " login: " in text:
                out.login_s = time.monotonic() - t0
            done = FINAL in text and FINISHED in text
            if done and (banner := ssh_banner(port)).startswith("SSH-2.0-"):
                out.seconds, out.banner = time.monotonic() - t0, banner
                break
            if not lifecycle.is_running(vm) or time.monotonic() > deadline:
                out.error = f"not up after {time.monotonic() - t0:.0f} s"
                break
            time.sleep(1)
        out.console = console.read_text(errors="replace")
        if not out.error:
            guest = SshGuest.connect("127.0.0.1", port, user="tester", key_file=key,
                                     host_key=console_host_key(out.console), deadline_s=60)
            try:
                said = guest.run("hostname; sudo -n true && echo sudo-ok; cloud-init status",
                                 timeout_s=60)
                out.guest_said = said.stdout
            finally:
                guest.close()
    finally:
        lifecycle.destroy(vm)
        conn.close()
    for p in (seed, nvram):
        p.unlink(missing_ok=True)
    out.leftover_nvram = nvram.exists() or overlay.exists()
    return out


@pytest.fixture(scope="module")
def raw_disk(cloud_standin: cs.CloudStandin, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in's disk as a raw file (sparse), to read its partitions."""
    raw = tmp_path_factory.mktemp("standin") / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(cloud_standin.disk), str(raw)],
                   check=True)
    return raw


def test_layout_of_the_built_disk(cloud_standin: cs.CloudStandin, raw_disk: Path) -> None:
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", str(cloud_standin.disk)],
        check=True, capture_output=True, text=True,
    ).stdout)  # fmt: skip
    recipe = cs.load_recipe()
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == recipe.disk_gib << 30
    assert "backing-filename" not in info
    assert cloud_standin.disk.stat().st_mode & 0o777 == 0o600
    assert cloud_standin.directory.stat().st_mode & 0o777 == 0o710
    manifest = json.loads((cloud_standin.directory / cs.MANIFEST_NAME).read_text())
    assert manifest["stand-in"] is True
    assert manifest["digest"] == cs.recipe_digest()
    assert manifest["kernel_release"].endswith("-cloud-amd64")
    assert {"cloud-init", "openssh-server", "stress-ng"} <= set(manifest["packages"])

    raw = raw_disk
    dump = subprocess.run(["sfdisk", "--dump", str(raw)], check=True, capture_output=True,
                          text=True).stdout
    assert "label: gpt" in dump
    layout = cs.disk_layout(recipe.disk_gib, recipe.esp_mib, recipe.root_label)
    parts = list(cs.partitions_of(dump))
    assert [(int(p["start"]), int(p["size"]), p["type"], p["name"]) for p in parts] == [
        (q.start, q.size, q.type_guid, q.name) for q in layout.partitions
    ]
    data = raw.read_bytes()[: 2 * cs.MIB]
    assert data[510:512] == b"\x55\xaa" and data[0x1BE + 4] == 0xEE  # protective MBR kept
    assert data[cs.MIB : cs.MIB + 4] != b"\0\0\0\0"  # grub's core image in the BIOS boot part
    esp = f"{raw}@@{layout.esp.offset}"
    listing = subprocess.run(["mdir", "-b", "-i", esp, "::/EFI/BOOT"], check=True,
                             capture_output=True, text=True,
                             env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}).stdout
    assert "BOOTX64.EFI" in listing
    probe = subprocess.run(
        ["blkid", "-p", "-O", str(layout.root.offset), "-o", "export", str(raw)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "TYPE=ext4" in probe and f"LABEL={recipe.root_label}" in probe


def test_boots_with_seabios_and_ovmf(cloud_standin: cs.CloudStandin) -> None:
    """Both firmwares at once (two VMs, one vCPU each): cloud-init done, sshd listening, and
    the seed's user logs in with the host key cloud-init reported on the console pinned."""
    results: dict[str, Boot] = {}
    before = host_state()
    with vm_workdir("standin-") as workdir:
        key = workdir / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)

        def run(fw: str) -> None:
            try:
                results[fw] = boot_once(cloud_standin, fw, workdir, key)
            except Exception as exc:  # reported below, with the other firmware's outcome
                results[fw] = Boot(fw, error=f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=run, args=(fw,)) for fw in ("bios", "uefi")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for fw, b in sorted(results.items()):
        print(f"stand-in {fw}: login prompt after {b.login_s:.0f} s, cloud-init done and "
              f"sshd up after {b.seconds:.0f} s")
    for fw, b in sorted(results.items()):
        tail = "\n".join(b.console.splitlines()[-25:])
        assert not b.error, f"{fw}: {b.error}\n{tail}"
        assert b.banner.startswith("SSH-2.0-OpenSSH"), (fw, b.banner)
        # cloud-init made the host keys (none are baked in) and said so on the console.
        assert KEYS_BEGIN in b.console and "ssh-ed25519 " in b.console, f"{fw}\n{tail}"
        assert "DataSourceNoCloud" in b.console, f"{fw}: not the NoCloud seed\n{tail}"
        assert not b.leftover_nvram, f"{fw}: overlay or NVRAM left behind"
        # The seed's user with its key, sudo without a password, the seed's hostname.
        assert b.guest_said.split()[:2] == [fw, "sudo-ok"], b.guest_said
        assert "status: done" in b.guest_said, b.guest_said
    assert "BdsDxe" in results["uefi"].console or "UEFI" in results["uefi"].console
    conn = lifecycle.connect()
    try:
        left = [d.name() for d in conn.listAllDomains() if d.name().startswith("kvmh-standin")]
    finally:
        conn.close()
    assert left == []
    assert leaks_since(before) == []


def test_nothing_baked_in(raw_disk: Path) -> None:
    """Like a vendor image: no host keys, no authorized_keys, no password in the root fs."""
    recipe = cs.load_recipe()
    layout = cs.disk_layout(recipe.disk_gib, recipe.esp_mib, recipe.root_label)
    root = f"{raw_disk}?offset={layout.root.offset}"  # e2fsprogs' io option: no copy, no mount

    def debugfs(cmd: str) -> str:
        return subprocess.run(["debugfs", "-R", cmd, root], capture_output=True,
                              text=True, check=False).stdout

    assert "ssh_host_" not in debugfs("ls -l /etc/ssh")
    assert "authorized_keys" not in debugfs("ls -l /root/.ssh")
    shadow = debugfs("cat /etc/shadow")
    assert shadow.startswith("root:")
    assert all(line.split(":")[1] in ("*", "!", "!*") for line in shadow.splitlines() if line)
    assert "NoCloud, None" in debugfs("cat /etc/cloud/cloud.cfg.d/99-standin.cfg")
    assert debugfs("cat /etc/machine-id") == ""
    assert "/dev/null" in debugfs("stat /etc/systemd/system/apt-daily.timer")
