"""Upkeep of the store while the broker runs: idempotency records are kept for a retention period, then dropped.

A SendMessage ``request_id`` protects a retry for ``[mail] idempotency_retention_hours`` (default 24): within it a
retry gets the first result; after it the record is gone, with the sealed result it held (the sent message's ids),
and the same ``request_id`` would send again. On several replicas each one sweeps; the deletes are idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from server.domain.blocking import BlockingPool
from server.domain.periodic import Periodic
from server.store.repository import Store

log = logging.getLogger("mailbroker.housekeeping")

# Swept this often at most (and at least four times per retention period).
MAX_SWEEP_SECONDS = 3600.0


def _now() -> datetime:
    return datetime.now(UTC)


class IdempotencySweeper(Periodic):
    name = "idempotency-sweep"

    def __init__(
        self,
        store: Store,
        blocking: BlockingPool,
        *,
        retention: timedelta,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        super().__init__(min(MAX_SWEEP_SECONDS, retention.total_seconds() / 4))
        self._store = store
        self._blocking = blocking
        self._retention = retention
        self._clock = clock

    async def sweep(self) -> int:
        """Drop the records older than the retention; return how many."""
        purged = await self._blocking.run(self._store.purge_requests, self._clock() - self._retention)
        if purged:
            log.info("idempotency records expired", extra={"event": "idempotency_purged", "count": purged})
        return purged
