"""Cross-replica token refresh: a generation counter and the time of the last refresh on each account's secrets.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Replicas serialise refreshes of one account on its ``account_secrets`` row (``SELECT ... FOR UPDATE``); the counter
tells a replica that waited for the lock that another one has refreshed meanwhile, and when.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("account_secrets") as batch:
        batch.add_column(sa.Column("token_generation", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("token_refresh_time", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("account_secrets") as batch:
        batch.drop_column("token_refresh_time")
        batch.drop_column("token_generation")
