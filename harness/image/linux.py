"""The default Linux guest image: Debian, built offline-reproducibly, fast to boot under TCG.

Recipe: ``vm-images/linux/`` (recipe.toml, init scripts, sshd config) plus the
guest tools in ``workloads/guest-tools/``. The build runs debootstrap with the
mirror apt on the host already uses, installs the statically linked guest
tools, generates the client key and the guest host key, writes an ext4 root
file system into a qcow2 base image and a tiny initramfs (static busybox and
the virtio modules only), and records everything in ``image.json``.

The guest boots straight into ``/sbin/harness-init`` (no systemd, no udev, no
DHCP): under TCG this answers SSH in seconds instead of half a minute.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness import paths
from harness.host.process import die_with_parent
from harness.image import cache as image_cache
from harness.vm.lifecycle import PRIVATE_FILE_MODE, make_private_dir

IMAGE_NAME = "linux"
RECIPE_DIR = paths.VM_IMAGES_DIR / "linux"
RECIPE_FILE = RECIPE_DIR / "recipe.toml"
MANIFEST_NAME = "image.json"
#: Bump when the build logic in this module changes what ends up in the image.
BUILD_FORMAT = 2  # 2: entries carry SHA256SUMS, verified on every lookup
#: Guest tools compiled on the host (static) and installed in /usr/local/bin.
GUEST_TOOL_SOURCES = {
    name: paths.GUEST_TOOLS_DIR / f"{name}.c"
    for name in ("page-touch", "kvm-marker", "membw", "fork-storm", "mmap-churn")
}
#: Tools the harness may call inside the guest, by absolute path.
GUEST_TOOLS = {
    **{name: f"/usr/local/bin/{name}" for name in GUEST_TOOL_SOURCES},
    "redis-server": "/usr/bin/redis-server",
    "redis-benchmark": "/usr/bin/redis-benchmark",
    "stress-ng": "/usr/bin/stress-ng",
    "python3": "/usr/bin/python3",
}
#: Packages whose versions are recorded in the manifest (provenance).
_RECORDED_PACKAGES = (
    "linux-image-cloud-amd64",
    "openssh-server",
    "stress-ng",
    "python3",
    "redis-server",
)

Progress = Callable[[str], None]


class ImageBuildError(RuntimeError):
    """A build step failed; the message names the step and how to fix it."""


class LinuxRecipe(BaseModel):
    """Validated content of ``vm-images/linux/recipe.toml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    suite: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    packages: list[str] = Field(min_length=1)
    initramfs_modules: list[str]
    disk_gib: int = Field(ge=1, le=64)
    cmdline: str = Field(min_length=1)


