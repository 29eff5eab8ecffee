"""Guest kernels under test: kernel files checked before booting, and kernel variants.

**A kernel file** (``kernel = PATH`` on a Linux VM) must be an x86 bzImage:
the boot protocol's ``HdrS`` magic at offset 0x202 (what QEMU's direct
kernel boot loads). Anything else is refused before a VM starts, saying what
the file looks like instead (an ELF ``vmlinux``, a gzip, a text file ...).
The release in its header (``kernel_version`` pointer, e.g. ``6.1.0-57-amd64
(debian-kernel@...) #1 SMP ...``) is read too, so a kernel the image's own
initramfs was built for is recognised.

**A kernel variant** (``harness image build linux --kernel-package NAME``,
or a VM's ``kernel_package``): the default image's root file system booted
with another Debian kernel package's ``vmlinuz`` and a tiny initramfs of the
same kind as the image's (static busybox, ``vm-images/linux/initramfs-init``)
holding that kernel's own virtio modules (and ext4 with its checksum driver,
which Debian's generic kernel builds as modules). The package is fetched
with ``apt-get download`` from the mirror apt on the host uses (a
metapackage such as ``linux-image-amd64`` is followed to the image package
it depends on), unpacked with ``dpkg-deb -x``; module dependencies come from
each module's ``.modinfo`` (no depmod needed on the host). Cached digest-keyed
(``<cache>/images/linux-kernel-<digest12>/``) by package name and version,
the busybox package's version, the initramfs recipe and this module's
format. The root file system keeps only the image kernel's
``/lib/modules``: a guest booted on a variant loads no module after boot
(everything the harness needs is loaded from its initramfs).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.image import cache as image_cache
from harness.image.linux import (
    RECIPE_DIR,
    ImageBuildError,
    _build_ctx,
    _run,
    _which,
    _write_initramfs,
    load_recipe,
)
from harness.vm.lifecycle import make_private_dir

VARIANT_NAME = "linux-kernel"
MANIFEST_NAME = "kernel.json"
#: Bump when the variant build changes what ends up in an entry.
VARIANT_FORMAT = 1
#: Modules a variant's initramfs loads besides the recipe's (each skipped where the kernel
#: builds it in, or lacks it): Debian's generic kernel has ext4 and crc32c as modules, and
#: ext4's metadata checksums need the crc32c driver, which only modprobe would load.
EXTRA_MODULES = ("crc32c_generic", "ext4")
#: Debian policy 5.6.1: lower case letters, digits, + - . ; at least two; starts alnum.
PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")
#: The x86 boot protocol: "HdrS" at 0x202, the protocol version at 0x206, and at 0x20e
#: the offset (from 0x200) of the kernel version string (protocol 2.00 on).
_HDRS_OFFSET, _VERSION_PTR = 0x202, 0x20E

Progress = Callable[[str], None]


class KernelFileError(ValueError):
    """A kernel or initrd file cannot be booted; ``reason`` and ``fix`` in words."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(f"{reason} (fix: {fix})")
        self.reason, self.fix = reason, fix


# --------------------------------------------------------------------------- kernel files


def looks_like(head: bytes) -> str:
    """What a file starting with ``head`` looks like, in a few words."""
    if not head:
        return "an empty file"
    magic = [
        (b"\x7fELF", "an ELF file (an uncompressed vmlinux? boot arch/x86/boot/bzImage)"),
        (b"\x1f\x8b", "a gzip file (a compressed vmlinux or initrd?)"),
        (b"\xfd7zXZ\x00", "an xz file"),
        (b"\x28\xb5\x2f\xfd", "a zstd file"),
        (b"BZh", "a bzip2 file"),
        (b"\x02\x21\x4c\x18", "an lz4 file"),
        (b"070701", "a cpio archive (an initramfs, not a kernel)"),
        (b"070702", "a cpio archive (an initramfs, not a kernel)"),
        (b"QFI\xfb", "a qcow2 disk image"),
        (b"!<arch>", "an ar archive (a .deb? unpack it: dpkg-deb -x FILE DIR)"),
        (b"PK\x03\x04", "a zip file"),
    ]
    for prefix, what in magic:
        if head.startswith(prefix):
            return what
    if head.startswith(b"MZ"):
        return "a PE/EFI executable without the x86 boot header (not an x86 bzImage)"
    if len(head) > 0x210 and head[0x1FE:0x200] == b"\x55\xaa":
        return "a boot sector without the Linux boot header"
    sample = head[:512]
    if all(32 <= b < 127 or b in (9, 10, 13) for b in sample):
        return "a text file"
    return "binary data of an unknown kind"


