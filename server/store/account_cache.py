"""A short-lived, in-process cache of opened accounts, so a burst of mail calls does not pay a store round trip
(a thread hop, the SQL, unwrapping the data key and opening the sealed profile) on every call.

Safe by construction inside one process: :class:`Writes` wraps the store's write engine and empties the cache after
every write transaction, whatever it changed (state, capabilities, a new grant, erasure), and a lookup that raced
with a write is not cached (a generation counter). Across processes (several replicas on one PostgreSQL, or the CLI)
a change is seen within ``ttl`` seconds at most; negative answers (no such account) are never cached.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import Connection, Engine

from server.domain.models import Account

DEFAULT_TTL = 2.0
MAX_ENTRIES = 10_000


class AccountCache:
    def __init__(self, ttl: float = DEFAULT_TTL) -> None:
        self._ttl = ttl
        self._entries: dict[str, tuple[float, Account]] = {}
        self._generation = 0
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        """Read before a lookup and passed to :meth:`put`, so a write meanwhile keeps its result out."""
        return self._generation

    def get(self, tenant: str, account_id: str) -> Account | None:
        """The cached account if it is fresh and the tenant's own; None means "ask the store"."""
        entry = self._entries.get(account_id)
        if entry is None or entry[0] <= time.monotonic() or entry[1].tenant != tenant:
            return None
        return entry[1]

    def put(self, account: Account, generation: int) -> None:
        if self._ttl <= 0:
            return
        with self._lock:
            if generation != self._generation:
                return
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[account.id] = (time.monotonic() + self._ttl, account)

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()


class Writes:
    """The store's engine for writes: ``begin()`` as the engine's, and the account cache emptied once the
    transaction is over (committed or rolled back)."""

    def __init__(self, engine: Engine, cache: AccountCache) -> None:
        self._engine = engine
        self._cache = cache

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        try:
            with self._engine.begin() as connection:
                yield connection
        finally:
            self._cache.clear()