@dataclass(frozen=True)
class LinuxImage:
    """A built Linux guest image, as recorded in its ``image.json``."""

    name: str
    digest: str
    directory: Path
    disk: Path
    kernel: Path
    initrd: Path | None
    cmdline: str
    ssh_user: str
    ssh_private_key: Path
    host_key: str
    guest_tools: dict[str, str]
    kernel_release: str = ""
    packages: dict[str, str] = field(default_factory=dict)

    def to_manifest(self) -> dict[str, Any]:
        """Return the JSON-able manifest; paths are relative to the image directory."""

        def rel(p: Path) -> str:
            return p.relative_to(self.directory).as_posix()

        return {
            "format": BUILD_FORMAT,
            "name": self.name,
            "digest": self.digest,
            "disk": rel(self.disk),
            "kernel": rel(self.kernel),
            "initrd": rel(self.initrd) if self.initrd is not None else None,
            "cmdline": self.cmdline,
            "ssh_user": self.ssh_user,
            "ssh_private_key": rel(self.ssh_private_key),
            "host_key": self.host_key,
            "guest_tools": dict(self.guest_tools),
            "kernel_release": self.kernel_release,
            "packages": dict(self.packages),
        }

    @classmethod
    def from_manifest(cls, directory: Path) -> LinuxImage:
        """Load the image described by ``directory/image.json``.

        Raises ValueError naming the file and field when the manifest is bad.
        """
        path = directory / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: unreadable manifest ({exc}); rebuild the image") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: manifest is not a JSON object; rebuild the image")

        def get(key: str, kind: type) -> Any:
            value = data.get(key)
            if not isinstance(value, kind):
                raise ValueError(
                    f"{path}: field {key!r} missing or not a {kind.__name__}; rebuild the image"
                )
            return value

        initrd = data.get("initrd")
        if initrd is not None and not isinstance(initrd, str):
            raise ValueError(f"{path}: field 'initrd' must be a string or null; rebuild the image")
        return cls(
            name=get("name", str),
            digest=get("digest", str),
            directory=directory,
            disk=directory / get("disk", str),
            kernel=directory / get("kernel", str),
            initrd=directory / initrd if initrd is not None else None,
            cmdline=get("cmdline", str),
            ssh_user=get("ssh_user", str),
            ssh_private_key=directory / get("ssh_private_key", str),
            host_key=get("host_key", str),
            guest_tools={str(k): str(v) for k, v in get("guest_tools", dict).items()},
            kernel_release=str(data.get("kernel_release", "")),
            packages={str(k): str(v) for k, v in dict(data.get("packages") or {}).items()},
        )

    def write_manifest(self) -> None:
        """Write ``image.json`` atomically."""
        path = self.directory / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_manifest(), indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o644)
        os.replace(tmp, path)

    def missing_files(self) -> list[Path]:
        """Return the artifact files that do not exist (empty for a usable image)."""
        files = [self.disk, self.kernel, self.ssh_private_key]
        if self.initrd is not None:
            files.append(self.initrd)
        return [f for f in files if not f.is_file()]


def load_recipe(path: Path = RECIPE_FILE) -> LinuxRecipe:
    """Parse and validate the recipe; errors name the file, the field and a fix."""
    return parse_recipe(path, LinuxRecipe)


_Recipe = TypeVar("_Recipe", bound=BaseModel)


def parse_recipe(path: Path, model: type[_Recipe], fix: str = "") -> _Recipe:
    """Parse the TOML file ``path`` into ``model``; a ValueError names the file and each field.

    ``fix`` (if given) is appended to the message: what to do about it.
    """
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read recipe ({exc.strerror}); restore it") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from exc
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"field {'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ValueError(f"{path}: {problems}{fix}") from exc


def recipe_files() -> list[Path]:
    """Every file whose content goes into the image: the recipe dir and the tool sources.

    Markdown files are documentation, not recipe: editing them must not force a rebuild.
    """
    files = [p for p in sorted(RECIPE_DIR.iterdir()) if p.is_file() and p.suffix != ".md"]
    return files + sorted(GUEST_TOOL_SOURCES.values())


def recipe_digest() -> str:
    """Digest of the current recipe; the image is rebuilt exactly when this changes."""
    return image_cache.recipe_digest(recipe_files(), extra=f"linux-image-format={BUILD_FORMAT}")


def cached_linux_image(
    cache: Path | None = None, *, rejected: Progress | None = None
) -> LinuxImage | None:
    """Return the cached image for the current recipe, or None if not built yet.

    An entry whose files do not match the sums written at build time is not
    returned (``rejected`` is told why): a damaged image is rebuilt, never booted.
    """
    digest = recipe_digest()
    directory = image_cache.lookup(IMAGE_NAME, digest, cache, rejected=rejected)
    if directory is None:
        return None
    try:
        image = LinuxImage.from_manifest(directory)
    except ValueError:
        return None
    if image.digest != digest or image.missing_files():
        return None
    _make_private(image)
    return image


def _make_private(image: LinuxImage) -> None:
    """Close the image to other local users: its disk holds the guest's SSH host private key
    and ``id_ed25519`` logs in to every guest as root. Entries built before are closed too."""
    make_private_dir(image.directory)
    for f in (image.disk, image.ssh_private_key):
        if f.stat().st_mode & 0o077:
            f.chmod(PRIVATE_FILE_MODE)


