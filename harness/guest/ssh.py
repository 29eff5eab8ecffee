"""Linux guests over SSH (paramiko), with the guest's host key pinned."""

from __future__ import annotations

import base64
import logging
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import paramiko
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    stop_any,
    wait_exponential,
)
from tenacity.stop import stop_base

from harness.guest.base import (
    AbortCheck,
    CommandResult,
    GuestError,
    GuestLost,
)
from harness.guest.output import BoundedOutput, CommandWatch, dropped_note

#: Errors that mean "sshd is not up yet / the link blipped", worth another try.
TRANSIENT = (OSError, EOFError, paramiko.SSHException)

MARKER_TOOL = "/usr/local/bin/kvm-marker"

#: Bytes asked of the channel per read.
CHUNK = 65536
#: How long one read waits for output when none is waiting (the deadline and the
#: abort check are asked again after each wait).
READ_WAIT_S = 0.2
#: The pause between polls once stdout has ended but the exit status has not arrived.
IDLE_S = 0.02
#: After the exit status, how long output may stay quiet without an EOF before it counts
#: as complete (a background process of the command may hold stdout open).
LINGER_S = 1.0

# QEMU's user-mode network accepts TCP before the guest's sshd listens, so
# every early attempt ends in "Error reading SSH protocol banner", which
# paramiko's transport thread logs with a traceback. Retries handle it.
logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)


class _StopWhen(stop_base):
    """A tenacity stop condition from a plain predicate (None: never stop early)."""

    def __init__(self, predicate: Callable[[], bool] | None) -> None:
        self.predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.predicate is not None and self.predicate()


class SshGuest:
    """A Linux guest reached on a 127.0.0.1 port forward. Implements ``Guest``."""

    def __init__(
        self,
        client: paramiko.SSHClient,
        host: str,
        port: int,
        again: Callable[[float], paramiko.SSHClient] | None = None,
        *,
        wrap: Callable[[str], str] | None = None,
        marker: str = MARKER_TOOL,
    ) -> None:
        self._client = client
        self.host, self.port = host, port
        self._again = again  # a new client to the same guest, retried until the deadline
        # Every command as run: e.g. through sudo, with a PATH (a user that is not root).
        self._wrap = wrap
        self.marker = marker

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        user: str,
        key_file: Path,
        host_key: str,
        deadline_s: float,
        stop_if: Callable[[], bool] | None = None,
        wrap: Callable[[str], str] | None = None,
        marker: str = MARKER_TOOL,
    ) -> SshGuest:
        """Connect, retrying transient failures until ``deadline_s`` has passed.

        ``host_key`` is the "type base64" line recorded when the image was
        built; any other key is rejected (never AutoAddPolicy). Retries also
        end as soon as ``stop_if()`` is true (the run is being torn down).
        ``wrap`` turns every command into the one sent (sudo for a user that is
        not root); ``marker`` is the guest's phase marker program.
        """
        def again(deadline: float) -> paramiko.SSHClient:
            return _connect_client(host, port, user, key_file, host_key, deadline, stop_if)

        return cls(again(deadline_s), host, port, again, wrap=wrap, marker=marker)

    def reconnect(self, deadline_s: float) -> None:
        """Drop the old connection and connect again, retrying until ``deadline_s``."""
        if self._again is None:
            raise GuestError(f"SSH to {self.host}:{self.port}: no way to reconnect")
        self._client.close()
        self._client = self._again(deadline_s)

    def run(
        self, command: str, *, timeout_s: float, abort_if: AbortCheck | None = None
    ) -> CommandResult:
        """Run ``command``; a non-zero exit is returned, never retried or raised.

        A connection that drops before the exit status arrived raises GuestLost
        (never a made-up exit status); ``abort_if`` is asked about once a
        second and a reason from it raises GuestGone. Output is bounded (see
        harness/guest/output.py): what was dropped is in ``dropped``.
        """
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise GuestLost(f"SSH connection to {self.host}:{self.port} is closed")
        sent = command if self._wrap is None else self._wrap(command)
        try:
            chan = transport.open_session(timeout=10)
        except TRANSIENT as exc:
            raise GuestError(f"cannot open an SSH channel: {exc!r}") from exc
        out, err = BoundedOutput(), BoundedOutput()
        watch = CommandWatch(command, timeout_s, abort_if)
        try:
            chan.exec_command(sent)
            chan.settimeout(READ_WAIT_S)
            _read_until_exit(chan, watch, out, err)
            status = chan.recv_exit_status()
            if status == -1:
                # paramiko's "no exit status": the channel closed without one.
                if not transport.is_active():
                    raise GuestLost(
                        f"the SSH connection to {self.host}:{self.port} dropped while "
                        f"{command!r} ran; its outcome is unknown"
                    )
                raise GuestError(
                    f"{command!r} ended without an exit status (killed by a signal?)"
                )
        except TRANSIENT as exc:
            if not transport.is_active():
                raise GuestLost(
                    f"the SSH connection to {self.host}:{self.port} dropped while "
                    f"{command!r} ran ({exc!r}); its outcome is unknown"
                ) from exc
            raise GuestError(f"SSH failed while running {command!r}: {exc!r}") from exc
        finally:
            chan.close()
        end = time.monotonic_ns()
        return CommandResult(
            status, out.text(), err.text(), watch.start_ns, end, dropped_note(out, err)
        )

    def kill_phase(self, token: int, phase: int) -> int:
        """SIGKILL the process group of what is left of that phase's command.

        sshd starts every session in its own session (setsid), so the group of
        the phase's ``sh -c`` holds the whole workload. The bracket in the
        pattern keeps this command's own shell from matching it. The kill is
        repeated until nothing of the phase is left (a group may still be
        forking when it is signalled); GuestError if something survives.
        """
        pattern = shlex.quote(f"[k]vm-marker {token} {phase};")  # matches "kvm-marker T N;"
        script = (
            "n=0; for try in 1 2 3 4 5 6 7 8 9 10; do "
            f"ps=$(pgrep -f {pattern}); "
            '[ -z "$ps" ] && { echo killed $n; exit 0; }; '
            # One kill per group: the phase's sh and its subshell share theirs. No "--"
            # before the group: dash's kill (a guest's /bin/sh) calls it an illegal number.
            "for g in $(for p in $ps; do ps -o pgid= -p $p; done | tr -d ' ' | sort -u); do "
            "kill -KILL -$g 2>/dev/null && n=$((n+1)); "
            "done; sleep 0.2; done; "
            f"echo left $(pgrep -f {pattern} | tr '\\n' ' '); exit 1"
        )
        out = self.run(script, timeout_s=30)
        words = out.stdout.split()
        if out.exit_status != 0 or len(words) < 2 or words[0] != "killed":
            raise GuestError(
                f"processes of phase {phase} survived SIGKILL of their group "
                f"({out.stdout.strip() or out.stderr.strip() or 'no answer'})"
            )
        try:
            return int(words[1])
        except ValueError:
            return 0

    def put(self, local: Path, remote: str) -> None:
        """Copy ``local`` to ``remote`` over SFTP."""
        try:
            with self._client.open_sftp() as sftp:
                sftp.put(str(local), remote)
        except (*TRANSIENT, paramiko.SFTPError) as exc:
            raise GuestError(f"cannot copy {local} to guest:{remote}: {exc!r}") from exc

    def get(self, remote: str, local: Path) -> None:
        """Copy ``remote`` to ``local`` over SFTP."""
        try:
            with self._client.open_sftp() as sftp:
                sftp.get(remote, str(local))
        except (*TRANSIENT, paramiko.SFTPError) as exc:
            raise GuestError(f"cannot copy guest:{remote} to {local}: {exc!r}") from exc

    def phase_command(self, command: str, token: int, phase: int) -> str:
        """Bracket ``command`` with kvm-marker calls; keep the workload's exit status."""
        mark = f"{self.marker} {token}"
        # A subshell, so that an `exit` in the command (kv-store's stop phase has
        # two) ends only the command and the closing marker still runs.
        inner = f"{mark} {phase}; ( {command}\n); rc=$?; {mark} 0; exit $rc"
        return f"sh -c {shlex.quote(inner)}"

    def close(self) -> None:
        """Close the SSH connection."""
        self._client.close()


