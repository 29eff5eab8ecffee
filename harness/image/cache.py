"""Digest-keyed cache of built guest images.

Each image lives in ``<cache>/images/<name>-<digest12>/``. A build writes into a
temporary sibling directory and renames it into place only when complete, so a
killed build never leaves a directory that looks finished; a per-entry lock file
keeps two processes from building the same entry at once. Everything is made
world-traversable because libvirt runs QEMU as ``libvirt-qemu``.

The directory name says which recipe an entry was built from, not that its
bytes are still what the build wrote: every entry holds ``SHA256SUMS`` (the
sha256 of each of its files, written just before the rename into place), and
:func:`lookup` serves an entry only when every file still matches. A flipped
byte in the base disk or the manifest, a truncated or missing file, or a
missing ``SHA256SUMS`` make the entry a miss, so it is rebuilt and never
booted. Hashing the ~390 MB base disk costs about 0.25 s per lookup here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from harness import paths
from harness.host.process import pid_alive, users_of
from harness.host.prune import Prunable, tree_size, user_of

#: Directories the QEMU user must be able to traverse and read.
DIR_MODE = 0o755
#: Number of digest hex digits in a cache directory name.
SHORT_DIGEST = 12

_STAGING_MARK = ".staging-"
#: In every entry: "<sha256 hex>  <relative path>" per file, written at build time.
SUMS_FILE = "SHA256SUMS"


def recipe_digest(files: Iterable[Path], extra: str, *, base: Path | None = None) -> str:
    """Return the sha256 (hex) over every recipe file's relative path and content.

    Files are sorted by their path relative to ``base`` (default: the project
    root) so the digest does not depend on listing order; ``extra`` folds in
    anything that is not a file (a format version, a suite name).
    """
    root = (base or paths.PROJECT_ROOT).resolve()
    entries: list[tuple[str, Path]] = []
    for f in files:
        resolved = f.resolve()
        try:
            rel = resolved.relative_to(root).as_posix()
        except ValueError:
            rel = resolved.as_posix()
        entries.append((rel, resolved))
    h = hashlib.sha256()
    for rel, path in sorted(entries):
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise FileNotFoundError(
                f"recipe file {path} cannot be read ({exc.strerror}): restore it from git"
            ) from exc
        # Length prefixes keep (path, content) boundaries unambiguous.
        h.update(f"{len(rel)}:{rel}\0{len(content)}:".encode())
        h.update(content)
    h.update(f"extra:{extra}".encode())
    return h.hexdigest()


def images_root(cache: Path | None = None) -> Path:
    """Return ``<cache>/images`` (created, mode 0755)."""
    root = (cache if cache is not None else paths.cache_dir()) / "images"
    root.mkdir(parents=True, exist_ok=True)
    _make_traversable(root)
    # QEMU must traverse the cache root too; best effort if someone else owns it.
    with contextlib.suppress(PermissionError):
        _make_traversable(root.parent)
    return root


def entry_dir(name: str, digest: str, cache: Path | None = None) -> Path:
    """Return the directory a complete build of ``name`` at ``digest`` lives in."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"image name {name!r} is invalid: use a plain word such as 'linux'")
    if len(digest) < SHORT_DIGEST:
        raise ValueError(f"digest {digest!r} is too short: pass the full sha256 hex digest")
    return images_root(cache) / f"{name}-{digest[:SHORT_DIGEST]}"


def lookup(
    name: str,
    digest: str,
    cache: Path | None = None,
    *,
    rejected: Callable[[str], None] | None = None,
) -> Path | None:
    """Return the complete entry directory if it exists and its files verify, else None.

    An entry whose content no longer matches its ``SHA256SUMS`` is a miss;
    ``rejected`` is told why (the next build replaces it).
    """
    d = entry_dir(name, digest, cache)
    if not d.is_dir():
        return None
    problem = verify_entry(d)
    if problem is not None:
        if rejected is not None:
            rejected(f"cached image {d} failed verification: {problem}; rebuilding it")
        return None
    return d


def _file_sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_sums(directory: Path) -> None:
    """Write ``directory/SHA256SUMS`` over every regular file below it (sorted, relative)."""
    lines = [
        f"{_file_sha256(f)}  {f.relative_to(directory).as_posix()}\n"
        for f in sorted(directory.rglob("*"))
        if f.is_file() and not f.is_symlink() and f.relative_to(directory).as_posix() != SUMS_FILE
    ]
    sums = directory / SUMS_FILE
    sums.write_text("".join(lines))
    sums.chmod(0o644)