def build_linux_image(
    cache: Path | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> LinuxImage:
    """Build the Linux guest image (or return the cached one unless ``force``).

    Needs root (debootstrap, device nodes), network access to the Debian mirror
    apt uses, and debootstrap, e2fsprogs, qemu-utils, openssh-client and gcc.
    Takes about a minute; downloaded packages are kept in ``<cache>/debs``.
    Once ``cancel`` is set the build stops (ImageBuildError), its staging
    directory removed.
    """
    with cancellable(cancel):
        return _build_or_lookup(cache, force, progress)


@contextlib.contextmanager
def cancellable(cancel: threading.Event | None) -> Iterator[None]:
    """Build commands this thread runs inside stop once ``cancel`` is set (see ``_run``)."""
    _build_ctx.cancel = cancel
    try:
        yield
    finally:
        _build_ctx.cancel = None


def _build_or_lookup(cache: Path | None, force: bool, progress: Progress | None) -> LinuxImage:
    say = progress or (lambda _msg: None)
    if not force and (image := cached_linux_image(cache, rejected=say)) is not None:
        return image
    recipe = load_recipe()
    _check_host()
    digest = recipe_digest()
    with image_cache.entry_lock(IMAGE_NAME, digest, cache):
        # Another process may have finished the same build while we waited.
        if not force and (image := cached_linux_image(cache)) is not None:
            return image
        with image_cache.staging(IMAGE_NAME, digest, cache) as stage:
            final = image_cache.entry_dir(IMAGE_NAME, digest, cache)
            debs = image_cache.images_root(cache).parent / "debs"
            staged = _build(recipe, digest, stage, debs, say)
        image = LinuxImage.from_manifest(final)
        _make_private(image)  # the cache made the entry traversable for all
        say(f"image ready: {final} ({staged.kernel_release})")
        return image


# --------------------------------------------------------------------------- build steps


_HOST_TOOLS = {
    "debootstrap": "apt-get install debootstrap",
    "mkfs.ext4": "apt-get install e2fsprogs",
    "qemu-img": "apt-get install qemu-utils",
    "ssh-keygen": "apt-get install openssh-client",
    "gcc": "apt-get install gcc libc6-dev",
}


def _check_host() -> None:
    if os.geteuid() != 0:
        raise ImageBuildError(
            "building the Linux image needs root (debootstrap creates device nodes and "
            "root-owned files): run the build as root"
        )
    missing = [f"{tool} not found: {fix}" for tool, fix in _HOST_TOOLS.items() if not _which(tool)]
    if missing:
        raise ImageBuildError("; ".join(missing))


def _which(tool: str) -> str | None:
    # debootstrap and mkfs live in sbin, which a non-login PATH may lack.
    extra = os.pathsep.join(["/usr/sbin", "/sbin"])
    return shutil.which(tool, path=os.environ.get("PATH", "") + os.pathsep + extra)


#: The build of this thread: the event that stops it (a run being torn down), if any.
_build_ctx = threading.local()


def _run(
    step: str,
    argv: list[str],
    log: Path,
    fix: str,
    cwd: Path | None = None,
    stdin: Path | None = None,
) -> None:
    """Run one build command, appending its output to ``log``; raise naming the step.

    The command runs in its own process group, which is killed whole when the
    build is interrupted (KeyboardInterrupt, SIGTERM turned into an exception,
    the run's cancel event), so no debootstrap keeps writing into a staging
    directory that is being removed. It also dies with its thread (PDEATHSIG:
    the thread waits here for as long as the command runs), so a SIGKILLed
    harness does not leave it running either.
    """
    exe = _which(argv[0]) or argv[0]
    cancel: threading.Event | None = getattr(_build_ctx, "cancel", None)
    with log.open("ab") as fh, open(stdin or os.devnull, "rb") as inp:
        fh.write(f"\n$ {' '.join(argv)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(
            [exe, *argv[1:]],
            stdin=inp,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        try:
            while True:
                try:
                    proc.wait(0.2)
                    break
                except subprocess.TimeoutExpired:
                    if cancel is not None and cancel.is_set():
                        raise ImageBuildError(
                            f"{step} stopped: the run is being torn down"
                        ) from None
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise ImageBuildError(
            f"{step} failed (exit {proc.returncode}): {fix}\nlast lines of {log}:\n{tail}"
        )


def _build(recipe: LinuxRecipe, digest: str, stage: Path, debs: Path, say: Progress) -> LinuxImage:
    t0 = time.monotonic()
    make_private_dir(stage)  # the root file system and its keys are written here
    log = stage / "build.log"
    rootfs = stage / "rootfs"

    say("compiling guest tools")
    tools_dir = stage / "tools"
    tools_dir.mkdir()
    for name, src in GUEST_TOOL_SOURCES.items():
        _run(
            f"compiling {src.name}",
            ["gcc", "-O2", "-static", "-Wall", "-o", str(tools_dir / name), str(src)],
            log,
            f"fix the compile error in {src}, or install static libc: apt-get install libc6-dev",
        )

    debootstrap(recipe.suite, recipe.packages, rootfs, debs, log, say, RECIPE_FILE)

    say("configuring root file system")
    kernel_release = _configure_rootfs(rootfs, tools_dir, stage, log)
    packages = _package_versions(rootfs)

    say("writing kernel and initramfs")
    kernel = stage / "vmlinuz"
    shutil.copyfile(rootfs / "boot" / f"vmlinuz-{kernel_release}", kernel)
    kernel.chmod(0o644)
    initrd = stage / "initrd.cpio"
    _write_initramfs(rootfs, kernel_release, recipe.initramfs_modules, initrd)
    initrd.chmod(0o644)

    say(f"making ext4 ({recipe.disk_gib} GiB sparse) and qcow2 base image")
    raw = stage / "root.ext4"
    # The root file system holds the guest's SSH host private key: root only.
    with open(os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE), "wb") as fh:
        fh.truncate(recipe.disk_gib << 30)
    _run(
        "mkfs.ext4",
        [
            "mkfs.ext4", "-q", "-F", "-L", "harness-root",
            # Initialise inode tables and journal now: otherwise the guest's
            # ext4lazyinit thread writes them in the background during benchmarks.
            "-E", "lazy_itable_init=0,lazy_journal_init=0",
            "-d", str(rootfs), str(raw),
        ],
        log,
        f"raise 'disk_gib' in {RECIPE_FILE} if the root file system does not fit",
    )  # fmt: skip
    disk = stage / "disk.qcow2"
    _run(
        "qemu-img convert",
        ["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)],
        log,
        f"check free space in {stage.parent}",
    )
    disk.chmod(PRIVATE_FILE_MODE)  # the guest's SSH host private key is inside
    raw.unlink()
    shutil.rmtree(rootfs)
    shutil.rmtree(tools_dir)

    host_pub = (stage / "ssh_host_ed25519_key.pub").read_text().split()
    image = LinuxImage(
        name=IMAGE_NAME,
        digest=digest,
        directory=stage,
        disk=disk,
        kernel=kernel,
        initrd=initrd,
        cmdline=recipe.cmdline,
        ssh_user="root",
        ssh_private_key=stage / "id_ed25519",
        host_key=f"{host_pub[0]} {host_pub[1]}",
        guest_tools=dict(GUEST_TOOLS),
        kernel_release=kernel_release,
        packages=packages,
    )
    image.write_manifest()
    log.chmod(0o644)
    say(f"built in {time.monotonic() - t0:.0f} s")
    return image


def debootstrap(
    suite: str,
    packages: list[str],
    rootfs: Path,
    debs: Path,
    log: Path,
    say: Progress,
    recipe_file: Path,
) -> None:
    """``debootstrap --variant=minbase --include=PACKAGES`` from the mirror apt on the host
    uses, downloads kept in ``debs``; a failure names ``recipe_file``'s field 'packages'."""
    mirror = debian_mirror(suite)
    debs.mkdir(parents=True, exist_ok=True)
    say(f"debootstrap {suite} from {mirror} (about a minute)")
    _run(
        "debootstrap",
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(packages)}",
            f"--cache-dir={debs}",
            suite,
            str(rootfs),
            mirror,
        ],
        log,
        f"check that {mirror} is reachable and that every package in "
        f"{recipe_file} field 'packages' exists in {suite}",
    )


