"""Engines for the store: SQLite hardened on every connection, or PostgreSQL through psycopg 3.

This is the one module that speaks SQLite-only SQL. Two SQLite choices matter for security and correctness:

- ``secure_delete`` zeroes deleted content, and :func:`checkpoint_and_vacuum` then empties the WAL, so an erased
  account leaves no bytes behind on disk.
- sqlite3's legacy transaction mode skips BEGIN before SELECT, so a read-then-write would not be one transaction.
  SQLAlchemy emits BEGIN itself instead; a connection with the :data:`WRITE_INTENT` execution option starts with
  ``BEGIN IMMEDIATE``, taking the write lock up front (waiting up to busy_timeout) rather than failing with
  SQLITE_BUSY when it upgrades from a stale read snapshot.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError

from server.errors import ConfigurationError
from server.store.schema import audit_events, metadata

# Execution option: "this transaction will write". Other backends ignore it.
WRITE_INTENT = "mailbroker_write_intent"

_SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA secure_delete=ON",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=5000",
    "PRAGMA synchronous=NORMAL",
)


def create_engine(url: str, *, pool_size: int = 8) -> Engine:
    """Return an engine for ``url``; for a SQLite file, make its directory (0700) and file (0600) first.

    ``postgresql://`` means psycopg 3 (the one PostgreSQL driver the broker ships with). Raises
    ConfigurationError for a malformed URL or any other backend: the migrations and the locking in
    :mod:`server.store` are written for these two. The message never repeats the URL (it may hold a password).
    ``pool_size`` is how many PostgreSQL connections the engine keeps (a token refresh holds one for the whole
    call to the token endpoint, so a broker sizes it to its threads), and as many more may open under load.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigurationError("store.url is not a database URL (sqlite:///PATH or postgresql://...)") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        if parsed.drivername not in ("postgresql", "postgresql+psycopg"):
            raise ConfigurationError("store.url: PostgreSQL is reached through psycopg: postgresql://...")
        parsed = parsed.set(drivername="postgresql+psycopg")
        # pre_ping: a replica outlives database restarts and failovers without handing a dead connection to a call.
        return sqlalchemy.create_engine(parsed, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size)
    if backend != "sqlite":
        raise ConfigurationError("store.url: unsupported database (use sqlite:///PATH or postgresql://...)")
    path = _sqlite_file(parsed)
    if path is not None:
        _prepare_sqlite_file(path)
    engine = sqlalchemy.create_engine(parsed)
    event.listen(engine, "connect", _on_sqlite_connect)
    event.listen(engine, "begin", _on_sqlite_begin)
    return engine


def checkpoint_and_vacuum(engine: Engine) -> bool:
    """Fold the SQLite WAL into the database and truncate it; return False if a reader kept it from completing.

    With ``secure_delete`` on, deleted rows are already zeroed in the pages that replace them, so after this no
    deleted bytes remain in the database, its WAL or its shared-memory index. A full VACUUM is not run: it would
    copy the whole database through a temporary file and adds nothing to erasure.

    PostgreSQL cannot be made to forget bytes: a deleted row lives on as a dead tuple until VACUUM, VACUUM frees
    its space without zeroing it, and the write-ahead log and backups hold it too. There erasure rests on
    crypto-shredding (see the README): every leftover is ciphertext under the account's data key, which is itself
    wrapped by a KEK version that the operator retires. This runs a plain VACUUM of the account tables so dead
    tuples stop being readable through SQL as soon as possible, and returns True.
    """
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as autocommit:
            for table in metadata.sorted_tables:
                if table is not audit_events:  # every table that holds rows about an account
                    autocommit.exec_driver_sql(f"VACUUM {table.name}")
        return True
    if engine.dialect.name != "sqlite":
        return True
    # The raw DBAPI connection, because a checkpoint cannot run inside the transaction SQLAlchemy would begin.
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        row = cursor.fetchone()
        cursor.close()
    finally:
        connection.close()
    return row is not None and int(row[0]) == 0


def _sqlite_file(url: URL) -> Path | None:
    database = url.database
    if not database or database == ":memory:" or url.query.get("mode") == "memory" or database.startswith("file:"):
        return None
    return Path(database)


def _prepare_sqlite_file(path: Path) -> None:
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True)
        parent.chmod(0o700)  # mkdir's mode is narrowed by the umask, never widened; be exact
    # SQLite creates its WAL and shared-memory files with the database file's mode, so 0600 here covers all three.
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Hand transaction control to SQLAlchemy (see the module docstring); the PRAGMAs then run outside any
    # transaction, as journal_mode and foreign_keys require.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(pragma)
    finally:
        cursor.close()


def _on_sqlite_begin(connection: Connection) -> None:
    immediate = connection.get_execution_options().get(WRITE_INTENT, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
