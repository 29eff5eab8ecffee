"""The WinRM transport against the WS-Management TEST DOUBLE (tests/winrm_double.py).

Real HTTPS on 127.0.0.1 with a certificate made here, real NTLM (pyspnego's
acceptor), real host processes behind each command. Contract tests check the
messages the transport sends against MS-WSMV 3.1.4 (cited in the double).
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.guest.base import GuestGone, GuestLost, GuestTimeout
from harness.guest.output import HEAD_CAP, TAIL_CAP
from harness.guest.winrm import (
    PHASE_TOOL,
    CertificateMismatch,
    CredentialsRefused,
    Secret,
    WinrmGuest,
    WinrmTarget,
    kill_phase_script,
)
from tests import winrm_double as wd
from tests.winrm_double import WsmanDouble, make_cert

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def double(tmp_path: Path) -> Iterator[WsmanDouble]:
    with WsmanDouble(tmp_path) as d:
        yield d


def target(d: WsmanDouble, *, password: str | None = None, fp: str | None = None) -> WinrmTarget:
    return WinrmTarget(
        "127.0.0.1", d.port, d.username, Secret(password or d.password), fp or d.cert.sha256
    )


@pytest.fixture
def guest(double: WsmanDouble) -> Iterator[WinrmGuest]:
    g = WinrmGuest.connect(target(double), time.monotonic() + 20)
    yield g
    g.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie the double has not reaped yet counts as ended
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def test_exit_code_stdout_stderr(guest: WinrmGuest) -> None:
    r = guest.run("echo out; echo err >&2; exit 7", timeout_s=20)
    assert (r.exit_status, r.stdout, r.stderr, r.dropped) == (7, "out\n", "err\n", None)


def test_contract_message_shapes(double: WsmanDouble, guest: WinrmGuest) -> None:
    """MS-WSMV 3.1.4: Create, Command, Receive until Done, Signal after it, Delete."""
    double.requests.clear()
    guest.run("exit 3", timeout_s=20)
    acts = double.actions()
    assert acts[0] == "Create" and acts[1] == "Command" and acts[-2:] == ["Signal", "Delete"]
    assert set(acts[2:-2]) == {"Receive"}
    for req in double.requests:
        assert req.resource_uri == wd.RESOURCE_CMD
        if req.action != wd.ACTION_CREATE:
            assert set(req.selectors) == {"ShellId"}
    create, command = double.requests[0], double.requests[1]
    shell = create.body.find("rsp:Shell", wd.NS)
    assert shell is not None
    assert shell.findtext("rsp:InputStreams", namespaces=wd.NS) == "stdin"
    assert shell.findtext("rsp:OutputStreams", namespaces=wd.NS) == "stdout stderr"
    assert command.body.findtext("rsp:CommandLine/rsp:Command", namespaces=wd.NS) == "exit 3"
    receive = double.requests[2].body.find("rsp:Receive/rsp:DesiredStream", wd.NS)
    assert receive is not None and receive.text == "stdout stderr"
    assert "CommandId" in receive.attrib
    # 3.1.4.12: the Signal names the command and the terminate code
    sig = double.requests[-2].body.find("rsp:Signal", wd.NS)
    assert sig is not None and sig.attrib["CommandId"] == receive.attrib["CommandId"]
    assert sig.findtext("rsp:Code", namespaces=wd.NS) == wd.SIGNAL_TERMINATE
    # every request is a SOAP 1.2 envelope with MessageID, ReplyTo and OperationTimeout
    for req in double.requests:
        header = req.envelope.find("s:Header", wd.NS)
        assert header is not None
        for path in ("wsa:MessageID", "wsa:ReplyTo/wsa:Address", "wsman:OperationTimeout"):
            assert header.find(path, wd.NS) is not None, path


def test_contract_done_carries_exit_code(double: WsmanDouble, guest: WinrmGuest) -> None:
    """The exit code the transport reports is the one in CommandState Done (2.2.4.9)."""
    r = guest.run("echo x; exit 5", timeout_s=20)
    receives = [env for action, env in double.responses if action == wd.ACTION_RECEIVE]
    state = receives[-1].find("s:Body/rsp:ReceiveResponse/rsp:CommandState", wd.NS)
    assert state is not None and state.attrib["State"] == wd.STATE_DONE
    assert state.findtext("rsp:ExitCode", namespaces=wd.NS) == "5" and r.exit_status == 5
    shell_id = double.requests[-1].selectors["ShellId"]
    assert shell_id in double.deleted and shell_id not in double.shells


def test_timeout_ends_the_remote_process(double: WsmanDouble, guest: WinrmGuest) -> None:
    with pytest.raises(GuestTimeout) as info:
        guest.run("echo started; exec sleep 300", timeout_s=2)
    assert "started" in info.value.stdout
    pid = double.pids[-1]
    assert not alive(pid), "the timed-out command still runs in the guest"
    assert double.signals and double.signals[-1][1] == wd.SIGNAL_TERMINATE
    assert double.actions()[-2:] == ["Signal", "Delete"]


def test_guest_gone_mid_command_is_reported_and_the_command_ended(
    double: WsmanDouble, guest: WinrmGuest
) -> None:
    asked: list[int] = []

    def gone() -> str | None:
        asked.append(1)
        return "domain kvmh-x-win is gone (test)"

    with pytest.raises(GuestGone, match="is gone"):
        guest.run("exec sleep 300", timeout_s=60, abort_if=gone)
    assert asked and not alive(double.pids[-1])
    assert double.actions()[-2:] == ["Signal", "Delete"]


def test_unending_output_is_bounded_and_still_times_out(
    double: WsmanDouble, guest: WinrmGuest
) -> None:
    with pytest.raises(GuestTimeout) as info:
        guest.run("exec yes kvm-harness-flood", timeout_s=3)
    kept = len(info.value.stdout)
    assert kept <= HEAD_CAP + TAIL_CAP + 200
    assert "bytes of output dropped here" in info.value.stdout
    assert not alive(double.pids[-1])


def test_large_ending_output_keeps_head_and_tail(guest: WinrmGuest) -> None:
    total = HEAD_CAP + 3 * TAIL_CAP
    r = guest.run(f"echo FIRST; head -c {total} /dev/zero | tr '\\0' x; echo; echo LAST",
                  timeout_s=60)
    assert r.exit_status == 0
    assert r.stdout.startswith("FIRST\n") and r.stdout.endswith("LAST\n")
    assert r.dropped is not None and "stdout" in r.dropped


def test_connection_dropped_mid_command(double: WsmanDouble, guest: WinrmGuest) -> None:
    double.drop_on_receive = 1
    with pytest.raises(GuestLost):
        guest.run("exec sleep 300", timeout_s=30)
    double.drop_on_receive = None
    # the transport still ended the command on a new connection
    assert double.signals and double.signals[-1][1] == wd.SIGNAL_TERMINATE
    assert not alive(double.pids[-1])


def test_stalled_receive_still_times_out_on_its_deadline(
    double: WsmanDouble, guest: WinrmGuest
) -> None:
    """A Receive never answered is a read timeout: retried inside the deadline, then the
    command's GuestTimeout (pypsrp's own retries would sleep far past it, then GuestLost)."""
    double.stall_receives = 10
    with pytest.raises(GuestTimeout):
        guest.run("exec sleep 300", timeout_s=3)
    assert double.stall_receives >= 8  # one or two stalled Receives, not pypsrp's six
    double.stall_receives = 0
    assert double.signals and double.signals[-1][1] == wd.SIGNAL_TERMINATE
    assert not alive(double.pids[-1])


def test_wrong_credentials_clear_error_no_retry_storm(double: WsmanDouble) -> None:
    t = target(double, password="not-the-password-42")
    with pytest.raises(CredentialsRefused) as info:
        WinrmGuest.connect(t, time.monotonic() + 30)
    text = str(info.value)
    assert "Administrator" in text and "fix:" in text
    assert "not-the-password-42" not in text and "not-the-password-42" not in repr(t)
    assert double.auth_attempts == 1  # refused once, not retried until the deadline


def test_wrong_certificate_is_refused_before_credentials(
    double: WsmanDouble, tmp_path: Path
) -> None:
    other = make_cert(tmp_path, "other")
    with pytest.raises(CertificateMismatch) as info:
        WinrmGuest.connect(target(double, fp=other.sha256), time.monotonic() + 30)
    assert other.sha256 in str(info.value) and "fix:" in str(info.value)
    assert double.auth_attempts == 0 and double.requests == []


def test_unreachable_port_says_so_by_the_deadline(tmp_path: Path) -> None:
    cert = make_cert(tmp_path)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = WinrmTarget("127.0.0.1", port, "Administrator", Secret("pw-unreachable"), cert.sha256)
    with pytest.raises(Exception) as info:
        WinrmGuest.connect(t, time.monotonic() + 1.5)
    assert "did not answer" in str(info.value) and "5986" in str(info.value)
    assert "pw-unreachable" not in str(info.value)


def test_listener_coming_up_late_is_retried(tmp_path: Path) -> None:
    """Connection refused while the guest boots is transient: retried until it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cert = make_cert(tmp_path, "late")
    started: list[WsmanDouble] = []

    def come_up() -> None:
        started.append(WsmanDouble(tmp_path, port=port, cert=cert).__enter__())

    t = WinrmTarget("127.0.0.1", port, "Administrator", Secret("double-password-1"), cert.sha256)
    timer = threading.Timer(1.0, come_up)
    timer.start()
    try:
        g = WinrmGuest.connect(t, time.monotonic() + 30)
        assert g.run("echo up", timeout_s=20).stdout == "up\n"
        g.close()
    finally:
        timer.join()
        for d in started:
            d.close()
    assert started and started[0].auth_attempts >= 1


