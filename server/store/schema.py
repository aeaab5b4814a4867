"""The store's tables (SQLAlchemy Core), portable across SQLite and PostgreSQL.

Every personal or secret value is a sealed blob (``LargeBinary``): see :mod:`server.store.repository`. Times are
timezone-aware UTC datetimes (:class:`UTCDateTime`). Constraint names follow ``metadata.naming_convention`` so
that migrations can refer to them on every backend.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

# The layout of sealed values, bound into their AAD. Bump it only with a migration that re-seals every value.
SCHEMA_VERSION = 1

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite keeps no offset, so one is put back on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Refuse naive datetimes and store aware ones in UTC."""
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("the store takes timezone-aware datetimes only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return the stored time as an aware UTC datetime."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _account_fk() -> ForeignKey:
    return ForeignKey("accounts.id", ondelete="CASCADE")


accounts = Table(
    "accounts",
    metadata,
    Column("id", String, primary_key=True),
    Column("tenant", String, nullable=False),
    Column("provider", String, nullable=False),
    Column("state", String, nullable=False),
    Column("capabilities", String, nullable=False),  # comma-separated sorted Capability values
    Column("profile", LargeBinary, nullable=False),  # sealed JSON of AccountProfile
    Column("create_time", UTCDateTime, nullable=False),
    Column("update_time", UTCDateTime, nullable=False),
    Column("needs_reauth_since", UTCDateTime, nullable=True),
    # (tenant, id) serves both "accounts of a tenant" and its keyset pagination ordered by id.
    Index(None, "tenant", "id"),
)

data_keys = Table(
    "data_keys",
    metadata,
    Column("account_id", String, _account_fk(), primary_key=True),
    Column("kek_version", Integer, nullable=False),
    Column("wrapped", LargeBinary, nullable=False),
    Column("create_time", UTCDateTime, nullable=False),
)

account_secrets = Table(
    "account_secrets",
    metadata,
    Column("account_id", String, _account_fk(), primary_key=True),
    Column("imap_password", LargeBinary, nullable=True),
    Column("refresh_token", LargeBinary, nullable=True),
    Column("token_cache", LargeBinary, nullable=True),
    Column("update_time", UTCDateTime, nullable=False),
    # Bumped by every token refresh, under the row's lock (see Store.refresh_lock): how replicas single-flight.
    Column("token_generation", Integer, nullable=False, server_default="0"),
    Column("token_refresh_time", UTCDateTime, nullable=True),
)

oauth_states = Table(
    "oauth_states",
    metadata,
    Column("id", String, primary_key=True),  # SHA-256 hex of the opaque state; the state itself is never stored
    Column("tenant", String, nullable=False),
    Column("caller", String, nullable=False),
    Column("provider", String, nullable=False),
    Column("account_id", String, nullable=True),  # no FK: the account may not exist yet
    Column("kek_version", Integer, nullable=False),
    Column("payload", LargeBinary, nullable=False),  # sealed with the KEK directly
    Column("create_time", UTCDateTime, nullable=False),
    Column("expire_time", UTCDateTime, nullable=False),
    Index(None, "account_id"),
)

consents = Table(
    "consents",
    metadata,
    Column("id", String, primary_key=True),
    Column("account_id", String, _account_fk(), nullable=False),
    Column("tenant", String, nullable=False),
    Column("provider", String, nullable=False),
    Column("scopes", String, nullable=False),
    Column("capabilities", String, nullable=False),
    Column("grant_time", UTCDateTime, nullable=False),
    Index(None, "account_id"),
)

feed_cursors = Table(
    "feed_cursors",
    metadata,
    Column("account_id", String, _account_fk(), primary_key=True),
    Column("feed_key", String, primary_key=True),
    Column("cursor", LargeBinary, nullable=False),  # sealed
    Column("update_time", UTCDateTime, nullable=False),
)

idempotency_records = Table(
    "idempotency_records",
    metadata,
    Column("account_id", String, _account_fk(), primary_key=True),
    Column("request_digest", String, primary_key=True),
    Column("result", LargeBinary, nullable=False),  # sealed
    Column("create_time", UTCDateTime, nullable=False),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("sequence", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String, nullable=False, unique=True),
    Column("event_time", UTCDateTime, nullable=False),
    Column("action", String, nullable=False),
    Column("tenant", String, nullable=False),
    Column("actor", String, nullable=False),
    Column("account_id", String, nullable=False),  # no FK: the record outlives the account
    Column("details", Text, nullable=False),  # canonical JSON, PII-free
    Column("previous_digest", String, nullable=False),
    Column("digest", String, nullable=False),
    Index(None, "tenant", "sequence"),
    Index(None, "account_id", "sequence"),
)
