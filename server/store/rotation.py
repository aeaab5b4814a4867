"""Key-encryption-key rotation over the store: what each KEK version still wraps, and rewrapping data keys.

Envelope encryption makes rotation cheap and safe online: only the small wrapped data keys change; every secret,
profile, cursor and idempotency record stays sealed with the same data key, so nothing else is re-encrypted and a
reader holding either the old or the new wrapping of a row gets the same data key. Each row is rewritten by a
compare-and-set (account, old version, old blob), so a row deleted or changed meanwhile is simply skipped, and
batches keep SQLite's write lock for milliseconds at a time while the broker keeps serving.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Engine

from server.crypto.datakeys import unwrap_data_key, wrap_data_key
from server.crypto.keyring import Keyring
from server.store.engine import WRITE_INTENT
from server.store.schema import data_keys, oauth_states


@dataclass(frozen=True)
class KekUsage:
    """How many rows each KEK version wraps: account data keys, and pending OAuth states (sealed with a KEK)."""

    data_keys: dict[int, int]
    oauth_states: dict[int, int]

    def total(self, version: int) -> int:
        return self.data_keys.get(version, 0) + self.oauth_states.get(version, 0)


def kek_usage(engine: Engine) -> KekUsage:
    """Count the rows wrapped by each KEK version."""
    with engine.connect() as connection:
        counts = [
            {
                int(version): int(count)
                for version, count in connection.execute(
                    select(table.c.kek_version, func.count()).group_by(table.c.kek_version)
                )
            }
            for table in (data_keys, oauth_states)
        ]
    return KekUsage(data_keys=counts[0], oauth_states=counts[1])


def rewrap_data_keys(engine: Engine, keyring: Keyring, *, batch_size: int = 200) -> int:
    """Rewrap every data key that is not under the keyring's current KEK; return how many rows were rewritten.

    Passes repeat until none is left, so a data key wrapped with an old version by a broker that had not yet seen
    the new key file is caught by the next pass.
    """
    writer = engine.execution_options(**{WRITE_INTENT: True})
    rewrapped = 0
    while True:
        current, _ = keyring.current()
        with engine.connect() as connection:
            rows = connection.execute(
                select(data_keys.c.account_id, data_keys.c.kek_version, data_keys.c.wrapped)
                .where(data_keys.c.kek_version != current)
                .order_by(data_keys.c.account_id)
                .limit(batch_size)
            ).all()
        if not rows:
            return rewrapped
        with writer.begin() as connection:
            for row in rows:
                dek = unwrap_data_key(keyring, row.account_id, row.kek_version, row.wrapped)
                version, wrapped = wrap_data_key(keyring, row.account_id, dek)
                rewrapped += connection.execute(
                    update(data_keys)
                    .where(
                        data_keys.c.account_id == row.account_id,
                        data_keys.c.kek_version == row.kek_version,
                        data_keys.c.wrapped == row.wrapped,
                    )
                    .values(kek_version=version, wrapped=wrapped)
                ).rowcount


def delete_expired_oauth_states(engine: Engine, kek_version: int, now: datetime) -> int:
    """Delete OAuth states sealed with ``kek_version`` that expired before ``now`` (they can never be used)."""
    writer = engine.execution_options(**{WRITE_INTENT: True})
    with writer.begin() as connection:
        statement = delete(oauth_states).where(
            oauth_states.c.kek_version == kek_version, oauth_states.c.expire_time < now
        )
        return connection.execute(statement).rowcount
