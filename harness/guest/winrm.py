"""Windows guests over WinRM (WS-Management over HTTPS), with the listener's certificate pinned.

The library is pypsrp (its ``WSMan`` and ``WinRS`` primitives), not pywinrm:
pypsrp is released more recently, does NTLM, Kerberos and CredSSP through
pyspnego (with message encryption where TLS is absent), ships type hints, and
exposes each WS-Man operation (Create, Command, Receive, Signal, Delete) on its
own, so this module drives the Receive loop itself: bounded output, a deadline
asked on every iteration, and a clean end for a command past its time.

What a WinRM guest guarantees, as the SSH one does:

* the listener's certificate is pinned by its SHA-256 fingerprint (recorded in
  the image manifest when the image was built): any other certificate is
  refused before a credential is sent;
* a command's output is kept through :class:`BoundedOutput`, its deadline and
  abort check through :class:`CommandWatch` (harness/guest/output.py);
* a command past its timeout is ended in the guest: a WS-Man Signal
  ``terminate`` for the command (MS-WSMV 3.1.4.12), then the shell is deleted,
  and ``kill_phase`` ends a phase's whole process tree with ``taskkill /T``;
* transient transport failures (the listener not up yet, a connection reset
  while opening a shell) are retried with tenacity; a command's own failure,
  a refused credential and a wrong certificate never are;
* the password never appears in an exception, a log line or a result.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from pypsrp.exceptions import AuthenticationError, WinRMError, WSManFaultError
from pypsrp.shell import CommandState, WinRS
from pypsrp.wsman import WSMan
from requests.adapters import HTTPAdapter
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    stop_any,
    wait_exponential,
)
from tenacity.stop import stop_base

from harness.guest.base import AbortCheck, CommandResult, GuestError, GuestLost
from harness.guest.output import BoundedOutput, CommandWatch, dropped_note

log = logging.getLogger(__name__)

#: Where the image installs the marker tool and the phase runner beside it
#: (workloads/guest-tools/kvm-phase-win.c), from vm-images/windows/setup-winrm.ps1.
MARKER_TOOL = r"C:\kvm-harness\kvm-marker.exe"
PHASE_TOOL = r"C:\kvm-harness\kvm-phase.exe"

#: MS-WSMV 3.1.4.14: a Receive whose OperationTimeout expired with nothing to say
#: comes back as this WS-Man fault code (w:TimedOut): not an error, just no output yet.
OPERATION_TIMED_OUT = 2150858793

#: The terminate signal code as wsman.h spells it (WSMAN_SIGNAL_SHELL_CODE_TERMINATE);
#: pypsrp's SignalCode.TERMINATE capitalises "Terminate".
SIGNAL_TERMINATE = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/signal/terminate"

#: The longest one Receive may wait in the guest for output (whole seconds: the
#: OperationTimeout header is xs:duration and pypsrp takes an int).
RECEIVE_WAIT_S = 1

#: Bytes of a file per WinRS Send (base64 text): well under the default
#: MaxEnvelopeSizekb of 150 KiB that older Windows listeners accept.
SEND_CHUNK = 96 * 1024

#: PowerShell that writes stdin (base64 text) to the file named in $env:KVMH_PATH.
PUT_SCRIPT = (
    "$ErrorActionPreference='Stop';"
    "$b=[Convert]::FromBase64String([Console]::In.ReadToEnd());"
    "[IO.File]::WriteAllBytes($env:KVMH_PATH,$b)"
)
#: PowerShell that prints the file named in $env:KVMH_PATH as base64 text.
GET_SCRIPT = (
    "$ErrorActionPreference='Stop';"
    "[Console]::Out.Write([Convert]::ToBase64String([IO.File]::ReadAllBytes($env:KVMH_PATH)))"
)


class Secret:
    """A password that does not print: its repr and str are a placeholder."""

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The password itself, for the one place that sends it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(frozen=True)
class WinrmTarget:
    """Where and how to reach a guest's WinRM HTTPS listener.

    ``fingerprint`` is the SHA-256 of the listener's certificate (DER), hex,
    colons allowed: the image manifest's ``winrm_cert_sha256``.
    """

    host: str
    port: int
    username: str
    password: Secret = field(repr=False)
    fingerprint: str
    auth: str = "ntlm"  # the default for a local account; "kerberos" where configured

    def __post_init__(self) -> None:
        fp = self.fingerprint.replace(":", "").lower()
        if not re.fullmatch(r"[0-9a-f]{64}", fp):
            raise ValueError(
                "WinRM certificate fingerprint must be a SHA-256 in hex (64 digits), got "
                f"{self.fingerprint!r} (fix: take winrm_cert_sha256 from the image manifest)"
            )
        object.__setattr__(self, "fingerprint", fp)


class _PinnedAdapter(HTTPAdapter):
    """HTTPS that accepts exactly one certificate: the one whose SHA-256 is pinned.

    The listener's certificate is self-signed at image build time, so there is
    no CA to check; urllib3's ``assert_fingerprint`` compares the peer's DER
    certificate before any request (and so any credential) is sent.
    """

    def __init__(self, fingerprint: str) -> None:
        self._fingerprint = fingerprint
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["assert_fingerprint"] = self._fingerprint
        super().init_poolmanager(*args, **kwargs)


class CertificateMismatch(GuestError):
    """The listener's certificate is not the pinned one: refused, never retried."""


