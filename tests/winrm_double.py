"""A WS-Management TEST DOUBLE: a WinRM HTTPS listener in Python, for the WinRM transport's tests.

No Windows guest and no WinRM server exist on these machines, so the
transport (harness/guest/winrm.py) is tested against this double. It is
real where it can be: real HTTPS on 127.0.0.1 with a self-signed certificate
made at test time (cryptography), real NTLM (pyspnego's acceptor, the same
code path a Windows listener takes for a local account) or Basic, real SOAP
envelopes, and real host processes behind each command (``sh -c``), so that
"the remote process was ended" is checked on a process that exists.

The shell operations follow MS-WSMV (Web Services Management Protocol
Extensions for Windows Vista), section 3.1.4 (message processing):

* Create (WS-Transfer Create on the ``.../windows/shell/cmd`` ResourceURI):
  the response carries ``rsp:Shell`` and the ``ShellId`` selector in
  ``wst:ResourceCreated`` (MS-WSMV 3.1.4, the Create operation of DMTF-DSP0226).
* Command (``.../windows/shell/Command``): ``rsp:CommandLine`` with
  ``rsp:Command``; the response carries ``rsp:CommandId`` (MS-WSMV 3.1.4.11).
* Send (``.../windows/shell/Send``): ``rsp:Stream Name="stdin"``, base64,
  ``End="true"`` on the last (MS-WSMV 3.1.4.13).
* Receive (``.../windows/shell/Receive``): ``rsp:Stream`` elements in base64
  and ``rsp:CommandState`` whose ``State`` is ``.../CommandState/Running`` or
  ``.../CommandState/Done`` with ``rsp:ExitCode`` (MS-WSMV 3.1.4.14 and the
  CommandStateType of 2.2.4.9); with nothing to say before the
  OperationTimeout, a ``w:TimedOut`` fault (WSManFault code 2150858793). 3.1.4.14
  also says a client MUST Signal a command after its last Receive: the
  contract tests check the transport does.
* Signal (``.../windows/shell/Signal``): ``rsp:Code`` ``.../signal/terminate``
  ends the command (MS-WSMV 3.1.4.12, example 4.7.5).
* Delete (WS-Transfer Delete, ``ShellId`` selector): the shell and whatever
  still runs in it are gone (MS-WSMV 3.1.4, the Delete operation of DMTF-DSP0226).

What it does not do: PowerShell. The transport's own put/get scripts are
recognised and done with ``base64`` on the host (files live under the
double's ``root``); any other PowerShell goes through ``translate``.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import ipaddress
import os
import queue
import re
import signal
import ssl
import subprocess
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import spnego
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from harness.guest import winrm

NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "wsa": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    "wsman": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
    "wst": "http://schemas.xmlsoap.org/ws/2004/09/transfer",
    "rsp": "http://schemas.microsoft.com/wbem/wsman/1/windows/shell",
    "wsmanfault": "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault",
    "w": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
}
SHELL = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"
RESOURCE_CMD = f"{SHELL}/cmd"
TRANSFER = "http://schemas.xmlsoap.org/ws/2004/09/transfer"
ACTION_CREATE, ACTION_DELETE = f"{TRANSFER}/Create", f"{TRANSFER}/Delete"
ACTION_COMMAND, ACTION_SEND = f"{SHELL}/Command", f"{SHELL}/Send"
ACTION_RECEIVE, ACTION_SIGNAL = f"{SHELL}/Receive", f"{SHELL}/Signal"
STATE_DONE, STATE_RUNNING = f"{SHELL}/CommandState/Done", f"{SHELL}/CommandState/Running"
#: WSMAN_SIGNAL_SHELL_CODE_TERMINATE of wsman.h (MS-WSMV 3.1.4.12's terminate code).
SIGNAL_TERMINATE = f"{SHELL}/signal/terminate"
#: MS-WSMV: the WSManFault code of an OperationTimeout that expired (w:TimedOut).
TIMED_OUT_CODE = 2150858793
#: Stream bytes per Receive response at most (a real listener caps by MaxEnvelopeSize).
RECEIVE_BYTES = 128 * 1024


@dataclass(frozen=True)
class Cert:
    """A self-signed certificate for 127.0.0.1 and its key, as files, and its SHA-256."""

    cert_pem: Path
    key_pem: Path
    sha256: str


def make_cert(directory: Path, name: str = "winrm") -> Cert:
    """A fresh self-signed RSA certificate for 127.0.0.1 (what the image build makes)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvm-harness-winrm")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    return Cert(cert_path, key_path, hashlib.sha256(der).hexdigest())


