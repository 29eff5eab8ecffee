"""The cloud-image stand-in: a vendor-like Debian cloud image built here.

No vendor cloud image can be downloaded on these machines, so the ``cloud``
platform is shown on this stand-in, named as one in tests and docs. Like a
vendor image it carries nothing of its user: no SSH host keys, no
authorized_keys, no password; cloud-init (NoCloud, then None) makes them on
first boot from the seed the harness writes.

Recipe: ``vm-images/cloud-standin/`` (recipe.toml, cloud-init config). The
build runs debootstrap (the Linux image's step, the mirror apt on the host
uses) and writes one whole disk that boots with SeaBIOS and with OVMF,
without mounting anything and without loop devices:

* GPT made by sfdisk on the raw file: a BIOS boot partition holding grub's
  i386-pc core image (grub's boot.img in the protective MBR points at it,
  both patched here as grub-bios-setup would), an EFI system partition (FAT
  by ``mkfs.fat --offset``, ``EFI/BOOT/BOOTX64.EFI`` from grub-mkimage
  x86_64-efi copied in with mtools), and the ext4 root (``mkfs.ext4 -d``
  at its offset in the same file);
* both grub images embed a two-line config that finds the root by its label
  and reads ``/boot/grub/grub.cfg`` there (serial console, timeout 0);
* the raw disk is converted to qcow2 (``disk.qcow2``), recorded in
  ``image.json`` with ``"stand-in": true``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness import paths
from harness.image import cache as image_cache
from harness.image.linux import (
    ImageBuildError,
    Progress,
    _install,
    _package_versions,
    _run,
    _which,
    cancellable,
    debootstrap,
    parse_recipe,
)
from harness.vm.lifecycle import PRIVATE_FILE_MODE, make_private_dir

IMAGE_NAME = "cloud-standin"
RECIPE_DIR = paths.VM_IMAGES_DIR / "cloud-standin"
RECIPE_FILE = RECIPE_DIR / "recipe.toml"
#: Installed as /etc/cloud/cloud.cfg.d/99-standin.cfg (datasources: NoCloud, None).
CLOUD_CFG = RECIPE_DIR / "99-standin.cfg"
MANIFEST_NAME = "image.json"
DISK_NAME = "disk.qcow2"
#: Bump when the build logic here changes what ends up in the image.
BUILD_FORMAT = 2  # 2: gfxpayload=text in grub.cfg, "stand-in" in the manifest

GRUB_PC_DIR = Path("/usr/lib/grub/i386-pc")
GRUB_EFI_DIR = Path("/usr/lib/grub/x86_64-efi")
#: grub modules built into both core images (nothing is loaded from the disk later).
GRUB_MODULES = (
    "part_gpt", "ext2", "fat", "search", "search_label", "search_fs_uuid", "normal",
    "configfile", "linux", "boot", "echo", "test", "serial", "terminal", "minicmd",
)  # fmt: skip
GRUB_PC_MODULES = ("biosdisk",)
GRUB_EFI_MODULES = ("efi_gop",)

SECTOR = 512
MIB = 1 << 20
#: GPT partition type GUIDs.
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_X86_64_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"


class StandinRecipe(BaseModel):
    """Validated content of ``vm-images/cloud-standin/recipe.toml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    suite: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    packages: list[str] = Field(min_length=1)
    mask: list[str] = Field(default_factory=list)
    disk_gib: int = Field(ge=1, le=64)
    esp_mib: int = Field(ge=8, le=512)
    root_label: str = Field(pattern=r"^[A-Za-z0-9_-]{1,16}$")
    cmdline: str = Field(min_length=1)
    recorded_packages: list[str] = Field(default_factory=list)

    @field_validator("packages")
    @classmethod
    def _needs(cls, value: list[str]) -> list[str]:
        missing = [p for p in ("cloud-init", "openssh-server") if p not in value]
        if missing:
            raise ValueError(f"must include {', '.join(missing)} (a cloud image needs them)")
        return value

    @field_validator("mask")
    @classmethod
    def _units(cls, value: list[str]) -> list[str]:
        bad = [u for u in value if "/" in u or "." not in u]
        if bad:
            raise ValueError(f"{bad} are not unit names such as 'apt-daily.timer'")
        return value

    @field_validator("cmdline")
    @classmethod
    def _console(cls, value: str) -> str:
        if "console=ttyS0" not in value:
            raise ValueError("must contain console=ttyS0 (the harness reads the serial console)")
        return value