def _read_until_exit(
    chan: paramiko.Channel, watch: CommandWatch, out: BoundedOutput, err: BoundedOutput
) -> None:
    """Read both streams until the exit status and the end of the output have arrived.

    ``watch`` is asked before every read, so neither a guest that floods its
    output nor one that prints nothing can keep this past the deadline. The
    exit status can overtake the last output (sshd sends it while output
    still waits for window space), so the output counts as complete at the
    guest's EOF; without one (a background process holds stdout open), once
    nothing has come for LINGER_S after the exit status.
    """
    out_open = True
    quiet_since = time.monotonic()
    exited_at: float | None = None
    while True:
        watch.check(out, err)
        got = False
        if chan.recv_ready():
            out.feed(chan.recv(CHUNK))
            got = True
        if chan.recv_stderr_ready():
            err.feed(chan.recv_stderr(CHUNK))
            got = True
        now = time.monotonic()
        if got:
            quiet_since = now
            continue
        if chan.exit_status_ready():
            exited_at = now if exited_at is None else exited_at
            if chan.eof_received or chan.closed:
                return
            if now - max(quiet_since, exited_at) > LINGER_S:
                return
        if out_open:
            # Nothing waiting: block briefly for stdout (b"" means it reached EOF).
            try:
                data = chan.recv(CHUNK)
            except TimeoutError:
                continue
            out_open = bool(data)
            out.feed(data)
            quiet_since = time.monotonic() if data else quiet_since
        else:
            time.sleep(IDLE_S)


def _connect_client(
    host: str,
    port: int,
    user: str,
    key_file: Path,
    host_key: str,
    deadline_s: float,
    stop_if: Callable[[], bool] | None,
) -> paramiko.SSHClient:
    """A connected client, retrying transient failures until ``deadline_s`` (see connect)."""
    pkey = paramiko.Ed25519Key.from_private_key_file(str(key_file))
    key_type, key_b64 = host_key.split()[:2]
    known = paramiko.PKey.from_type_string(key_type, base64.b64decode(key_b64))

    def attempt() -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        name = host if port == 22 else f"[{host}]:{port}"
        client.get_host_keys().add(name, known.get_name(), known)
        try:
            client.connect(
                host,
                port=port,
                username=user,
                pkey=pkey,
                timeout=5,
                banner_timeout=10,
                auth_timeout=10,
                allow_agent=False,
                look_for_keys=False,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            # Not transient: a different machine answered. Never retried.
            raise GuestError(f"host key mismatch on {host}:{port}: {exc}") from exc
        except BaseException:
            client.close()
            raise
        return client

    try:
        for try_ in Retrying(
            retry=retry_if_exception_type(TRANSIENT),
            stop=stop_any(stop_after_delay(deadline_s), _StopWhen(stop_if)),
            wait=wait_exponential(multiplier=0.2, max=2),
            reraise=False,
        ):
            with try_:
                client = attempt()
    except RetryError as exc:
        last = exc.last_attempt.exception()
        raise GuestError(
            f"no SSH on {host}:{port} after {deadline_s:.0f} s: {last!r}"
        ) from last
    return client
