"""A private PostgreSQL server for tests: Debian's PostgreSQL binaries, a throwaway cluster in a temporary
directory, listening on 127.0.0.1 on a free port with password (SCRAM) authentication, one fresh database per test.

The cluster never touches the system's PostgreSQL service. PostgreSQL refuses to run as root, so when the tests run
as root (CI) the cluster belongs to the ``postgres`` user that Debian's package creates. scripts/install-system-deps
installs the package.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from glob import glob
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

SUPERUSER = "mailbroker_test"


def _bindir() -> Path:
    candidates = sorted(glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    if found is None:
        raise RuntimeError("PostgreSQL's server binaries are not installed (run scripts/install-system-deps as root)")
    return Path(found).parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresServer:
    """Start with ``with PostgresServer() as pg:``; ``pg.new_database()`` returns a SQLAlchemy URL of a new database."""

    def __init__(self) -> None:
        self.bindir = _bindir()
        self.password = secrets.token_urlsafe(24)
        self.port = 0
        self._root: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._user: str | None = None
        self._databases = 0

    def __enter__(self) -> PostgresServer:
        self._root = Path(tempfile.mkdtemp(prefix="mailbroker-pg-"))
        self._user = "postgres" if os.geteuid() == 0 else None
        data = self._root / "data"
        sockets = self._root / "run"
        data.mkdir(mode=0o700)
        sockets.mkdir(mode=0o700)
        pwfile = self._root / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            for path in (self._root, data, sockets, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(
            [
                str(self.bindir / "initdb"),
                "--pgdata",
                str(data),
                "--username",
                SUPERUSER,
                "--pwfile",
                str(pwfile),
                "--auth",
                "scram-sha-256",
                "--encoding",
                "UTF8",
                "--no-sync",
            ]
        )
        pwfile.unlink()
        self.port = _free_port()
        self._process = subprocess.Popen(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(data),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(sockets),
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
                "-c",
                "shared_buffers=64MB",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            user=self._user,
        )
        self._wait_ready()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGINT)  # "fast" shutdown: ends open sessions instead of waiting
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            if self._process.stderr is not None:
                self._process.stderr.close()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    @property
    def data_dir(self) -> Path:
        assert self._root is not None
        return self._root / "data"

    def url(self, database: str, *, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=SUPERUSER,
            password=self.password,
            dbname=database,
            **kwargs,
        )

    def new_database(self) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        self._databases += 1
        name = f"test_{os.getpid()}_{self._databases}"
        with self.connect(autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def disk_bytes(self, database: str) -> bytes:
        """Every byte ``database`` has on disk, after a CHECKPOINT: its data files and the write-ahead log."""
        self.checkpoint()
        with self.connect() as connection:
            row = connection.execute("SELECT oid FROM pg_database WHERE datname = %s", (database,)).fetchone()
        assert row is not None, "no such database"
        files = [*(self.data_dir / "base" / str(row[0])).iterdir(), *(self.data_dir / "pg_wal").glob("0*")]
        return b"".join(path.read_bytes() for path in files if path.is_file())

    def checkpoint(self) -> None:
        """Write every dirty page to the data files (so tests can read what is on disk)."""
        with self.connect(autocommit=True) as connection:
            connection.execute("CHECKPOINT")

    def _run(self, argv: list[str]) -> None:
        result = subprocess.run(argv, capture_output=True, user=self._user, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed: {result.stderr.decode(errors='replace')[-2000:]}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                stderr = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
                raise RuntimeError(f"postgres exited: {stderr[-2000:]}")
            with contextlib.suppress(psycopg.OperationalError):
                self.connect(connect_timeout=2).close()
                return
            time.sleep(0.1)
        raise RuntimeError("postgres did not accept connections within 60 s")


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server