def load_recipe(path: Path = RECIPE_FILE) -> StandinRecipe:
    """Parse and validate the recipe; errors name the file, the field and a fix."""
    return parse_recipe(
        path, StandinRecipe, f" (fix the field in {path}; vm-images/cloud-standin/README.md)"
    )


def recipe_files() -> list[Path]:
    """Every file whose content goes into the image (documentation excluded)."""
    return [p for p in sorted(RECIPE_DIR.iterdir()) if p.is_file() and p.suffix != ".md"]


def recipe_digest() -> str:
    """Digest of the current recipe; the image is rebuilt exactly when this changes."""
    return image_cache.recipe_digest(
        recipe_files(), extra=f"cloud-standin-format={BUILD_FORMAT}"
    )


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Partition:
    """One GPT partition, in 512-byte sectors."""

    number: int
    name: str
    type_guid: str
    start: int
    size: int

    @property
    def offset(self) -> int:
        """Byte offset in the disk."""
        return self.start * SECTOR

    @property
    def bytes(self) -> int:
        """Size in bytes."""
        return self.size * SECTOR


@dataclass(frozen=True)
class DiskLayout:
    """The whole disk: BIOS boot (1 MiB), ESP, root to the last MiB (backup GPT there)."""

    total_bytes: int
    bios_boot: Partition
    esp: Partition
    root: Partition

    @property
    def partitions(self) -> tuple[Partition, Partition, Partition]:
        return (self.bios_boot, self.esp, self.root)

    def sfdisk_script(self) -> str:
        """The input ``sfdisk`` turns into this GPT."""
        lines = ["label: gpt", "unit: sectors", "first-lba: 2048", ""]
        for p in self.partitions:
            lines.insert(
                -1, f"start={p.start}, size={p.size}, type={p.type_guid}, name=\"{p.name}\""
            )
        return "\n".join(lines)


def disk_layout(disk_gib: int, esp_mib: int, root_label: str) -> DiskLayout:
    """Partitions aligned to 1 MiB; the last MiB is left for the backup GPT."""
    mib = MIB // SECTOR
    total = disk_gib << 30
    root_start = (2 + esp_mib) * mib
    root_size = total // SECTOR - mib - root_start
    if root_size < 256 * mib:
        raise ValueError(
            f"{RECIPE_FILE}: field disk_gib {disk_gib} leaves {root_size // mib} MiB for the "
            f"root after a {esp_mib} MiB ESP: raise disk_gib or lower esp_mib"
        )
    return DiskLayout(
        total_bytes=total,
        bios_boot=Partition(1, "bios-boot", BIOS_BOOT_TYPE, mib, mib),
        esp=Partition(2, "esp", ESP_TYPE, 2 * mib, esp_mib * mib),
        root=Partition(3, root_label, ROOT_X86_64_TYPE, root_start, root_size),
    )


# --------------------------------------------------------------------------- grub for BIOS

#: Offsets in grub 2.06's boot.img (include/grub/i386/pc/boot.h).
_BPB_START, _BPB_END = 0x03, 0x5A
_KERNEL_SECTOR = 0x5C
_BOOT_DRIVE = 0x64
_DRIVE_CHECK = 0x66
_NT_MAGIC, _PART_END = 0x1B8, 0x1FE
#: The last blocklist entry of diskboot.img (core.img's first sector): start u64, len u16, seg u16.
_BLOCKLIST = SECTOR - 12
_KERNEL_SEGMENT = 0x820