class CredentialsRefused(GuestError):
    """The guest refused the user name or password: never retried."""


def _is_cert_error(exc: BaseException) -> bool:
    return isinstance(exc, requests.exceptions.SSLError)


def _is_transient(exc: BaseException) -> bool:
    """Connection refused/reset or a timeout while connecting: the listener may come up."""
    if _is_cert_error(exc) or isinstance(exc, AuthenticationError):
        return False
    return isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError))


def _clean(exc: BaseException, target: WinrmTarget) -> str:
    """The error's text with the password taken out, whatever the library put in it."""
    text = f"{type(exc).__name__}: {exc}"
    secret = target.password.reveal()
    return text.replace(secret, "***") if secret else text


def _translate(exc: BaseException, target: WinrmTarget, doing: str) -> GuestError:
    """The harness's error for a library error, naming the endpoint and a fix."""
    where = f"WinRM https://{target.host}:{target.port}/wsman"
    if _is_cert_error(exc):
        return CertificateMismatch(
            f"{where}: the listener's certificate is not the pinned one "
            f"(sha256 {target.fingerprint}) while {doing} (fix: rebuild the image or update "
            "winrm_cert_sha256 in its manifest if the guest's certificate was replaced)"
        )
    if isinstance(exc, AuthenticationError):
        return CredentialsRefused(
            f"{where}: the guest refused the credentials of user {target.username!r} "
            f"({target.auth}) while {doing} (fix: set the password the image was built with)"
        )
    return GuestError(f"{where}: {doing} failed: {_clean(exc, target)}")


