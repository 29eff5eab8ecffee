"""The harness's own guest programs in any Linux guest: built once, copied in, checked by digest.

The default image has them built in (harness/image/linux.py). A guest the
harness did not build (a cloud image) gets them at boot: the same static
builds from ``workloads/guest-tools/``, compiled once per source digest into
the image cache (``guest-tools-<digest>``), copied over SFTP into
:data:`GUEST_BIN` and checked there by sha256. That directory comes first on
the ``PATH`` of every command the harness runs in such a guest, so a phase
runs the harness's build of ``page-touch`` even where the guest has another
program of that name.

A workload says which programs it runs (``needs``). Those that are not the
harness's own (stress-ng, redis-server ...) come from the guest's packages:
:func:`missing_programs` finds the ones a guest lacks.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from harness.guest.base import Guest, GuestError
from harness.image import cache as image_cache
from harness.image.linux import GUEST_TOOL_SOURCES, ImageBuildError, _run

IMAGE_NAME = "guest-tools"
#: Where the harness's programs go in a guest it did not build.
GUEST_BIN = "/var/lib/kvm-harness/bin"
#: The PATH every command in such a guest runs with: the harness's programs first.
GUEST_PATH = f"{GUEST_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The phase marker every phase command calls (harness/guest/ssh.py's phase_command).
MARKER = f"{GUEST_BIN}/kvm-marker"
#: Bump when the build below changes what it makes.
BUILD_FORMAT = 1


@dataclass(frozen=True)
class GuestTools:
    """The built programs: name -> static binary, and name -> its sha256."""

    files: dict[str, Path]
    sha256: dict[str, str]


def tools_digest() -> str:
    """The digest the build is cached under: the sources, the compiler, this module's format."""
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=False)
    compiler = gcc.stdout.splitlines()[0] if gcc.stdout else "no gcc"
    return image_cache.recipe_digest(
        GUEST_TOOL_SOURCES.values(), extra=f"guest-tools={BUILD_FORMAT};{compiler}"
    )


def build_guest_tools(cache: Path | None = None) -> GuestTools:
    """The static guest programs, compiled on first use (a few seconds) and cached."""
    digest = tools_digest()
    directory = image_cache.lookup(IMAGE_NAME, digest, cache)
    if directory is None:
        if shutil.which("gcc") is None:
            raise ImageBuildError("gcc not found: apt-get install gcc libc6-dev")
        with image_cache.entry_lock(IMAGE_NAME, digest, cache):
            directory = image_cache.lookup(IMAGE_NAME, digest, cache)
            if directory is None:
                with image_cache.staging(IMAGE_NAME, digest, cache) as stage:
                    log = stage / "build.log"
                    for name, source in GUEST_TOOL_SOURCES.items():
                        argv = ["gcc", "-O2", "-static", "-Wall", "-o", str(stage / name)]
                        _run(f"compiling {source.name}", [*argv, str(source)], log,
                             f"fix {source}, or install static libc: apt-get install libc6-dev")
                directory = image_cache.entry_dir(IMAGE_NAME, digest, cache)
    files = {name: directory / name for name in GUEST_TOOL_SOURCES}
    sums = {
        name: image_cache.recorded_sha256(directory, name) or _sha256(path)
        for name, path in files.items()
    }
    return GuestTools(files, sums)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def harness_programs(needs: Iterable[str]) -> list[str]:
    """Of ``needs``, the harness's own programs, and the marker every phase calls."""
    return sorted({"kvm-marker", *(n for n in needs if n in GUEST_TOOL_SOURCES)})


def install(guest: Guest, tools: GuestTools, names: Iterable[str]) -> list[str]:
    """Copy ``names`` into :data:`GUEST_BIN` where they are not there with the right digest.

    Commands run as root (the caller's transport sees to it); the copy itself
    goes over SFTP as the login user into /tmp, then ``install`` moves it.
    Returns the names copied; GuestError if a copy does not check out.
    """
    names = sorted(names)
    have = _guest_sha256(guest, [f"{GUEST_BIN}/{n}" for n in names])
    copied = []
    for name in names:
        if have.get(f"{GUEST_BIN}/{name}") == tools.sha256[name]:
            continue
        tmp = f"/tmp/.kvm-harness-{name}-{tools.sha256[name][:12]}"
        guest.put(tools.files[name], tmp)
        out = guest.run(
            f"mkdir -p {GUEST_BIN} && install -m 0755 {shlex.quote(tmp)} {GUEST_BIN}/{name}; "
            f"rc=$?; rm -f {shlex.quote(tmp)}; exit $rc",
            timeout_s=60,
        )
        if out.exit_status != 0:
            raise GuestError(f"cannot install {name} in {GUEST_BIN}: {out.stderr.strip()[-300:]}")
        copied.append(name)
    if copied:
        got = _guest_sha256(guest, [f"{GUEST_BIN}/{n}" for n in copied])
        bad = [n for n in copied if got.get(f"{GUEST_BIN}/{n}") != tools.sha256[n]]
        if bad:
            raise GuestError(
                f"{', '.join(bad)} in the guest's {GUEST_BIN} do not have the sha256 of the "
                "harness's build after the copy (a full disk in the guest?)"
            )
    return copied


def _guest_sha256(guest: Guest, paths: list[str]) -> dict[str, str]:
    """path -> sha256 in the guest, for those of ``paths`` that exist."""
    quoted = " ".join(shlex.quote(p) for p in paths)
    out = guest.run(f"sha256sum {quoted} 2>/dev/null; true", timeout_s=60)
    found: dict[str, str] = {}
    for line in out.stdout.splitlines():
        digest, _, path = line.partition("  ")
        if len(digest) == 64 and path:
            found[path] = digest
    return found


def missing_programs(guest: Guest, names: Iterable[str]) -> list[str]:
    """Of ``names``, the programs the guest has nowhere on the harness's command PATH."""
    names = sorted(set(names))
    if not names:
        return []
    script = "; ".join(
        f"command -v {shlex.quote(n)} >/dev/null 2>&1 || echo {shlex.quote(n)}" for n in names
    )
    out = guest.run(script, timeout_s=60)
    if out.exit_status != 0:
        raise GuestError(f"cannot look for {', '.join(names)} in the guest: {out.stderr[-300:]}")
    return [n for n in out.stdout.split() if n in names]