def bios_boot_sectors(boot_img: bytes, mbr: bytes, core_lba: int) -> bytes:
    """The MBR that chains to grub's core image written contiguously from ``core_lba``.

    What grub-bios-setup does for an embedded core image: boot.img with the
    disk's BPB area and partition table (the protective MBR) kept, the core's
    first sector number, boot drive 0xff (the BIOS's DL) and the drive check
    turned off; the core's own blocklist is patched by :func:`patch_core`.
    """
    if len(boot_img) != SECTOR or len(mbr) != SECTOR:
        raise ImageBuildError(
            f"{GRUB_PC_DIR}/boot.img is not one sector: apt-get install --reinstall grub-pc-bin"
        )
    out = bytearray(boot_img)
    out[_BPB_START:_BPB_END] = mbr[_BPB_START:_BPB_END]
    out[_NT_MAGIC:_PART_END] = mbr[_NT_MAGIC:_PART_END]
    struct.pack_into("<Q", out, _KERNEL_SECTOR, core_lba)
    out[_BOOT_DRIVE] = 0xFF
    struct.pack_into("<H", out, _DRIVE_CHECK, 0x9090)
    return bytes(out)


def patch_core(core_img: bytes, core_lba: int, room_sectors: int) -> bytes:
    """``core_img`` with its blocklist pointing at the sectors after ``core_lba``."""
    sectors = -(-len(core_img) // SECTOR)
    if sectors > room_sectors:
        raise ImageBuildError(
            f"grub core image is {sectors} sectors, the BIOS boot partition holds "
            f"{room_sectors}: drop modules from GRUB_MODULES in {__file__}"
        )
    out = bytearray(core_img.ljust(sectors * SECTOR, b"\0"))
    _start, length, segment = struct.unpack_from("<QHH", out, _BLOCKLIST)
    if segment != _KERNEL_SEGMENT or length != sectors - 1:
        raise ImageBuildError(
            f"grub core image has an unexpected blocklist (len {length}, segment {segment:#x}): "
            "this build knows grub 2.06's i386-pc layout (apt-get install grub-pc-bin)"
        )
    struct.pack_into("<QHH", out, _BLOCKLIST, core_lba + 1, sectors - 1, segment)
    return bytes(out)


# --------------------------------------------------------------------------- the image


@dataclass(frozen=True)
class CloudStandin:
    """A built stand-in, as recorded in its ``image.json``."""

    directory: Path
    disk: Path
    digest: str
    kernel_release: str
    packages: dict[str, str] = field(default_factory=dict)
    root_label: str = "cloudimg-rootfs"
    cmdline: str = ""
    name: str = IMAGE_NAME

    def to_manifest(self) -> dict[str, Any]:
        """The JSON-able manifest; the disk path is relative to the image directory."""
        return {
            "format": BUILD_FORMAT,
            "name": self.name,
            "stand-in": True,
            "digest": self.digest,
            "disk": self.disk.relative_to(self.directory).as_posix(),
            "disk_format": "qcow2",
            "firmware": ["bios", "uefi"],
            "kernel_release": self.kernel_release,
            "cmdline": self.cmdline,
            "root_label": self.root_label,
            "packages": dict(self.packages),
        }

    @classmethod
    def from_manifest(cls, directory: Path) -> CloudStandin:
        """Load ``directory/image.json``; ValueError naming file and field when it is bad."""
        path = directory / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: unreadable manifest ({exc}); rebuild the image") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: manifest is not a JSON object; rebuild the image")
        for key in ("digest", "disk", "kernel_release", "cmdline", "root_label"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"{path}: field {key!r} missing or not a string; rebuild it")
        return cls(
            directory=directory,
            disk=directory / data["disk"],
            digest=data["digest"],
            kernel_release=data["kernel_release"],
            packages={str(k): str(v) for k, v in dict(data.get("packages") or {}).items()},
            root_label=data["root_label"],
            cmdline=data["cmdline"],
        )

    def write_manifest(self) -> None:
        """Write ``image.json`` atomically."""
        path = self.directory / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_manifest(), indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o644)
        os.replace(tmp, path)


