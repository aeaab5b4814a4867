"""Initial schema: accounts, data keys, sealed secrets, OAuth states, consents, cursors, idempotency, audit.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

A frozen copy of the tables as they were at this revision (not an import of schema.py, which moves on), with every
constraint named explicitly so later revisions can alter them on any backend.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _time(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _account_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["account_id"], ["accounts.id"], name=f"fk_{table}_account_id_accounts", ondelete="CASCADE"
    )


def upgrade() -> None:
    """Create every table."""
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("tenant", sa.String(), nullable=False),
        sa.Column("provider", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("capabilities", sa.String(), nullable=False),
        sa.Column("profile", sa.LargeBinary(), nullable=False),
        _time("create_time"),
        _time("update_time"),
        _time("needs_reauth_since", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_accounts"),
    )
    op.create_index("ix_accounts_tenant_id", "accounts", ["tenant", "id"])

    op.create_table(
        "data_keys",
        sa.Column("account_id", sa.String(), nullable=False),
        sa.Column("kek_version", sa.Integer(), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        _time("create_time"),
        sa.PrimaryKeyConstraint("account_id", name="pk_data_keys"),
        _account_fk("data_keys"),
    )

    op.create_table(
        "account_secrets",
        sa.Column("account_id", sa.String(), nullable=False),
        sa.Column("imap_password", sa.LargeBinary(), nullable=True),
        sa.Column("refresh_token", sa.LargeBinary(), nullable=True),
        sa.Column("token_cache", sa.LargeBinary(), nullable=True),
        _time("update_time"),
        sa.PrimaryKeyConstraint("account_id", name="pk_account_secrets"),
        _account_fk("account_secrets"),
    )

    op.create_table(
        "oauth_states",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("tenant", sa.String(), nullable=False),
        sa.Column("caller", sa.String(), nullable=False),
        sa.Column("provider", sa.String(), nullable=False),
        sa.Column("account_id", sa.String(), nullable=True),
        sa.Column("kek_version", sa.Integer(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        _time("create_time"),
        _time("expire_time"),
        sa.PrimaryKeyConstraint("id", name="pk_oauth_states"),
    )
    op.create_index("ix_oauth_states_account_id", "oauth_states", ["account_id"])

    op.create_table(
        "consents",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("account_id", sa.String(), nullable=False),
        sa.Column("tenant", sa.String(), nullable=False),
        sa.Column("provider", sa.String(), nullable=False),
        sa.Column("scopes", sa.String(), nullable=False),
        sa.Column("capabilities", sa.String(), nullable=False),
        _time("grant_time"),
        sa.PrimaryKeyConstraint("id", name="pk_consents"),
        _account_fk("consents"),
    )
    op.create_index("ix_consents_account_id", "consents", ["account_id"])

    op.create_table(
        "feed_cursors",
        sa.Column("account_id", sa.String(), nullable=False),
        sa.Column("feed_key", sa.String(), nullable=False),
        sa.Column("cursor", sa.LargeBinary(), nullable=False),
        _time("update_time"),
        sa.PrimaryKeyConstraint("account_id", "feed_key", name="pk_feed_cursors"),
        _account_fk("feed_cursors"),
    )

    op.create_table(
        "idempotency_records",
        sa.Column("account_id", sa.String(), nullable=False),
        sa.Column("request_digest", sa.String(), nullable=False),
        sa.Column("result", sa.LargeBinary(), nullable=False),
        _time("create_time"),
        sa.PrimaryKeyConstraint("account_id", "request_digest", name="pk_idempotency_records"),
        _account_fk("idempotency_records"),
    )

    op.create_table(
        "audit_events",
        sa.Column("sequence", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(), nullable=False),
        _time("event_time"),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("tenant", sa.String(), nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("account_id", sa.String(), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("previous_digest", sa.String(), nullable=False),
        sa.Column("digest", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("sequence", name="pk_audit_events"),
        sa.UniqueConstraint("event_id", name="uq_audit_events_event_id"),
    )
    op.create_index("ix_audit_events_tenant_sequence", "audit_events", ["tenant", "sequence"])
    op.create_index("ix_audit_events_account_id_sequence", "audit_events", ["account_id", "sequence"])


def downgrade() -> None:
    """Drop every table (and so every stored secret)."""
    for table in (
        "audit_events",
        "idempotency_records",
        "feed_cursors",
        "consents",
        "oauth_states",
        "account_secrets",
        "data_keys",
        "accounts",
    ):
        op.drop_table(table)
