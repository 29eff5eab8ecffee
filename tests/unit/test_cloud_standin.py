"""The cloud-image stand-in's recipe, digest, disk layout and BIOS boot sector patching."""

from __future__ import annotations

import itertools
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from harness.host.doctor import APT_PACKAGES, CLOUD_STANDIN_FILES, check_cloud_standin_tools
from harness.image import cache as image_cache
from harness.image import cloud_standin as cs
from harness.image.linux import ImageBuildError

GOOD = """\
suite = "bookworm"
packages = ["cloud-init", "openssh-server"]
mask = ["apt-daily.timer"]
disk_gib = 2
esp_mib = 32
root_label = "cloudimg-rootfs"
cmdline = "root=LABEL=cloudimg-rootfs ro console=ttyS0,115200"
"""


def test_real_recipe_is_valid() -> None:
    recipe = cs.load_recipe()
    assert {"cloud-init", "openssh-server", "linux-image-cloud-amd64", "stress-ng"} <= set(
        recipe.packages
    )
    assert "console=ttyS0" in recipe.cmdline
    assert f"LABEL={recipe.root_label}" in recipe.cmdline
    assert "apt-daily.timer" in recipe.mask
    names = {f.name for f in cs.recipe_files()}
    assert {"recipe.toml", "99-standin.cfg"} <= names
    assert "README.md" not in names  # documentation edits must not force a rebuild


def test_cloud_cfg_limits_datasources() -> None:
    text = cs.CLOUD_CFG.read_text()
    assert "datasource_list: [ NoCloud, None ]" in text


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ('packages = ["openssh-server"]', "packages"),  # no cloud-init
        ('cmdline = "root=/dev/vda1"', "cmdline"),  # no serial console
        ('mask = ["apt-daily"]', "mask"),  # not a unit name
        ("disk_gib = 0", "disk_gib"),
        ('root_label = "a label with spaces"', "root_label"),
        ("bogus = 1", "bogus"),
    ],
)
def test_bad_recipe_names_file_field_and_fix(tmp_path: Path, change: str, field: str) -> None:
    key = change.split(" =", 1)[0]
    lines = [line for line in GOOD.splitlines() if not line.startswith(f"{key} =")]
    bad = tmp_path / "recipe.toml"
    bad.write_text("\n".join([*lines, change]) + "\n")
    with pytest.raises(ValueError) as info:
        cs.load_recipe(bad)
    msg = str(info.value)
    assert str(bad) in msg
    assert f"field {field}" in msg
    assert "fix the field" in msg


def test_good_recipe_parses(tmp_path: Path) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text(GOOD)
    assert cs.load_recipe(path).esp_mib == 32


def test_digest_follows_every_recipe_file_but_not_docs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe_dir = tmp_path / "cloud-standin"
    shutil.copytree(cs.RECIPE_DIR, recipe_dir)
    monkeypatch.setattr(cs, "RECIPE_DIR", recipe_dir)
    first = cs.recipe_digest()
    assert cs.recipe_digest() == first
    (recipe_dir / "README.md").write_text("docs only\n")
    assert cs.recipe_digest() == first
    cfg = recipe_dir / "99-standin.cfg"
    cfg.write_text(cfg.read_text() + "# edited\n")
    second = cs.recipe_digest()
    assert second != first
    toml = recipe_dir / "recipe.toml"
    toml.write_text(toml.read_text().replace("esp_mib = 32", "esp_mib = 64"))
    assert cs.recipe_digest() not in (first, second)


def test_layout_math() -> None:
    lay = cs.disk_layout(2, 32, "cloudimg-rootfs")
    mib = cs.MIB // cs.SECTOR
    assert lay.total_bytes == 2 << 30
    assert (lay.bios_boot.start, lay.bios_boot.size) == (mib, mib)
    assert (lay.esp.start, lay.esp.size) == (2 * mib, 32 * mib)
    assert lay.root.start == 34 * mib
    # Back to back, 1 MiB aligned, and the last MiB free for the backup GPT.
    parts = lay.partitions
    for a, b in itertools.pairwise(parts):
        assert a.start + a.size == b.start
    assert all(p.start % mib == 0 and p.size % mib == 0 for p in parts)
    assert lay.root.start + lay.root.size == lay.total_bytes // cs.SECTOR - mib
    assert lay.root.offset == 34 * cs.MIB
    assert lay.root.name == "cloudimg-rootfs"


def test_layout_too_small_names_the_fields() -> None:
    with pytest.raises(ValueError, match=r"disk_gib.*esp_mib"):
        cs.disk_layout(1, 800, "r")


def test_sfdisk_script_round_trips_through_the_dump_parser() -> None:
    lay = cs.disk_layout(2, 32, "cloudimg-rootfs")
    script = lay.sfdisk_script()
    assert script.startswith("label: gpt\n")
    # The same "key=value, ..." shape sfdisk --dump prints after "device : ".
    dump = "\n".join(
        f"disk.raw{i} : {line}" if line.startswith("start=") else line
        for i, line in enumerate(script.splitlines())
    )
    got = list(cs.partitions_of(dump))
    assert [p["name"] for p in got] == ["bios-boot", "esp", "cloudimg-rootfs"]
    assert [p["type"] for p in got] == [cs.BIOS_BOOT_TYPE, cs.ESP_TYPE, cs.ROOT_X86_64_TYPE]
    assert [int(p["start"]) for p in got] == [p.start for p in lay.partitions]


