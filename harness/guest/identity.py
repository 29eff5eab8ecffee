"""Who the guest says it is: OS release, kernel release and version, kernel command line.

Asked once per boot, after readiness, through the ``Guest`` protocol (one
command, a few hundred bytes of output). The guest is untrusted (docs/SECURITY.md):
its output is read through the transport's bounded reader, each value is cut
to a fixed length, checked against what the field may hold (an os-release
``ID`` is ``[a-z0-9._-]``, a kernel release has no spaces ...) and stored with
every control character escaped (``harness/textsafe.py``). A value that fails
its check is recorded as None, with the reason in ``GuestIdentity.problems``;
nothing the guest prints makes reading its identity fail a run.
"""

from __future__ import annotations

import re
import shlex

from pydantic import BaseModel, ConfigDict, Field

from harness.guest.base import Guest, GuestError
from harness.textsafe import printable

#: How long the guest gets to answer (a TCG guest answers in well under a second).
TIMEOUT_S = 30.0
#: Separator lines between the parts of the answer; the guest may forge them, which
#: only garbles its own identity (checked like any other value).
_SEP = "--kvm-harness-identity-{}--"
_PARTS = ("os", "release", "version", "cmdline")
#: One POSIX shell command: os-release (the /usr/lib fallback the spec allows),
#: uname -r, uname -v, /proc/cmdline; each part capped before it leaves the guest.
COMMAND = "; ".join(
    [
        f"echo {_SEP.format('os')}",
        "(cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release 2>/dev/null) | head -c 8192",
        f"echo; echo {_SEP.format('release')}",
        "uname -r | head -c 256",
        f"echo; echo {_SEP.format('version')}",
        "uname -v | head -c 256",
        f"echo; echo {_SEP.format('cmdline')}",
        "head -c 8192 /proc/cmdline",
        "echo",
    ]
)

#: Longest value kept per field (uname fields hold 64 bytes; x86's command line 2048).
MAX_LEN = {"os_pretty_name": 128, "os_id": 64, "os_version_id": 64, "kernel_release": 64,
           "kernel_version": 128, "kernel_cmdline": 4096}
#: os-release(5): ID and VERSION_ID are lower-case a-z, 0-9, ".", "_", "-" (and "~").
_OS_TOKEN = re.compile(r"[a-z0-9._~-]+")
#: A kernel release: what `make kernelrelease` gives (letters, digits, . + - _ ~).
_KERNEL_RELEASE = re.compile(r"[A-Za-z0-9._+~-]+")