@dataclass
class Request:
    """One SOAP request the double received, for contract tests."""

    action: str
    resource_uri: str
    selectors: dict[str, str]
    body: ET.Element
    envelope: ET.Element


@dataclass
class _Command:
    proc: subprocess.Popen[bytes]
    chunks: queue.Queue[tuple[str, bytes]]
    readers: list[threading.Thread]
    receives: int = 0


@dataclass
class _Shell:
    commands: dict[str, _Command] = field(default_factory=dict)


Translate = Callable[[str], tuple[list[str], dict[str, str]] | None]


class WsmanDouble:
    """The WS-Management TEST DOUBLE: an HTTPS WinRM listener on 127.0.0.1.

    ``auth`` is "ntlm" (pyspnego's acceptor, credentials from a
    NTLM_USER_FILE the double writes) or "basic". ``drop_on_receive`` = N
    closes the connection without an answer on the N-th Receive of a command
    (a link dropping mid-command). ``translate`` may map a command line to a
    host argv and environment (None: the default mapping).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        username: str = "Administrator",
        password: str = "double-password-1",
        auth: str = "ntlm",
        translate: Translate | None = None,
        port: int = 0,
        cert: Cert | None = None,
    ) -> None:
        self.workdir = workdir
        self.root = workdir / "guest-fs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.cert = cert or make_cert(workdir)
        self.username, self.password, self.auth = username, password, auth
        self.translate = translate
        self.requests: list[Request] = []
        self.responses: list[tuple[str, ET.Element]] = []  # (action, response envelope)
        self.auth_attempts = 0
        self.drop_on_receive: int | None = None
        self.stall_receives = 0  # this many Receives are answered never (a stalled link)
        self.shells: dict[str, _Shell] = {}
        self.signals: list[tuple[str, str]] = []  # (command id, code)
        self.deleted: list[str] = []
        self.pids: list[int] = []  # every host process a command started
        self._lock = threading.Lock()
        self.user_file = workdir / "ntlm-users"
        self.user_file.write_text(f":{username}:{password}\n")
        self._server = _Server(("127.0.0.1", port), _Handler, self)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert.cert_pem, self.cert.key_pem)
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> WsmanDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving and end every process still running."""
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for shell in self.shells.values():
                for cmd in shell.commands.values():
                    _kill(cmd)
            self.shells.clear()

    def actions(self) -> list[str]:
        """The last path segment of every action received, in order."""
        return [r.action.rsplit("/", 1)[-1] for r in self.requests]

    # -- operations -----------------------------------------------------------

    def handle(self, envelope: ET.Element) -> tuple[int, ET.Element]:
        """Answer one authenticated SOAP request: (HTTP status, response envelope)."""
        header = envelope.find("s:Header", NS)
        body = envelope.find("s:Body", NS)
        assert header is not None and body is not None, "not a SOAP envelope"
        action = _text(header, "wsa:Action")
        resource = _text(header, "wsman:ResourceURI")
        selectors = {
            s.attrib["Name"]: (s.text or "") for s in header.findall("wsman:SelectorSet/*", NS)
        }
        req = Request(action, resource, selectors, body, envelope)
        with self._lock:
            self.requests.append(req)
        message_id = _text(header, "wsa:MessageID")
        timeout_s = _duration(_text(header, "wsman:OperationTimeout") or "PT20S")
        ops: dict[str, Callable[[Request, float], ET.Element]] = {
            ACTION_CREATE: self._create,
            ACTION_COMMAND: self._command,
            ACTION_SEND: self._send,
            ACTION_RECEIVE: self._receive,
            ACTION_SIGNAL: self._signal,
            ACTION_DELETE: self._delete,
        }
        if action not in ops:
            return 500, _fault(message_id, "ActionNotSupported", 2150858771, action)
        try:
            env = _envelope(f"{action}Response", message_id, ops[action](req, timeout_s))
            self.responses.append((action, env))
            return 200, env
        except _TimedOut:
            return 500, _fault(message_id, "TimedOut", TIMED_OUT_CODE, "operation timed out")
        except KeyError as exc:
            return 500, _fault(message_id, "InvalidSelectors", 2150858843, f"unknown {exc}")

    def _create(self, req: Request, _t: float) -> ET.Element:
        shell_id = str(uuid.uuid4()).upper()
        with self._lock:
            self.shells[shell_id] = _Shell()
        body = ET.Element("body")
        created = ET.SubElement(body, f"{{{NS['wst']}}}ResourceCreated")
        ET.SubElement(created, f"{{{NS['wsa']}}}Address").text = "https://127.0.0.1/wsman"
        ref = ET.SubElement(created, f"{{{NS['wsa']}}}ReferenceParameters")
        ET.SubElement(ref, f"{{{NS['wsman']}}}ResourceURI").text = RESOURCE_CMD
        sel = ET.SubElement(ref, f"{{{NS['wsman']}}}SelectorSet")
        ET.SubElement(sel, f"{{{NS['wsman']}}}Selector", Name="ShellId").text = shell_id
        shell = ET.SubElement(body, f"{{{NS['rsp']}}}Shell")
        ET.SubElement(shell, f"{{{NS['rsp']}}}ShellId").text = shell_id
        ET.SubElement(shell, f"{{{NS['rsp']}}}ResourceUri").text = RESOURCE_CMD
        return body

    def _command(self, req: Request, _t: float) -> ET.Element:
        shell = self.shells[req.selectors["ShellId"]]
        line = _text(req.body, "rsp:CommandLine/rsp:Command")
        args = [a.text or "" for a in req.body.findall("rsp:CommandLine/rsp:Arguments", NS)]
        full = " ".join([line, *args])
        argv, env = self._argv(full)
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, cwd=self.root, env={**os.environ, **env},
        )
        self.pids.append(proc.pid)
        chunks: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=8)  # backpressure
        readers = [
            threading.Thread(target=_pump, args=(name, pipe, chunks), daemon=True)
            for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr))
        ]
        for t in readers:
            t.start()
        command_id = str(uuid.uuid4()).upper()
        shell.commands[command_id] = _Command(proc, chunks, readers)
        body = ET.Element("body")
        resp = ET.SubElement(body, f"{{{NS['rsp']}}}CommandResponse")
        ET.SubElement(resp, f"{{{NS['rsp']}}}CommandId").text = command_id
        return body

    def _argv(self, line: str) -> tuple[list[str], dict[str, str]]:
        if self.translate is not None and (mapped := self.translate(line)) is not None:
            return mapped
        m = re.fullmatch(r'cmd /C "set KVMH_PATH=(.*?)& powershell .*-EncodedCommand (\S+)"', line)
        if m:
            script = base64.b64decode(m.group(2)).decode("utf-16-le")
            path = str(self.root / m.group(1).replace("\\", "/").lstrip("/").replace(":", ""))
            if script == winrm.PUT_SCRIPT:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                return ["sh", "-c", 'base64 -d > "$KVMH_PATH"'], {"KVMH_PATH": path}
            if script == winrm.GET_SCRIPT:
                return ["sh", "-c", 'base64 -w0 "$KVMH_PATH"'], {"KVMH_PATH": path}
        if line.startswith("powershell"):
            return ["sh", "-c", "echo 'the WS-Man double runs no PowerShell' >&2; exit 1"], {}
        return ["sh", "-c", line], {}

    def _send(self, req: Request, _t: float) -> ET.Element:
        shell = self.shells[req.selectors["ShellId"]]
        for stream in req.body.findall("rsp:Send/rsp:Stream", NS):
            cmd = shell.commands[stream.attrib["CommandId"]]
            assert cmd.proc.stdin is not None
            cmd.proc.stdin.write(base64.b64decode(stream.text or ""))
            if stream.attrib.get("End", "").lower() == "true":
                cmd.proc.stdin.close()
        return ET.Element("body")

    def _receive(self, req: Request, timeout_s: float) -> ET.Element:
        shell = self.shells[req.selectors["ShellId"]]
        desired = req.body.find("rsp:Receive/rsp:DesiredStream", NS)
        assert desired is not None, "Receive without DesiredStream"
        command_id = desired.attrib["CommandId"]
        cmd = shell.commands[command_id]
        cmd.receives += 1
        if self.drop_on_receive is not None and cmd.receives >= self.drop_on_receive:
            raise _Drop()
        if self.stall_receives > 0:
            self.stall_receives -= 1
            raise _Stall()
        got: list[tuple[str, bytes]] = []
        size = 0
        try:
            got.append(cmd.chunks.get(timeout=timeout_s))
            size += len(got[-1][1])
            while size < RECEIVE_BYTES:
                got.append(cmd.chunks.get_nowait())
                size += len(got[-1][1])
        except queue.Empty:
            pass
        done = not any(t.is_alive() for t in cmd.readers) and cmd.chunks.empty()
        if done:
            cmd.proc.wait()
        elif not got:
            raise _TimedOut()
        body = ET.Element("body")
        resp = ET.SubElement(body, f"{{{NS['rsp']}}}ReceiveResponse")
        for name, data in got:
            if data:
                ET.SubElement(
                    resp, f"{{{NS['rsp']}}}Stream", Name=name, CommandId=command_id
                ).text = base64.b64encode(data).decode()
        state = ET.SubElement(
            resp, f"{{{NS['rsp']}}}CommandState", CommandId=command_id,
            State=STATE_DONE if done else STATE_RUNNING,
        )
        if done:
            ET.SubElement(state, f"{{{NS['rsp']}}}ExitCode").text = str(cmd.proc.returncode % 256)
        return body

    def _signal(self, req: Request, _t: float) -> ET.Element:
        shell = self.shells[req.selectors["ShellId"]]
        sig = req.body.find("rsp:Signal", NS)
        assert sig is not None, "Signal without rsp:Signal"
        command_id, code = sig.attrib["CommandId"], _text(sig, "rsp:Code")
        self.signals.append((command_id, code))
        if code == SIGNAL_TERMINATE:
            _kill(shell.commands[command_id])
        body = ET.Element("body")
        ET.SubElement(body, f"{{{NS['rsp']}}}SignalResponse")
        return body

    def _delete(self, req: Request, _t: float) -> ET.Element:
        shell_id = req.selectors["ShellId"]
        with self._lock:
            shell = self.shells.pop(shell_id)
        for cmd in shell.commands.values():
            _kill(cmd)  # a deleted shell takes its processes with it
        self.deleted.append(shell_id)
        return ET.Element("body")


