"""The cloud-image stand-in, built for real: its disk layout and what is not baked in.

The stand-in (harness/image/cloud_standin.py) takes the place of a vendor
cloud image, which cannot be downloaded here. That its one disk boots with
both firmwares from the same bytes, with nothing but the harness's NoCloud
seed, is shown through the ``cloud`` platform itself
(tests/integration/test_cloud_guest.py): one pair of TCG boots serves both,
since a boot here costs a minute or more.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from harness.image import cloud_standin as cs

pytestmark = [
    pytest.mark.integration,
    pytest.mark.requires(
        root=True,
        tools=["debootstrap", "sfdisk", "qemu-img", "mdir", "blkid", "debugfs"],
    ),
    pytest.mark.timeout(900),
]


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