class WinrmGuest:
    """A Windows guest reached on a 127.0.0.1 port forward of 5986. Implements ``Guest``.

    One WinRS shell (``cmd``) per command: a timed-out command's shell is
    deleted with it, so nothing of it is left for the next phase.
    """

    def __init__(
        self,
        target: WinrmTarget,
        *,
        connect_timeout_s: float = 10.0,
        wsman_factory: Callable[[WinrmTarget, float], WSMan] | None = None,
    ) -> None:
        self.target = target
        self._connect_timeout_s = connect_timeout_s
        self._factory = wsman_factory or _pinned_wsman
        self._wsman: WSMan | None = None

    # -- connection ---------------------------------------------------------

    @classmethod
    def connect(cls, target: WinrmTarget, deadline_s: float) -> WinrmGuest:
        """A guest whose listener answered (an empty shell opened and closed) before
        ``deadline_s`` (time.monotonic()); transient failures are retried until then."""
        guest = cls(target)
        guest.reconnect(deadline_s)
        return guest

    def reconnect(self, deadline_s: float) -> None:
        """Drop the old connection and connect again, retrying transient failures
        until ``deadline_s``; a wrong certificate or credential fails at once."""
        self.close()

        def attempt() -> None:
            wsman = self._factory(self.target, self._connect_timeout_s)
            try:
                shell = WinRS(wsman)
                shell.open()
                shell.close()
            except BaseException:
                wsman.close()
                raise
            self._wsman = wsman

        try:
            self._retrying(deadline_s)(attempt)
        except RetryError as err:
            last = err.last_attempt.exception()
            raise GuestError(
                f"WinRM https://{self.target.host}:{self.target.port}/wsman did not answer "
                f"before the deadline: {_clean(last, self.target) if last else 'no attempt'} "
                "(fix: check the guest booted, its WinRM HTTPS listener and the 5986 forward)"
            ) from None
        except (WinRMError, requests.RequestException, OSError) as exc:
            raise _translate(exc, self.target, "connecting") from None

    def _retrying(self, deadline_s: float, attempts: int | None = None) -> Retrying:
        stop: stop_base = stop_after_delay(max(0.0, deadline_s - time.monotonic()))
        if attempts is not None:
            stop = stop_any(stop, stop_after_attempt(attempts))
        return Retrying(
            retry=retry_if_exception(_is_transient),
            stop=stop,
            wait=wait_exponential(multiplier=0.2, max=2.0),
        )

    def _conn(self) -> WSMan:
        if self._wsman is None:
            raise GuestError("WinRM guest is not connected (fix: connect() before run())")
        return self._wsman

    def close(self) -> None:
        """Drop the connection (the guest's shells were each deleted after their command)."""
        if self._wsman is not None:
            self._wsman.close()
            self._wsman = None

    # -- commands -------------------------------------------------------------

    def run(
        self, command: str, *, timeout_s: float, abort_if: AbortCheck | None = None
    ) -> CommandResult:
        """Run ``command`` in a cmd shell of the guest, with a deadline.

        Raises GuestTimeout past ``timeout_s`` (after ending the command in the
        guest), GuestLost if the connection drops mid-command, GuestGone when
        ``abort_if`` says the guest went away. A non-zero exit is data.
        """
        out, err = BoundedOutput(), BoundedOutput()
        watch = CommandWatch(command, timeout_s, abort_if)
        status = self._execute(command, watch, out.feed, err.feed, out, err)
        return CommandResult(
            status, out.text(), err.text(), watch.start_ns, time.monotonic_ns(),
            dropped_note(out, err),
        )

    def _execute(
        self,
        command: str,
        watch: CommandWatch,
        on_out: Callable[[bytes], None],
        on_err: Callable[[bytes], None],
        out: BoundedOutput,
        err: BoundedOutput,
        stdin: bytes | None = None,
    ) -> int:
        """Create a shell, run ``command``, receive until Done; always delete the shell."""
        wsman = self._conn()
        shell = WinRS(wsman)
        try:
            shell.open()
        except (WinRMError, requests.RequestException, OSError) as exc:
            raise _translate(exc, self.target, "opening a shell") from None
        command_id: str | None = None
        try:
            try:
                response = shell.command(command, None)
                command_id = _command_id(response)
                if stdin is not None:
                    self._send_all(shell, command_id, stdin)
            except (requests.ConnectionError, ConnectionError) as exc:
                raise GuestLost(
                    f"WinRM connection dropped while starting a command: {_clean(exc, self.target)}"
                ) from None
            except (WinRMError, requests.RequestException, OSError) as exc:
                raise _translate(exc, self.target, "starting a command") from None
            while True:
                watch.check(out, err)
                wait = max(1, min(RECEIVE_WAIT_S, int(watch.remaining_s()) or 1))
                try:
                    state, rc, buffers = _receive(shell, command_id, wait)
                except WSManFaultError as exc:
                    if exc.code == OPERATION_TIMED_OUT:
                        continue
                    raise _translate(exc, self.target, "receiving output") from None
                except requests.ReadTimeout:
                    # No answer within OperationTimeout + 2 s: ask again (a Receive may be
                    # repeated), the deadline checked first; never pypsrp's own backoff.
                    continue
                except (requests.ConnectionError, requests.Timeout, ConnectionError) as exc:
                    raise GuestLost(
                        "WinRM connection dropped while a command ran; its outcome is unknown: "
                        f"{_clean(exc, self.target)}"
                    ) from None
                except (WinRMError, requests.RequestException, OSError) as exc:
                    raise _translate(exc, self.target, "receiving output") from None
                if buffers.get("stdout"):
                    on_out(buffers["stdout"])
                if buffers.get("stderr"):
                    on_err(buffers["stderr"])
                if state == CommandState.DONE:
                    # MS-WSMV 3.1.4.14: a command is still signalled after its last
                    # Receive (terminate releases it); _end does that.
                    return rc if rc is not None else 0
        finally:
            self._end(shell, command_id)

    def _send_all(self, shell: WinRS, command_id: str, data: bytes) -> None:
        """``data`` to the command's stdin, base64 encoded, in envelopes that fit."""
        text = base64.b64encode(data)
        chunks = [text[i : i + SEND_CHUNK] for i in range(0, len(text), SEND_CHUNK)] or [b""]
        for n, chunk in enumerate(chunks):
            shell.send("stdin", chunk, command_id=command_id, end=n == len(chunks) - 1)

    def _end(self, shell: WinRS, command_id: str | None) -> None:
        """Signal terminate to a command still running, then delete its shell.

        Both are best effort with a short retry (the connection may be what
        failed); what cannot be ended here is ended by ``kill_phase``.
        """
        deadline = time.monotonic() + 5.0
        if command_id is not None:
            try:
                self._retrying(deadline, attempts=3)(
                    shell.signal, SIGNAL_TERMINATE, command_id
                )
            except Exception as exc:  # best effort, reported in the log
                log.warning("WinRM: could not signal terminate: %s", _clean(exc, self.target))
        try:
            self._retrying(deadline, attempts=3)(shell.close)
        except Exception as exc:  # best effort, reported in the log
            log.warning("WinRM: could not delete the shell: %s", _clean(exc, self.target))

    # -- phases ---------------------------------------------------------------

    def phase_command(self, command: str, token: int, phase: int) -> str:
        """``command`` run by ``kvm-phase.exe``: marker, ``cmd.exe /d /c command``, marker 0.

        The command travels base64-encoded, so no cmd.exe on the way (WinRS runs
        every command line through one) interprets any of it, and the closing
        marker runs whatever the command does (``exit /b 3`` included); the exit
        status is the command's. The tag names the phase in kvm-phase.exe's command
        line: ``kill_phase`` finds the phase's process tree by it.
        """
        encoded = base64.b64encode(command.encode()).decode()
        return f"{PHASE_TOOL} {_phase_tag(token, phase)} {int(token)} {int(phase)} {encoded}"

    def kill_phase(self, token: int, phase: int) -> int:
        """End the process tree of ``phase_command(..., token, phase)`` with taskkill /T;
        returns how many tree roots were ended."""
        result = self.run(kill_phase_script(token, phase), timeout_s=30.0)
        try:
            return int(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise GuestError(
                f"WinRM kill_phase {token}/{phase}: unexpected answer {result.stdout[:200]!r} "
                f"(exit {result.exit_status}, stderr {result.stderr[:200]!r})"
            ) from None

    # -- files ----------------------------------------------------------------

    def put(self, local: Path, remote: str) -> None:
        """Copy a host file into the guest (WinRS Send of its base64 to a PowerShell)."""
        data = local.read_bytes()
        out, err = BoundedOutput(), BoundedOutput()
        watch = CommandWatch(f"put {remote}", 60.0 + len(data) / 1e6)
        status = self._execute(
            _ps_with_path(PUT_SCRIPT, remote), watch, out.feed, err.feed, out, err, stdin=data
        )
        if status != 0:
            raise GuestError(f"WinRM put {local} -> {remote} failed (exit {status}): {err.text()}")

    def get(self, remote: str, local: Path) -> None:
        """Copy a guest file to the host; written to ``local`` as it arrives."""
        decoder = _Base64Sink(local.with_name(local.name + ".part"))
        out, err = BoundedOutput(0, 0), BoundedOutput()
        watch = CommandWatch(f"get {remote}", 600.0)
        try:
            status = self._execute(
                _ps_with_path(GET_SCRIPT, remote), watch, decoder.feed, err.feed, out, err
            )
            decoder.close()
        except BaseException:
            decoder.discard()
            raise
        if status != 0:
            decoder.discard()
            raise GuestError(f"WinRM get {remote} -> {local} failed (exit {status}): {err.text()}")
        decoder.path.replace(local)


class _Base64Sink:
    """Decodes base64 text arriving in pieces of any length into a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("wb")
        self._pending = b""

    def feed(self, data: bytes) -> None:
        data = self._pending + b"".join(data.split())
        cut = len(data) - len(data) % 4
        self._pending = data[cut:]
        try:
            self._file.write(base64.b64decode(data[:cut], validate=True))
        except binascii.Error as exc:
            raise GuestError(f"WinRM get: the guest sent output that is not base64: {exc}") \
                from None

    def close(self) -> None:
        if self._pending:
            raise GuestError("WinRM get: the guest's base64 output ended mid-quantum")
        self._file.close()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def _phase_tag(token: int, phase: int) -> str:
    return f"kvmh-{int(token)}-{int(phase)}"


def kill_phase_script(token: int, phase: int) -> str:
    """The PowerShell command that ends a phase's process tree and prints how many roots.

    The tag is assembled at run time, so this command's own command line does
    not match the filter (it would otherwise kill itself first).
    """
    tag_a, tag_b = "kvmh", f"-{int(token)}-{int(phase)}"
    script = (
        f"$t='{tag_a}'+'{tag_b}';$n=0;"
        "Get-CimInstance Win32_Process | Where-Object { $_.CommandLine -like \"* $t *\" -and "
        "$_.ProcessId -ne $PID } | ForEach-Object { taskkill /F /T /PID $_.ProcessId | "
        "Out-Null; $n++ };$n"
    )
    return _powershell(script)


def _powershell(script: str) -> str:
    """A cmd command line running ``script`` (UTF-16LE base64: no quoting to get wrong)."""
    encoded = base64.b64encode(script.encode("utf-16-le")).decode()
    return f"powershell -NoProfile -NonInteractive -EncodedCommand {encoded}"


def _ps_with_path(script: str, path: str) -> str:
    """``script`` with $env:KVMH_PATH set to ``path`` (passed through cmd's set)."""
    if any(c in path for c in '"&|<>^%\r\n'):
        raise GuestError(
            f"WinRM file path {path!r} has a character cmd.exe would interpret "
            "(fix: use a plain Windows path)"
        )
    return f'cmd /C "set KVMH_PATH={path}& {_powershell(script)}"'


def _receive(
    shell: WinRS, command_id: str, timeout_s: int
) -> tuple[str, int | None, dict[str, bytes]]:
    """One Receive (MS-WSMV 3.1.4.14): (CommandState, exit code once Done, bytes per stream).

    pypsrp's WinRS.receive retries a read timeout five times with growing
    sleeps, past any deadline; this sends one request and leaves retrying to
    the caller's loop, which asks the command's deadline first.
    """
    from pypsrp.wsman import NAMESPACES, OptionSet, WSManAction

    rsp = NAMESPACES["rsp"]
    receive = ET.Element(f"{{{rsp}}}Receive")
    ET.SubElement(receive, f"{{{rsp}}}DesiredStream", CommandId=command_id).text = (
        "stdout stderr"
    )
    options = OptionSet()
    options.add_option("WSMAN_CMDSHELL_OPTION_KEEPALIVE", "True")
    response = shell.wsman.invoke(
        WSManAction.RECEIVE, shell.resource_uri, receive, options,
        shell._selector_set, timeout_s,
    )
    body = response.find("s:Body/rsp:ReceiveResponse", NAMESPACES)
    state, rc, buffers = CommandState.PENDING, None, {"stdout": b"", "stderr": b""}
    if body is None:
        return state, rc, buffers
    node = body.find("rsp:CommandState", NAMESPACES)
    if node is not None:
        state = node.attrib.get("State", state)
        code = node.find("rsp:ExitCode", NAMESPACES)
        rc = int(code.text or "0") if code is not None else None
    for stream in body.findall("rsp:Stream", NAMESPACES):
        name = stream.attrib.get("Name", "")
        if stream.text and name in buffers:
            buffers[name] += base64.b64decode(stream.text)
    return state, rc, buffers


def _command_id(response: Any) -> str:
    """The CommandId of a CommandResponse (MS-WSMV 3.1.4.11)."""
    from pypsrp.wsman import NAMESPACES

    node = response.find("rsp:CommandResponse/rsp:CommandId", namespaces=NAMESPACES)
    if node is None or not node.text:
        raise GuestError("WinRM: the CommandResponse carries no CommandId")
    return str(node.text)


def _pinned_wsman(target: WinrmTarget, connect_timeout_s: float) -> WSMan:
    """A pypsrp WSMan whose HTTPS session accepts only the pinned certificate."""
    wsman = WSMan(
        target.host,
        port=target.port,
        username=target.username,
        password=target.password.reveal(),
        ssl=True,
        auth=target.auth,
        cert_validation=False,  # replaced by the fingerprint pin just below
        connection_timeout=int(max(1, connect_timeout_s)),
        read_timeout=30,
        no_proxy=True,  # 127.0.0.1 forwards must not go through an environment proxy
        operation_timeout=20,
    )
    transport = wsman.transport
    session = transport._build_session()  # pypsrp's auth and headers, then our adapter
    session.verify = False  # the CA chain is not checked: the fingerprint is
    session.mount("https://", _PinnedAdapter(target.fingerprint))
    transport.session = session
    return wsman