def verify_entry(directory: Path) -> str | None:
    """Why ``directory``'s files do not match its ``SHA256SUMS``; None when they all do."""
    try:
        text = (directory / SUMS_FILE).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return f"{SUMS_FILE} unreadable ({exc})"
    entries = [line.split("  ", 1) for line in text.splitlines()]
    if not entries or any(len(e) != 2 or len(e[0]) != 64 for e in entries):
        return f"{SUMS_FILE} is malformed"
    for want, rel in entries:
        path = directory / rel
        try:
            got = _file_sha256(path)
        except OSError as exc:
            return f"{rel} unreadable ({exc.strerror})"
        if got != want:
            return f"{rel} has sha256 {got[:12]}..., {SUMS_FILE} says {want[:12]}..."
    return None


def recorded_sha256(directory: Path, rel: str) -> str | None:
    """The sha256 ``SHA256SUMS`` records for ``rel`` in an entry (checked by :func:`lookup`),
    or None when it lists no such file: a digest for the result without hashing again."""
    try:
        text = (directory / SUMS_FILE).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():
        digest, sep, name = line.partition("  ")
        if sep and name == rel and len(digest) == 64:
            return digest
    return None


@contextlib.contextmanager
def entry_lock(name: str, digest: str, cache: Path | None = None) -> Iterator[None]:
    """Hold an exclusive lock on one cache entry (blocks while another build runs)."""
    final = entry_dir(name, digest, cache)
    lock_path = final.parent / f".{final.name}.lock"
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def staging(name: str, digest: str, cache: Path | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory; on success rename it to the entry.

    The caller should hold :func:`entry_lock`. On an exception the temporary
    directory is removed and the old entry (if any) is untouched. A complete
    entry that already exists is replaced (a forced rebuild): the old one is
    first renamed aside, so readers see either the old or the new directory.
    """
    final = entry_dir(name, digest, cache)
    _remove_stale_staging(final)
    tmp = final.parent / f".{final.name}{_STAGING_MARK}{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(mode=DIR_MODE)
    _make_traversable(tmp)
    try:
        yield tmp
        write_sums(tmp)
        _make_traversable(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        _remove_tree(tmp)
        raise


def _remove_stale_staging(final: Path) -> None:
    """Delete staging directories left by builds whose process is gone (killed)."""
    for d in final.parent.glob(f".{final.name}{_STAGING_MARK}*"):
        if _dead_owner(d, _STAGING_MARK) is not None:
            _remove_tree(d)
    for d in final.parent.glob(f".{final.name}.old-*"):
        _remove_tree(d)


def _dead_owner(d: Path, mark: str) -> int | None:
    """The pid after ``mark`` in ``d``'s name (``.<entry><mark><pid>``) if that process is gone."""
    if mark not in d.name:
        return None
    pid_text = d.name.rsplit(mark, 1)[1]
    return int(pid_text) if pid_text.isdigit() and not pid_alive(int(pid_text)) else None


def _remove_tree(path: Path) -> None:
    """rmtree that first detaches mounts below ``path``.

    A build killed inside debootstrap leaves proc/sys mounted in the rootfs;
    rmtree must never descend into those.
    """
    base = str(path.resolve())
    try:
        with open("/proc/self/mounts") as fh:
            points = [line.split()[1].replace("\\040", " ") for line in fh]
    except OSError:
        points = []
    for mnt in sorted((m for m in points if m.startswith(base + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def _make_traversable(path: Path) -> None:
    """Add r-x for everyone on a directory (we may be running under a umask of 077)."""
    mode = path.stat().st_mode & 0o7777
    if mode & 0o555 != 0o555:
        path.chmod(mode | 0o555)


def prunable(current: Mapping[str, str], cache: Path | None = None) -> list[Prunable]:
    """Image entries no current recipe builds, and what dead builds left.

    ``current`` maps an image name to its current recipe digest. An entry of a
    name not in ``current`` is left alone (another harness version may own
    it); staging directories count once their builder is dead. Entries a live
    process uses (QEMU's base disk of a running VM) are listed as kept.
    """
    root = images_root(cache)
    users = users_of(root)
    out: list[Prunable] = []
    for d in sorted(root.iterdir()):
        if not d.is_dir():
            continue
        why = _why_prunable(d, current)
        if why is None:
            continue
        out.append(Prunable(d, tree_size(d), why, user_of(d, users)))
    return out


def _why_prunable(d: Path, current: Mapping[str, str]) -> str | None:
    if d.name.startswith("."):
        if (pid := _dead_owner(d, _STAGING_MARK)) is not None:
            return f"staging directory of a build that died (pid {pid})"
        if (pid := _dead_owner(d, ".old-")) is not None:
            return f"a replaced entry left by a forced rebuild that died (pid {pid})"
        return None
    name, _, short = d.name.rpartition("-")
    digest = current.get(name)
    if digest is None or short == digest[:SHORT_DIGEST]:
        return None
    now = digest[:SHORT_DIGEST]
    return f"built from another recipe of {name} ({short}; the current one is {now})"


def remove(entry: Prunable) -> None:
    """Delete a prunable directory (mounts below it detached first: a killed debootstrap)."""
    _remove_tree(entry.path)