def _configure_rootfs(rootfs: Path, tools_dir: Path, stage: Path, log: Path) -> str:
    """Install tools, init, sshd config and keys; return the kernel release."""
    for tool in tools_dir.iterdir():
        _install(tool, rootfs / "usr/local/bin" / tool.name, 0o755)
    _install(RECIPE_DIR / "harness-init", rootfs / "sbin/harness-init", 0o755)
    _install(RECIPE_DIR / "inittab", rootfs / "etc/inittab", 0o644)
    _install(RECIPE_DIR / "sshd_config", rootfs / "etc/ssh/sshd_config", 0o644)
    (rootfs / "etc/hostname").write_text("harness-guest\n")
    (rootfs / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tharness-guest\n")
    # Without systemd there is no poweroff/reboot; busybox's signal busybox init.
    for cmd in ("poweroff", "reboot", "halt"):
        link = rootfs / "sbin" / cmd
        if not link.exists() and not link.is_symlink():
            link.symlink_to("/bin/busybox")

    # One ed25519 host key, generated here so the harness can pin it.
    for old in (rootfs / "etc/ssh").glob("ssh_host_*"):
        old.unlink()
    host_key = rootfs / "etc/ssh/ssh_host_ed25519_key"
    _keygen(host_key, "root@harness-guest", log)
    shutil.copyfile(host_key.with_suffix(".pub"), stage / "ssh_host_ed25519_key.pub")

    client_key = stage / "id_ed25519"
    _keygen(client_key, "kvm-harness", log)
    ssh_dir = rootfs / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    _install(client_key.with_suffix(".pub"), ssh_dir / "authorized_keys", 0o600)
    client_key.chmod(0o600)
    client_key.with_suffix(".pub").chmod(0o644)

    # Debian's own initramfs is never used; apt's lists are dead weight.
    for f in (rootfs / "boot").glob("initrd.img-*"):
        f.unlink()
    for d in (rootfs / "var/lib/apt/lists", rootfs / "var/cache/apt/archives"):
        for f in d.glob("*"):
            if f.is_file():
                f.unlink()

    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageBuildError(
            f"expected exactly one kernel in {rootfs / 'boot'}, found {len(kernels)}: "
            f"check the linux-image package in {RECIPE_FILE} field 'packages'"
        )
    return kernels[0].name.removeprefix("vmlinuz-")


def _install(src: Path, dst: Path, mode: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    dst.chmod(mode)


def _keygen(path: Path, comment: str, log: Path) -> None:
    _run(
        f"ssh-keygen for {path.name}",
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        log,
        "apt-get install openssh-client",
    )


def _package_versions(
    rootfs: Path, recorded: Iterable[str] = _RECORDED_PACKAGES
) -> dict[str, str]:
    """Versions of the ``recorded`` packages, read from the rootfs' dpkg status."""
    wanted = set(recorded)
    versions: dict[str, str] = {}
    status = rootfs / "var/lib/dpkg/status"
    for block in status.read_text(errors="replace").split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if ": " in line and line[0] != " "
        )
        if fields.get("Package") in wanted and "Version" in fields:
            versions[fields["Package"]] = fields["Version"]
    return versions


# --------------------------------------------------------------------------- apt mirror


def debian_mirror(suite: str, apt_dir: Path = Path("/etc/apt")) -> str:
    """Return the mirror URI apt on this host uses for ``suite``.

    ``HARNESS_DEBIAN_MIRROR`` overrides it. Reads sources.list (one-line
    format) and sources.list.d/*.list / *.sources (deb822).
    """
    override = os.environ.get("HARNESS_DEBIAN_MIRROR")
    if override:
        return override
    files = [apt_dir / "sources.list"]
    files += sorted((apt_dir / "sources.list.d").glob("*.list"))
    files += sorted((apt_dir / "sources.list.d").glob("*.sources"))
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        parse = _deb822_uris if f.suffix == ".sources" else _one_line_uris
        for uri in parse(text, suite):
            return uri.rstrip("/")
    raise ImageBuildError(
        f"no apt source for suite {suite!r} in {apt_dir}/sources.list or sources.list.d: "
        "add one, or set HARNESS_DEBIAN_MIRROR to a Debian mirror URL"
    )


def _one_line_uris(text: str, suite: str) -> Iterable[str]:
    for line in text.splitlines():
        # "deb [opts] URI SUITE COMPONENTS..."
        words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
            yield words[1]


def _deb822_uris(text: str, suite: str) -> Iterable[str]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split():
            yield from fields.get("uris", "").split()


# --------------------------------------------------------------------------- initramfs


def resolve_modules(module_dir: Path, names: Iterable[str]) -> list[str]:
    """Return .ko paths (relative to ``module_dir``) to insmod, dependencies first.

    Modules built into the kernel (modules.builtin) are skipped.
    """

    def norm(name: str) -> str:
        return name.replace("-", "_")

    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (module_dir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[path] = rest.split()
        by_name[norm(Path(path).name.split(".ko")[0])] = path
    builtin = {
        norm(Path(line).name.split(".ko")[0])
        for line in (module_dir / "modules.builtin").read_text().splitlines()
    }
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in names:
        key = norm(name)
        if key in builtin:
            continue
        if key not in by_name:
            raise ImageBuildError(
                f"kernel module {name!r} not found in {module_dir}/modules.dep: fix "
                f"{RECIPE_FILE} field 'initramfs_modules'"
            )
        visit(by_name[key])
    return order


def _write_initramfs(rootfs: Path, release: str, modules: list[str], out: Path) -> None:
    """Write an uncompressed newc cpio: static busybox, the modules, our /init.

    Uncompressed because it is small (about 3 MB) and unpacking costs nothing,
    while decompression is slow under TCG. Written in Python: no cpio needed.
    """
    busybox = rootfs / "bin/busybox"
    if not busybox.is_file():
        raise ImageBuildError(
            f"{busybox} missing: keep 'busybox-static' in {RECIPE_FILE} field 'packages'"
        )
    module_dir = rootfs / "lib/modules" / release
    kos = resolve_modules(module_dir, modules)
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("bin/sh", b"", 0o777, symlink_to="busybox")
    cpio.file("init", (RECIPE_DIR / "initramfs-init").read_bytes(), 0o755)
    cpio.file("load-modules", "".join(f"{k}\n" for k in kos).encode(), 0o644)
    made = {"lib/modules"}
    for ko in kos:
        parent = Path("lib/modules", ko).parent
        for p in reversed([parent, *parent.parents]):
            if p.as_posix() not in made and p.as_posix() != ".":
                cpio.directory(p.as_posix())
                made.add(p.as_posix())
        cpio.file(f"lib/modules/{ko}", (module_dir / ko).read_bytes(), 0o644)
    out.write_bytes(cpio.finish())


class _Cpio:
    """Minimal writer for the "newc" cpio format the kernel unpacks."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes, rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [
            self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
            0, 0, rdev[0], rdev[1], len(name) + 1, 0,
        ]  # fmt: skip
        self._ino += 1
        self._buf += b"070701" + "".join(f"{v:08x}" for v in fields).encode()
        self._buf += name.encode() + b"\0"
        self._pad()
        self._buf += data
        self._pad()

    def _pad(self) -> None:
        self._buf += b"\0" * (-len(self._buf) % 4)

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, b"")

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, b"", (major, minor))

    def file(self, name: str, data: bytes, mode: int, symlink_to: str | None = None) -> None:
        if symlink_to is not None:
            self._entry(name, stat.S_IFLNK | 0o777, symlink_to.encode())
        else:
            self._entry(name, stat.S_IFREG | mode, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return bytes(self._buf)