class _TimedOut(Exception):
    pass


class _Drop(Exception):
    pass


class _Stall(Exception):
    pass


def _kill(cmd: _Command) -> None:
    if cmd.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cmd.proc.pid, signal.SIGKILL)
    cmd.proc.wait()
    while True:  # unblock the pumps so they see EOF and end
        try:
            cmd.chunks.get_nowait()
        except queue.Empty:
            if not any(t.is_alive() for t in cmd.readers):
                break
            for t in cmd.readers:
                t.join(timeout=0.05)


def _pump(name: str, pipe: Any, chunks: queue.Queue[tuple[str, bytes]]) -> None:
    while data := pipe.read1(65536):
        chunks.put((name, data))
    pipe.close()


def _text(node: ET.Element, path: str) -> str:
    found = node.find(path, NS)
    return (found.text or "").strip() if found is not None else ""


def _duration(text: str) -> float:
    m = re.fullmatch(r"PT([0-9.]+)S", text.strip())
    return float(m.group(1)) if m else 20.0


def _envelope(action: str, relates_to: str, body: ET.Element) -> ET.Element:
    env = ET.Element(f"{{{NS['s']}}}Envelope")
    header = ET.SubElement(env, f"{{{NS['s']}}}Header")
    ET.SubElement(header, f"{{{NS['wsa']}}}Action").text = action
    ET.SubElement(header, f"{{{NS['wsa']}}}MessageID").text = f"uuid:{uuid.uuid4()}"
    ET.SubElement(header, f"{{{NS['wsa']}}}RelatesTo").text = relates_to
    out = ET.SubElement(env, f"{{{NS['s']}}}Body")
    out.extend(list(body))
    return env