def cached_cloud_standin(
    cache: Path | None = None, *, rejected: Progress | None = None
) -> CloudStandin | None:
    """The cached stand-in for the current recipe (its files verified), or None."""
    digest = recipe_digest()
    directory = image_cache.lookup(IMAGE_NAME, digest, cache, rejected=rejected)
    if directory is None:
        return None
    try:
        image = CloudStandin.from_manifest(directory)
    except ValueError:
        return None
    if image.digest != digest or not image.disk.is_file():
        return None
    _make_private(image)
    return image


def cloud_standin(cache: Path | None = None, *, progress: Progress | None = None) -> CloudStandin:
    """The stand-in for the current recipe: from the cache, built first when missing."""
    return build_cloud_standin(cache, progress=progress)


def _make_private(image: CloudStandin) -> None:
    """Directory 0710 root:libvirt-qemu and the base disk 0600, as the Linux image's."""
    make_private_dir(image.directory)
    if image.disk.stat().st_mode & 0o077:
        image.disk.chmod(PRIVATE_FILE_MODE)


def build_cloud_standin(
    cache: Path | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> CloudStandin:
    """Build the stand-in (or return the cached one unless ``force``).

    Needs root, the Debian mirror apt uses, debootstrap, e2fsprogs, qemu-utils,
    fdisk (sfdisk), dosfstools, mtools, grub-pc-bin and grub-efi-amd64-bin.
    """
    say = progress or (lambda _msg: None)
    with cancellable(cancel):
        if not force and (image := cached_cloud_standin(cache, rejected=say)) is not None:
            return image
        recipe = load_recipe()
        check_host()
        digest = recipe_digest()
        with image_cache.entry_lock(IMAGE_NAME, digest, cache):
            if not force and (image := cached_cloud_standin(cache)) is not None:
                return image
            with image_cache.staging(IMAGE_NAME, digest, cache) as stage:
                debs = image_cache.images_root(cache).parent / "debs"
                _build(recipe, digest, stage, debs, say)
            image = CloudStandin.from_manifest(image_cache.entry_dir(IMAGE_NAME, digest, cache))
            _make_private(image)
            say(f"image ready: {image.directory} ({image.kernel_release})")
            return image


#: tool -> the Debian package that has it.
HOST_TOOLS = {
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
    "qemu-img": "qemu-utils",
    "sfdisk": "fdisk",
    "mkfs.fat": "dosfstools",
    "mcopy": "mtools",
    "grub-mkimage": "grub-pc-bin",
}
#: grub platform directories -> their package.
GRUB_DIRS = {GRUB_PC_DIR: "grub-pc-bin", GRUB_EFI_DIR: "grub-efi-amd64-bin"}


def missing_host_packages() -> list[str]:
    """The Debian packages whose tools or grub files this build lacks (empty: it can run)."""
    missing = [pkg for tool, pkg in HOST_TOOLS.items() if not _which(tool)]
    missing += [pkg for d, pkg in GRUB_DIRS.items() if not (d / "modinfo.sh").is_file()]
    return sorted(set(missing))


def check_host() -> None:
    """Root and every tool, or ImageBuildError saying what to install."""
    if os.geteuid() != 0:
        raise ImageBuildError(
            "building the cloud-image stand-in needs root (debootstrap): run it as root"
        )
    missing = missing_host_packages()
    if missing:
        raise ImageBuildError(
            f"the cloud-image stand-in build needs {', '.join(missing)}: "
            f"apt-get install {' '.join(missing)} (or harness doctor --fix)"
        )


def _build(
    recipe: StandinRecipe, digest: str, stage: Path, debs: Path, say: Progress
) -> CloudStandin:
    t0 = time.monotonic()
    make_private_dir(stage)
    log = stage / "build.log"
    rootfs = stage / "rootfs"
    debootstrap(recipe.suite, recipe.packages, rootfs, debs, log, say, RECIPE_FILE)

    say("configuring root file system (no keys, no passwords: cloud-init makes them)")
    release = configure_rootfs(rootfs, recipe)
    packages = _package_versions(rootfs, recipe.recorded_packages)

    layout = disk_layout(recipe.disk_gib, recipe.esp_mib, recipe.root_label)
    say(f"writing the disk: GPT, BIOS boot, {recipe.esp_mib} MiB ESP, ext4 root "
        f"({recipe.disk_gib} GiB sparse)")
    raw = stage / "disk.raw"
    with open(os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE), "wb") as fh:
        fh.truncate(layout.total_bytes)
    write_disk(raw, layout, rootfs, stage, log)

    disk = stage / DISK_NAME
    _run("qemu-img convert", ["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)], log,
         f"check free space in {stage.parent}")
    disk.chmod(PRIVATE_FILE_MODE)
    raw.unlink()
    shutil.rmtree(rootfs)

    image = CloudStandin(
        directory=stage, disk=disk, digest=digest, kernel_release=release,
        packages=packages, root_label=recipe.root_label, cmdline=recipe.cmdline,
    )  # fmt: skip
    image.write_manifest()
    log.chmod(0o644)
    say(f"built in {time.monotonic() - t0:.0f} s")
    return image


def configure_rootfs(rootfs: Path, recipe: StandinRecipe) -> str:
    """Make the root file system a vendor-like first-boot image; return the kernel release."""
    # Nothing of a user or a host: cloud-init makes host keys and users on first boot.
    for old in (rootfs / "etc/ssh").glob("ssh_host_*"):
        old.unlink()
    shutil.rmtree(rootfs / "root/.ssh", ignore_errors=True)
    _lock_passwords(rootfs / "etc/shadow")
    (rootfs / "etc/machine-id").write_text("")  # made anew on first boot
    (rootfs / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    (rootfs / "etc/hostname").write_text("localhost\n")
    (rootfs / "etc/hosts").write_text("127.0.0.1\tlocalhost\n")
    resolv = rootfs / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text("")
    _install(CLOUD_CFG, rootfs / "etc/cloud/cloud.cfg.d/99-standin.cfg", 0o644)
    (rootfs / "etc/network/interfaces").write_text(
        "# cloud-init writes the NIC's configuration to interfaces.d/50-cloud-init\n"
        "source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n"
    )
    (rootfs / "etc/fstab").write_text(
        f"LABEL={recipe.root_label}\t/\text4\trw,discard,errors=remount-ro\t0\t1\n"
    )
    units = rootfs / "etc/systemd/system"
    for unit in recipe.mask:
        link = units / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    for d in (rootfs / "var/lib/apt/lists", rootfs / "var/cache/apt/archives"):
        for f in d.glob("*"):
            if f.is_file():
                f.unlink()

    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1 or not any((rootfs / "boot").glob("initrd.img-*")):
        raise ImageBuildError(
            f"expected one kernel and its initrd in {rootfs / 'boot'}, found {len(kernels)}: "
            f"check the linux-image package in {RECIPE_FILE} field 'packages'"
        )
    release = kernels[0].name.removeprefix("vmlinuz-")
    grub_dir = rootfs / "boot/grub"
    grub_dir.mkdir(parents=True, exist_ok=True)
    (grub_dir / "grub.cfg").write_text(grub_cfg(release, recipe))
    return release


def _lock_passwords(shadow: Path) -> None:
    """Every account without a usable password (``*``), as a vendor image ships."""
    lines = []
    for line in shadow.read_text().splitlines():
        f = line.split(":")
        if len(f) > 1 and f[1] not in ("*", "!", "!*") and not f[1].startswith("!"):
            f[1] = "*"
        lines.append(":".join(f))
    shadow.write_text("\n".join(lines) + "\n")


def grub_cfg(release: str, recipe: StandinRecipe) -> str:
    """``/boot/grub/grub.cfg``: serial console, no menu wait, the one kernel."""
    return (
        "serial --unit=0 --speed=115200\n"
        "terminal_input serial console\n"
        "terminal_output serial console\n"
        "set timeout=0\n"
        "set default=0\n"
        "menuentry 'Debian GNU/Linux (cloud-image stand-in)' {\n"
        f"  search --no-floppy --label --set=root {recipe.root_label}\n"
        "  set gfxpayload=text\n"  # VGA text under SeaBIOS; OVMF with no display: "blind mode"
        f"  linux /boot/vmlinuz-{release} {recipe.cmdline}\n"
        f"  initrd /boot/initrd.img-{release}\n"
        "}\n"
    )


def embedded_grub_cfg(root_label: str) -> str:
    """The config built into both grub images: find the root, then its grub.cfg."""
    return (
        f"search --no-floppy --label --set=root {root_label}\n"
        "set prefix=($root)/boot/grub\n"
    )


def write_disk(raw: Path, layout: DiskLayout, rootfs: Path, work: Path, log: Path) -> None:
    """GPT, file systems and boot loaders written into ``raw`` (nothing mounted)."""
    script = work / "sfdisk.script"
    script.write_text(layout.sfdisk_script() + "\n")
    _run("sfdisk", ["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(raw)], log,
         "apt-get install fdisk", stdin=script)
    root = layout.root
    _run(
        "mkfs.ext4",
        [
            "mkfs.ext4", "-q", "-F", "-L", layout.root.name,
            "-E", f"offset={root.offset},nodiscard,lazy_itable_init=0,lazy_journal_init=0",
            "-d", str(rootfs), str(raw), f"{root.bytes // 1024}k",
        ],
        log,
        f"raise 'disk_gib' in {RECIPE_FILE} if the root file system does not fit",
    )  # fmt: skip
    esp = layout.esp
    fat = "16" if esp.bytes < 256 * MIB else "32"  # FAT32 wants more clusters than a small ESP
    _run("mkfs.fat", ["mkfs.fat", "-F", fat, "-n", "ESP", f"--offset={esp.start}", str(raw),
                      str(esp.bytes // 1024)], log,
         f"check {RECIPE_FILE} field 'esp_mib' (8-512), and apt-get install dosfstools")
    cfg = work / "grub-embedded.cfg"
    cfg.write_text(embedded_grub_cfg(layout.root.name))
    efi = work / "BOOTX64.EFI"
    core = work / "core.img"
    for platform, out, extra, directory in (
        ("x86_64-efi", efi, GRUB_EFI_MODULES, GRUB_EFI_DIR),
        ("i386-pc", core, GRUB_PC_MODULES, GRUB_PC_DIR),
    ):
        _run(f"grub-mkimage {platform}",
             ["grub-mkimage", "-O", platform, "-d", str(directory), "-o", str(out),
              "-c", str(cfg), "-p", "/boot/grub", *GRUB_MODULES, *extra],
             log, f"apt-get install {GRUB_DIRS[directory]}")  # fmt: skip
    target = f"{raw}@@{esp.offset}"
    _run("mmd", ["env", "MTOOLS_SKIP_CHECK=1", "mmd", "-i", target, "::/EFI", "::/EFI/BOOT"],
         log, "apt-get install mtools")
    _run("mcopy", ["env", "MTOOLS_SKIP_CHECK=1", "mcopy", "-i", target, str(efi),
                   "::/EFI/BOOT/BOOTX64.EFI"], log, "apt-get install mtools")
    bios = layout.bios_boot
    with raw.open("r+b") as fh:
        mbr = fh.read(SECTOR)
        core_bytes = patch_core(core.read_bytes(), bios.start, bios.size)
        boot = bios_boot_sectors((GRUB_PC_DIR / "boot.img").read_bytes(), mbr, bios.start)
        fh.seek(0)
        fh.write(boot)
        fh.seek(bios.offset)
        fh.write(core_bytes)
    for f in (script, cfg, efi, core):
        f.unlink()


def partitions_of(dump: str) -> Iterator[dict[str, str]]:
    """The partition lines of ``sfdisk --dump`` output as dicts (start, size, type, name)."""
    for line in dump.splitlines():
        if " : " not in line:
            continue
        out: dict[str, str] = {"device": line.split(" : ", 1)[0].strip()}
        for part in line.split(" : ", 1)[1].split(","):
            key, _, value = part.strip().partition("=")
            out[key.strip()] = value.strip().strip('"')
        yield out