def _boot_img() -> bytes:
    img = bytearray(512)
    img[0] = 0xEB
    struct.pack_into("<Q", img, cs._KERNEL_SECTOR, 1)
    img[0x1FE:0x200] = b"\x55\xaa"
    return bytes(img)


def test_mbr_keeps_the_partition_table_and_points_at_the_core() -> None:
    mbr = bytearray(512)
    mbr[0x1BE:0x1CE] = b"\x00\x00\x02\x00\xee" + b"\xff" * 11  # protective MBR entry
    mbr[0x1FE:0x200] = b"\x55\xaa"
    out = cs.bios_boot_sectors(_boot_img(), bytes(mbr), 2048)
    assert out[0] == 0xEB  # grub's code
    assert out[0x1BE:0x200] == mbr[0x1BE:0x200]  # the GPT's protective entry survives
    assert struct.unpack_from("<Q", out, cs._KERNEL_SECTOR)[0] == 2048
    assert out[cs._BOOT_DRIVE] == 0xFF


def test_core_blocklist_is_patched_and_size_checked() -> None:
    core = bytearray(512 * 5)
    struct.pack_into("<QHH", core, cs._BLOCKLIST, 2, 4, cs._KERNEL_SEGMENT)
    out = cs.patch_core(bytes(core), 2048, 2048)
    assert struct.unpack_from("<QHH", out, cs._BLOCKLIST) == (2049, 4, cs._KERNEL_SEGMENT)
    with pytest.raises(ImageBuildError, match="BIOS boot partition holds 4"):
        cs.patch_core(bytes(core), 2048, 4)
    struct.pack_into("<QHH", core, cs._BLOCKLIST, 2, 3, cs._KERNEL_SEGMENT)
    with pytest.raises(ImageBuildError, match="unexpected blocklist"):
        cs.patch_core(bytes(core), 2048, 2048)


def test_real_grub_boot_img_has_the_expected_fields() -> None:
    boot = cs.GRUB_PC_DIR / "boot.img"
    if not boot.is_file():
        pytest.skip("grub-pc-bin not installed")
    data = boot.read_bytes()
    assert struct.unpack_from("<Q", data, cs._KERNEL_SECTOR)[0] == 1  # grub's default
    assert data[cs._BOOT_DRIVE] == 0xFF


def test_manifest_round_trip(tmp_path: Path) -> None:
    img = cs.CloudStandin(
        directory=tmp_path, disk=tmp_path / cs.DISK_NAME, digest="ab" * 32,
        kernel_release="6.1.0-99-cloud-amd64", packages={"cloud-init": "22.4"},
        cmdline="console=ttyS0",
    )  # fmt: skip
    img.write_manifest()
    manifest = (tmp_path / cs.MANIFEST_NAME).read_text()
    assert '"stand-in": true' in manifest
    assert cs.CloudStandin.from_manifest(tmp_path) == img
    (tmp_path / cs.MANIFEST_NAME).write_text('{"disk": 3}')
    with pytest.raises(ValueError, match=r"image\.json.*'digest'"):
        cs.CloudStandin.from_manifest(tmp_path)


def test_grub_configs_boot_the_one_kernel_on_the_serial_console() -> None:
    recipe = cs.load_recipe()
    cfg = cs.grub_cfg("6.1.0-99-cloud-amd64", recipe)
    assert "set timeout=0" in cfg
    assert "set gfxpayload=text" in cfg
    assert "serial --unit=0" in cfg
    assert f"linux /boot/vmlinuz-6.1.0-99-cloud-amd64 {recipe.cmdline}" in cfg
    assert "initrd /boot/initrd.img-6.1.0-99-cloud-amd64" in cfg
    assert f"--label --set=root {recipe.root_label}" in cs.embedded_grub_cfg(recipe.root_label)


def test_lock_passwords(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.write_text("root:$6$x$y:1::::::\nbin:*:1::::::\nnobody:!:1::::::\n")
    cs._lock_passwords(shadow)
    assert shadow.read_text().splitlines()[0].startswith("root:*:")
    assert "nobody:!:" in shadow.read_text()


def test_doctor_check_names_the_missing_packages() -> None:
    assert set(CLOUD_STANDIN_FILES) <= set(APT_PACKAGES)  # --fix installs them
    bad = check_cloud_standin_tools({"grub-pc-bin": "/nonexistent/boot.img", "mtools": "no-tool"})
    assert not bad.ok and not bad.required
    assert bad.fix == "apt-get install grub-pc-bin mtools"
    assert set(CLOUD_STANDIN_FILES.values()) >= {"sfdisk", "mkfs.fat", "mcopy"}


def test_cache_prune_knows_the_stand_in(tmp_path: Path) -> None:
    """An entry of an older stand-in recipe goes; the current one stays."""
    images = image_cache.images_root(tmp_path)
    now = cs.recipe_digest()[:12]
    current = images / f"{cs.IMAGE_NAME}-{now}"
    old = images / f"{cs.IMAGE_NAME}-{'0' * 12 if now[0] != '0' else '1' * 12}"
    for d in (current, old):
        d.mkdir()
        (d / cs.DISK_NAME).write_bytes(b"x" * 1000)
    out = subprocess.run(
        [sys.executable, "-m", "harness.cli", "cache", "prune", "--dry-run"],
        capture_output=True, text=True, timeout=60, check=True,
        env=dict(os.environ, HARNESS_CACHE=str(tmp_path)),
    ).stdout  # fmt: skip
    assert f"would remove {old} " in out
    assert str(current) not in out
