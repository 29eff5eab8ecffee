"""A private PostgreSQL server for the history tests: started by the test, torn down after.

Debian's postgresql (initdb + postgres) run as the ``postgres`` user on a data
directory in a fresh temporary directory, listening on 127.0.0.1 on a free
port and on a private socket directory only; trust authentication for the
local socket and loopback. Nothing of the host's own clusters is touched.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa


def pg_bin() -> Path | None:
    """Debian's PostgreSQL binary directory (newest version), or None when not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def postgres_server() -> Iterator[str]:
    """A running server; yields a SQLAlchemy URL of its ``postgres`` database."""
    bindir = pg_bin()
    assert bindir is not None, "postgresql is not installed (bootstrap installs it)"
    root = Path(tempfile.mkdtemp(prefix="harness-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    shutil.chown(root, "postgres", "postgres")
    shutil.chown(sock, "postgres", "postgres")
    os.chmod(root, 0o700)
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_pg, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U",
                    "postgres", "--no-sync"], check=True, capture_output=True, timeout=120)
    port = _free_port()
    log = root / "server.log"
    server = subprocess.Popen(
        [*as_pg, str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
         "-k", str(sock), "-c", "fsync=off", "-c", "max_connections=40"],
        stdout=subprocess.DEVNULL, stderr=log.open("w"),
    )
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                sa.create_engine(url).connect().close()
                break
            except sa.exc.OperationalError:
                assert server.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, "PostgreSQL did not come up in 60 s"
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()  # SIGTERM: smart shutdown; then the data goes
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(url: str, name: str) -> str:
    """Create database ``name`` on the server of ``url``; its URL."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url.rsplit("/", 1)[0] + f"/{name}"