def _fault(relates_to: str, sub: str, code: int, message: str) -> ET.Element:
    body = ET.Element("body")
    fault = ET.SubElement(body, f"{{{NS['s']}}}Fault")
    c = ET.SubElement(fault, f"{{{NS['s']}}}Code")
    ET.SubElement(c, f"{{{NS['s']}}}Value").text = "s:Receiver"
    subcode = ET.SubElement(c, f"{{{NS['s']}}}Subcode")
    ET.SubElement(subcode, f"{{{NS['s']}}}Value").text = f"w:{sub}"
    reason = ET.SubElement(fault, f"{{{NS['s']}}}Reason")
    ET.SubElement(reason, f"{{{NS['s']}}}Text").text = message
    detail = ET.SubElement(fault, f"{{{NS['s']}}}Detail")
    wf = ET.SubElement(detail, f"{{{NS['wsmanfault']}}}WSManFault", Code=str(code))
    ET.SubElement(wf, f"{{{NS['wsmanfault']}}}Message").text = message
    return _envelope("http://schemas.dmtf.org/wbem/wsman/1/wsman/fault", relates_to, body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], handler: type, double: WsmanDouble) -> None:
        self.double = double
        super().__init__(addr, handler)


class _Handler(BaseHTTPRequestHandler):
    """One connection: HTTP/1.1 keep-alive, authenticated once per connection as WinRM is."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the tests read the double's records, not its log

    def setup(self) -> None:
        super().setup()
        self._authed = False
        self._ntlm: Any = None

    def do_POST(self) -> None:
        double = self.server.double
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if not self._authed and not self._authenticate(double):
            return
        if not body:  # pypsrp's empty request that only sets up a security context
            self._reply(200, b"")
            return
        try:
            status, env = double.handle(ET.fromstring(body))
        except _Drop:
            self.close_connection = True
            self.connection.shutdown(2)
            return
        except _Stall:  # hold the connection, answer nothing, until the client gives up
            self.close_connection = True
            self.connection.settimeout(60)
            with contextlib.suppress(OSError):
                self.rfile.read(1)
            return
        self._reply(status, ET.tostring(env, encoding="utf-8"))

    def _authenticate(self, double: WsmanDouble) -> bool:
        header = self.headers.get("Authorization", "")
        if double.auth == "basic":
            want = base64.b64encode(f"{double.username}:{double.password}".encode()).decode()
            if header.startswith("Basic "):
                double.auth_attempts += 1
                if header[6:] == want:
                    self._authed = True
                    return True
            self._reply(401, b"", {"WWW-Authenticate": 'Basic realm="WSMAN"'})
            return False
        if not header.startswith("Negotiate "):
            self._reply(401, b"", {"WWW-Authenticate": "Negotiate"})
            return False
        token = base64.b64decode(header.split(" ", 1)[1])
        if self._ntlm is None:
            double.auth_attempts += 1
            os.environ["NTLM_USER_FILE"] = str(double.user_file)
            self._ntlm = spnego.server(protocol="ntlm")
        try:
            out = self._ntlm.step(token)
        except spnego.exceptions.SpnegoError:
            self._ntlm = None
            self._reply(401, b"", {"WWW-Authenticate": "Negotiate"})
            return False
        if self._ntlm.complete:
            self._authed = True
            return True
        self._reply(401, b"", {"WWW-Authenticate": f"Negotiate {base64.b64encode(out).decode()}"})
        return False

    def _reply(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if payload:
            self.send_header("Content-Type", "application/soap+xml;charset=UTF-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