class GuestIdentity(BaseModel):
    """What the booted guest says it is (read once per boot, after readiness), plus what
    the platform knows of what it booted (kernel file digest, package, disk digest).

    Guest-reported values are untrusted: ``harness/guest/identity.py`` bounds and
    validates each one; a value that fails is None, with the reason in ``problems``.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # as every result model

    os_id: str | None = Field(default=None, description="/etc/os-release ID (e.g. debian)")
    os_version_id: str | None = Field(default=None, description="/etc/os-release VERSION_ID")
    os_pretty_name: str | None = Field(default=None, description="/etc/os-release PRETTY_NAME")
    kernel_release: str | None = Field(default=None, description="uname -r in the guest")
    kernel_version: str | None = Field(default=None, description="uname -v in the guest")
    kernel_cmdline: str | None = Field(default=None, description="/proc/cmdline in the guest")
    kernel_sha256: str | None = Field(
        default=None, description="digest of the kernel file the host booted (direct boot)"
    )
    kernel_package: str | None = Field(
        default=None, description="the Debian package the booted kernel came from"
    )
    kernel_package_version: str | None = None
    disk_sha256: str | None = Field(
        default=None, description="digest of the disk image the guest booted from"
    )
    problems: list[str] = Field(
        default_factory=list,
        description="values the guest gave that were refused or could not be read, in words",
    )

    def kernel_label(self) -> str:
        """The guest kernel in one line: release and package version, or file digest."""
        release = self.kernel_release or "(unknown release)"
        if self.kernel_package and self.kernel_package_version:
            return f"{release} ({self.kernel_package} {self.kernel_package_version})"
        if self.kernel_sha256:
            return f"{release} (sha256 {self.kernel_sha256[:12]})"
        return release

    def os_label(self) -> str:
        """The guest OS in one line (PRETTY_NAME, else ID VERSION_ID)."""
        if self.os_pretty_name:
            return self.os_pretty_name
        return " ".join(v for v in (self.os_id, self.os_version_id) if v) or "(unknown)"


def read_identity(guest: Guest) -> GuestIdentity:
    """Ask ``guest`` who it is. Never raises for what the guest says; GuestError only when
    the transport fails (the caller decides whether that matters)."""
    out = guest.run(COMMAND, timeout_s=TIMEOUT_S)
    identity = parse_identity(out.stdout)
    if out.exit_status != 0:
        identity.problems.append(f"the identity command exited {out.exit_status}")
    return identity


def try_read_identity(guest: Guest) -> GuestIdentity:
    """:func:`read_identity`, with a transport failure recorded as a problem instead."""
    try:
        return read_identity(guest)
    except GuestError as exc:
        return GuestIdentity(problems=[f"could not ask the guest: {printable(str(exc))[:300]}"])


def parse_identity(stdout: str) -> GuestIdentity:
    """The identity in the answer to :data:`COMMAND`, every value checked."""
    parts = _split(stdout)
    problems: list[str] = []
    os_release = parse_os_release(parts.get("os", ""))
    values: dict[str, str | None] = {
        "os_id": os_release.get("ID"),
        "os_version_id": os_release.get("VERSION_ID"),
        "os_pretty_name": os_release.get("PRETTY_NAME"),
        "kernel_release": _one_line(parts.get("release")),
        "kernel_version": _one_line(parts.get("version")),
        "kernel_cmdline": _one_line(parts.get("cmdline")),
    }
    checked: dict[str, str | None] = {}
    for name, value in values.items():
        checked[name], problem = check_value(name, value)
        if problem is not None:
            problems.append(problem)
    return GuestIdentity(**checked, problems=problems)


def check_value(name: str, value: str | None) -> tuple[str | None, str | None]:
    """``value`` of field ``name`` if it may be kept (escaped), else (None, why)."""
    if value is None or value == "":
        if name in ("os_version_id", "os_pretty_name"):
            return None, None  # optional in os-release (Debian testing has no VERSION_ID)
        return None, f"{name}: the guest gave none"
    limit = MAX_LEN[name]
    if len(value) > limit:
        return None, f"{name}: {len(value)} characters, more than the {limit} kept"
    pattern = {"os_id": _OS_TOKEN, "os_version_id": _OS_TOKEN,
               "kernel_release": _KERNEL_RELEASE}.get(name)
    if pattern is not None and not pattern.fullmatch(value):
        return None, f"{name}: {printable(value)[:80]!r} is not a valid value"
    return printable(value), None


def parse_os_release(text: str) -> dict[str, str]:
    """``KEY=value`` lines of an os-release file (shell quoting undone), unknown keys kept."""
    out: dict[str, str] = {}
    for line in text.splitlines()[:200]:
        key, sep, raw = line.strip().partition("=")
        if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", key):
            continue
        try:
            words = shlex.split(raw, posix=True)
        except ValueError:
            continue  # unbalanced quotes: not a value
        out[key] = " ".join(words)
    return out


def _split(stdout: str) -> dict[str, str]:
    """The answer's parts by separator line (the first occurrence of each wins)."""
    parts: dict[str, str] = {}
    current: str | None = None
    lines: list[str] = []
    seps = {_SEP.format(p): p for p in _PARTS}
    for line in stdout.splitlines():
        if line.strip() in seps:
            if current is not None and current not in parts:
                parts[current] = "\n".join(lines)
            current, lines = seps[line.strip()], []
        elif current is not None:
            lines.append(line)
    if current is not None and current not in parts:
        parts[current] = "\n".join(lines)
    return parts


def _one_line(text: str | None) -> str | None:
    """The part's text as one line; a part that is several non-empty lines stays as it is
    (escaped newlines then show that the guest printed more than one value)."""
    if text is None:
        return None
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(line.strip() for line in lines) if lines else ""