def kernel_release(path: Path) -> str:
    """The release a bzImage says it is (``6.1.0-57-amd64``); raise KernelFileError when
    ``path`` is missing, unreadable or not an x86 bzImage, saying what it is instead."""
    try:
        with path.open("rb") as f:
            head = f.read(64 * 1024)
    except FileNotFoundError:
        raise KernelFileError(f"{path} does not exist",
                              "give the path of a bzImage (arch/x86/boot/bzImage, "
                              "/boot/vmlinuz-*)") from None
    except IsADirectoryError:
        raise KernelFileError(f"{path} is a directory", "give the kernel file itself") from None
    except OSError as exc:
        raise KernelFileError(f"{path} cannot be read ({exc.strerror})",
                              "make it readable by the user running the harness") from None
    except ValueError as exc:  # a NUL in the path
        raise KernelFileError(f"{str(path)!r} is not a usable path ({exc})",
                              "give the path of the kernel file") from None
    if head[_HDRS_OFFSET:_HDRS_OFFSET + 4] != b"HdrS":
        raise KernelFileError(
            f"{path} is not an x86 bzImage (no boot protocol magic 'HdrS' at offset 0x202): "
            f"it looks like {looks_like(head)}",
            "give the bzImage: arch/x86/boot/bzImage of a kernel build, or /boot/vmlinuz-* "
            "of a distribution kernel",
        )
    (pointer,) = struct.unpack_from("<H", head, _VERSION_PTR)
    start = 0x200 + pointer
    text = head[start:start + 256].split(b"\0", 1)[0].decode("ascii", "replace")
    release = text.split(" ", 1)[0]
    return release if re.fullmatch(r"[A-Za-z0-9._+~-]{1,64}", release) else ""