def test_put_get_round_trip(double: WsmanDouble, guest: WinrmGuest, tmp_path: Path) -> None:
    data = os.urandom(300_000)  # several WinRS Send envelopes
    src, back = tmp_path / "src.bin", tmp_path / "back.bin"
    src.write_bytes(data)
    guest.put(src, r"C:\kvm-harness\payload.bin")
    assert (double.root / "C/kvm-harness/payload.bin").read_bytes() == data
    guest.get(r"C:\kvm-harness\payload.bin", back)
    assert back.read_bytes() == data
    sends = [r for r in double.requests if r.action == wd.ACTION_SEND]
    assert len(sends) > 1
    ends = [s.body.find("rsp:Send/rsp:Stream", wd.NS) for s in sends]
    assert [e.attrib.get("End") for e in ends if e is not None][-1] == "True"


def test_get_missing_file_is_an_error_and_leaves_nothing(
    guest: WinrmGuest, tmp_path: Path
) -> None:
    with pytest.raises(Exception, match="get"):
        guest.get(r"C:\nope\missing.bin", tmp_path / "x.bin")
    assert list(tmp_path.glob("x.bin*")) == []


def test_password_never_logged(
    double: WsmanDouble, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    g = WinrmGuest.connect(target(double), time.monotonic() + 20)
    try:
        g.run("exit 0", timeout_s=20)
        with pytest.raises(GuestTimeout) as info:
            g.run("exec sleep 100", timeout_s=1)
    finally:
        g.close()
    assert double.password not in caplog.text
    assert double.password not in str(info.value)
    assert double.password not in repr(target(double))


def test_phase_command_and_kill_script() -> None:
    g = WinrmGuest(WinrmTarget("127.0.0.1", 1, "u", Secret("p"), "ab" * 32))
    command = 'page-touch-win.exe --mib 64 & echo "quoted & <odd>" ^ %PATH% !x!'
    cmd = g.phase_command(command, 17, 3)
    tool, tag, token, phase, encoded = cmd.split(" ")
    assert (tool, tag, token, phase) == (PHASE_TOOL, "kvmh-17-3", "17", "3")
    assert base64.b64decode(encoded).decode() == command  # nothing for cmd.exe to parse
    # the killer's own command line must not match its filter
    assert "kvmh-17-3" not in kill_phase_script(17, 3)


def test_kill_phase_reports_the_count(tmp_path: Path) -> None:
    def translate(line: str) -> tuple[list[str], dict[str, str]] | None:
        return (["sh", "-c", "echo 2"], {}) if line == kill_phase_script(4, 2) else None

    with WsmanDouble(tmp_path, translate=translate) as d:
        g = WinrmGuest.connect(target(d), time.monotonic() + 20)
        try:
            assert g.kill_phase(4, 2) == 2
        finally:
            g.close()


def test_bad_fingerprint_value() -> None:
    with pytest.raises(ValueError, match="winrm_cert_sha256"):
        WinrmTarget("127.0.0.1", 5986, "u", Secret("p"), "not-hex")
