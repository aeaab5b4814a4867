"""Schema migrations, run programmatically (no alembic.ini) on a given engine."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError

from server.errors import ConfigurationError
from server.store.engine import WRITE_INTENT

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# PostgreSQL advisory lock key serialising migrations across replicas ("mbmigrat" as a 64-bit integer).
MIGRATION_LOCK = int.from_bytes(b"mbmigrat", "big") >> 1


def upgrade(engine: Engine) -> None:
    """Migrate the database behind ``engine`` to the newest revision, in one transaction; a no-op when current.

    Raises ConfigurationError when the database cannot be reached (the driver's message, which names the host, is
    not repeated).
    """
    try:
        _upgrade(engine)
    except OperationalError:
        raise ConfigurationError(
            "cannot open the database of store.url (is it running, and are its address and credentials right?)"
        ) from None


def _upgrade(engine: Engine) -> None:
    with engine.execution_options(**{WRITE_INTENT: True}).begin() as connection:
        if connection.dialect.name == "postgresql":
            # Replicas starting together: the first migrates, the others wait here and then find it current.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        command.upgrade(alembic_config(connection), "head")


def alembic_config(connection: Connection) -> Config:
    """Return an Alembic config for this package's migrations that runs on ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    config.attributes["connection"] = connection
    return config