def check_initrd(path: Path) -> None:
    """Raise KernelFileError when ``path`` is not a readable file (any initramfs format
    the kernel unpacks is accepted: cpio, gzip, zstd, xz ...)."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise KernelFileError(f"{path} does not exist",
                              "give the initramfs built for this kernel, or leave initrd out "
                              "(docs/GUEST-KERNELS.md: what a kernel without one needs)") from None
    except IsADirectoryError:
        raise KernelFileError(f"{path} is a directory",
                              "give the initramfs file (a cpio archive, compressed or "
                              "not)") from None
    except OSError as exc:
        raise KernelFileError(f"{path} cannot be read ({exc.strerror})",
                              "make it readable by the user running the harness") from None
    except ValueError as exc:  # a NUL in the path
        raise KernelFileError(f"{str(path)!r} is not a usable path ({exc})",
                              "give the path of the initramfs file") from None
    if not head:
        raise KernelFileError(f"{path} is empty", "give the initramfs built for this kernel")


def file_sha256(path: Path) -> str:
    """The sha256 of a file (a kernel: a few MB, milliseconds)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class KernelVariant:
    """A built kernel variant, as recorded in its ``kernel.json``."""

    directory: Path
    digest: str
    package: str  # what was asked for (may be a metapackage)
    package_version: str
    image_package: str  # the package that holds the vmlinuz
    image_package_version: str
    release: str
    kernel: Path
    initrd: Path
    kernel_sha256: str
    modules: tuple[str, ...]

    def to_manifest(self) -> dict[str, Any]:
        """The JSON-able manifest (paths relative to the entry)."""
        return {
            "format": VARIANT_FORMAT, "digest": self.digest, "package": self.package,
            "package_version": self.package_version, "image_package": self.image_package,
            "image_package_version": self.image_package_version, "release": self.release,
            "kernel": self.kernel.name, "initrd": self.initrd.name,
            "kernel_sha256": self.kernel_sha256, "modules": list(self.modules),
        }

    @classmethod
    def from_manifest(cls, directory: Path) -> KernelVariant:
        """Load ``directory/kernel.json``; ValueError naming the file when it is bad."""
        path = directory / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
            return cls(
                directory=directory, digest=str(data["digest"]), package=str(data["package"]),
                package_version=str(data["package_version"]),
                image_package=str(data["image_package"]),
                image_package_version=str(data["image_package_version"]),
                release=str(data["release"]), kernel=directory / str(data["kernel"]),
                initrd=directory / str(data["initrd"]),
                kernel_sha256=str(data["kernel_sha256"]),
                modules=tuple(str(m) for m in data["modules"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable manifest ({exc}); rebuild the variant") from exc


def check_package_name(name: str) -> str | None:
    """Why ``name`` is not a Debian package name (None when it is one)."""
    if not PACKAGE_NAME.fullmatch(name):
        return (f"{name!r} is not a Debian package name (lower-case letters, digits, '+', "
                "'-' and '.', at least two, starting with a letter or digit)")
    return None


def candidate_version(package: str) -> tuple[str, str]:
    """(version apt would download, its Depends) for ``package``; ImageBuildError if none."""
    if (problem := check_package_name(package)) is not None:
        raise ImageBuildError(f"--kernel-package: {problem}; e.g. linux-image-amd64")
    exe = _which("apt-cache")
    if exe is None:
        raise ImageBuildError("apt-cache not found: kernel variants need apt (Debian hosts)")
    out = subprocess.run([exe, "show", "--no-all-versions", package], capture_output=True,
                         text=True, timeout=60, check=False)
    fields = _control_fields(out.stdout)
    if out.returncode != 0 or "Version" not in fields:
        raise ImageBuildError(
            f"no package {package!r} in apt's package lists (fix: check the name, e.g. "
            "apt-cache search --names-only '^linux-image-'; or run apt-get update)"
        )
    return fields["Version"], fields.get("Depends", "")


def _control_fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(": ")
        if sep and not line[0].isspace():
            fields[key] = value.strip()
    return fields


def variant_digest(package: str, version: str, busybox_version: str) -> str:
    """The cache key of a variant: what its files are made of."""
    recipe = load_recipe()
    h = hashlib.sha256()
    h.update(f"format={VARIANT_FORMAT}\npackage={package}={version}\n".encode())
    h.update(f"busybox-static={busybox_version}\n".encode())
    h.update(f"modules={','.join([*recipe.initramfs_modules, *EXTRA_MODULES])}\n".encode())
    h.update((RECIPE_DIR / "initramfs-init").read_bytes())
    return h.hexdigest()


def cached_variant(package: str, cache: Path | None = None) -> KernelVariant | None:
    """The built variant of ``package`` at apt's candidate version, or None."""
    version, _ = candidate_version(package)
    busybox, _ = candidate_version("busybox-static")
    return _lookup(variant_digest(package, version, busybox), cache)


def _lookup(digest: str, cache: Path | None) -> KernelVariant | None:
    directory = image_cache.lookup(VARIANT_NAME, digest, cache)
    if directory is None:
        return None
    try:
        variant = KernelVariant.from_manifest(directory)
    except ValueError:
        return None
    return variant if variant.digest == digest else None


def build_kernel_variant(
    package: str,
    cache: Path | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> KernelVariant:
    """The variant of the default image for kernel ``package`` (built once, then cached).

    Needs root (cache), apt-get with current package lists, dpkg-deb. About
    20 s: a 70 MB download, unpacking, a 4 MB initramfs.
    """
    say = progress or (lambda _msg: None)
    version, depends = candidate_version(package)
    busybox_version, _ = candidate_version("busybox-static")
    digest = variant_digest(package, version, busybox_version)
    if not force and (found := _lookup(digest, cache)) is not None:
        return found
    for tool in ("apt-get", "dpkg-deb"):
        if _which(tool) is None:
            raise ImageBuildError(f"{tool} not found: kernel variants need apt and dpkg")
    _build_ctx.cancel = cancel
    try:
        with image_cache.entry_lock(VARIANT_NAME, digest, cache):
            if not force and (found := _lookup(digest, cache)) is not None:
                return found
            with image_cache.staging(VARIANT_NAME, digest, cache) as stage:
                _build_variant(stage, digest, package, version, depends, busybox_version, say)
            final = image_cache.entry_dir(VARIANT_NAME, digest, cache)
            variant = KernelVariant.from_manifest(final)
            say(f"kernel variant ready: {final} ({variant.release})")
            return variant
    finally:
        _build_ctx.cancel = None


def _build_variant(
    stage: Path, digest: str, package: str, version: str, depends: str,
    busybox_version: str, say: Progress,
) -> None:
    t0 = time.monotonic()
    log = stage / "build.log"
    work = stage / "work"
    work.mkdir()
    make_private_dir(work)
    tree = work / "tree"
    tree.mkdir()
    say(f"apt-get download {package}={version} busybox-static={busybox_version}")
    _download(work, [f"{package}={version}", f"busybox-static={busybox_version}"], log)
    image_package, image_version = package, version
    if not _has_vmlinuz(work, package, log):
        # A metapackage: follow its linux-image-* dependency (pinned by version).
        m = re.search(r"(linux-image-[a-z0-9+.-]+)\s*\(=\s*([^)\s]+)\)", depends)
        if m is None:
            raise ImageBuildError(
                f"{package} {version} holds no /boot/vmlinuz-* and depends on no "
                "linux-image-* package: give a Debian kernel image package, e.g. "
                "linux-image-amd64 or linux-image-cloud-amd64"
            )
        image_package, image_version = m.group(1), m.group(2)
        say(f"{package} is a metapackage: apt-get download {image_package}={image_version}")
        _download(work, [f"{image_package}={image_version}"], log)
    for deb in sorted(work.glob("*.deb")):
        _run(f"dpkg-deb -x {deb.name}", ["dpkg-deb", "-x", str(deb), str(tree)], log,
             "the downloaded package is damaged: run again (it is downloaded anew)")
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageBuildError(
            f"{image_package} {image_version} holds {len(kernels)} kernels in /boot, "
            "expected one: give a Debian kernel image package"
        )
    release = kernels[0].name.removeprefix("vmlinuz-")
    module_dir = tree / "lib/modules" / release
    say(f"kernel {release}: module dependencies, initramfs")
    write_modules_dep(module_dir)
    recipe = load_recipe()
    modules = [*recipe.initramfs_modules, *present(module_dir, EXTRA_MODULES)]
    kernel = stage / "vmlinuz"
    shutil.copyfile(kernels[0], kernel)
    kernel.chmod(0o644)
    initrd = stage / "initrd.cpio"
    _write_initramfs(tree, release, modules, initrd)
    initrd.chmod(0o644)
    shutil.rmtree(work)
    variant = KernelVariant(
        directory=stage, digest=digest, package=package, package_version=version,
        image_package=image_package, image_package_version=image_version, release=release,
        kernel=kernel, initrd=initrd, kernel_sha256=file_sha256(kernel),
        modules=tuple(modules),
    )
    manifest = stage / MANIFEST_NAME
    manifest.write_text(json.dumps(variant.to_manifest(), indent=2, sort_keys=True) + "\n")
    manifest.chmod(0o644)
    log.chmod(0o644)
    say(f"built in {time.monotonic() - t0:.0f} s")


def _download(work: Path, packages: list[str], log: Path) -> None:
    _run(
        "apt-get download",
        ["apt-get", "download", "-q", *packages],
        log,
        "check the package name and version (apt-cache policy NAME), that apt's mirror is "
        "reachable, and run apt-get update if the lists are old",
        cwd=work,
    )


def _has_vmlinuz(work: Path, package: str, log: Path) -> bool:
    debs = [d for d in work.glob("*.deb") if d.name.startswith(f"{package}_")]
    if not debs:
        raise ImageBuildError(f"apt-get download left no {package}_*.deb in {work}")
    exe = _which("dpkg-deb") or "dpkg-deb"
    listing = subprocess.run([exe, "-c", str(debs[0])], capture_output=True, text=True,
                             timeout=120, check=False)
    return "./boot/vmlinuz-" in listing.stdout


_DEPENDS = re.compile(rb"(?:^|\0)depends=([^\0]*)")


def write_modules_dep(module_dir: Path) -> None:
    """Write ``modules.dep`` (what depmod makes) from each module's ``.modinfo`` depends.

    Direct dependencies only, which is all :func:`harness.image.linux.resolve_modules`
    follows (it recurses). Uncompressed ``.ko`` files (Debian's kernels)."""
    by_name: dict[str, str] = {}
    depends: dict[str, list[str]] = {}
    for ko in sorted(module_dir.rglob("*.ko")):
        rel = ko.relative_to(module_dir).as_posix()
        name = ko.name.removesuffix(".ko").replace("-", "_")
        by_name[name] = rel
        m = _DEPENDS.search(ko.read_bytes())
        names = m.group(1).decode("ascii", "replace").split(",") if m else []
        depends[rel] = [n.replace("-", "_") for n in names if n]
    lines = []
    for rel, names in depends.items():
        deps = [by_name[n] for n in names if n in by_name]
        lines.append(f"{rel}: {' '.join(deps)}".rstrip() + "\n")
    (module_dir / "modules.dep").write_text("".join(lines))
    builtin = module_dir / "modules.builtin"
    if not builtin.exists():
        builtin.write_text("")


def present(module_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` the kernel has as modules (built-in or absent ones left out)."""
    text = (module_dir / "modules.dep").read_text()
    have = {Path(line.split(":", 1)[0]).name.removesuffix(".ko").replace("-", "_")
            for line in text.splitlines()}
    return [n for n in names if n.replace("-", "_") in have]
