"""The store's short-lived cache of opened accounts: a hit needs no I/O, and no write is ever hidden by it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from server.domain.models import AccountState, Capability
from server.store.account_cache import AccountCache
from server.store.engine import create_engine
from server.store.migrate import upgrade
from server.store.repository import Store
from tests.unit.test_store import make_account, new_keyring


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'broker.sqlite3'}")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine: Engine) -> Store:
    return Store(engine, new_keyring(1))


def test_a_looked_up_account_is_cached_for_its_tenant_only(store: Store) -> None:
    account = make_account("tenant-a")
    store.create_account(account, {"imap_password": b"pw"})
    assert store.cached_account("tenant-a", account.id) is None  # never looked up yet
    assert store.get_account("tenant-a", account.id) == account
    assert store.cached_account("tenant-a", account.id) == account
    assert store.cached_account("tenant-b", account.id) is None


def test_missing_accounts_are_not_cached(store: Store) -> None:
    assert store.get_account("tenant-a", "nope") is None
    assert store.cached_account("tenant-a", "nope") is None


@pytest.mark.parametrize(
    "change",
    [
        lambda s, a: s.update_account_state(a.id, AccountState.NEEDS_REAUTH),
        lambda s, a: s.update_capabilities(a.id, frozenset({Capability.METADATA})),
        lambda s, a: s.delete_account(a.id),
        lambda s, a: s.write_secret(a.id, "imap_password", b"new"),
    ],
    ids=["state", "capabilities", "erasure", "secret"],
)
def test_every_write_empties_the_cache(store: Store, change: object) -> None:
    account = make_account("tenant-a")
    store.create_account(account, {"imap_password": b"pw"})
    store.get_account("tenant-a", account.id)
    change(store, account)  # type: ignore[operator]
    assert store.cached_account("tenant-a", account.id) is None


def test_erasure_is_seen_at_once(store: Store) -> None:
    account = make_account("tenant-a")
    store.create_account(account, {"imap_password": b"pw"})
    store.get_account("tenant-a", account.id)
    assert store.delete_account(account.id)
    assert store.cached_account("tenant-a", account.id) is None
    assert store.get_account("tenant-a", account.id) is None


def test_a_lookup_that_raced_a_write_is_not_cached() -> None:
    cache = AccountCache(60)
    account = make_account("tenant-a")
    generation = cache.generation  # a lookup starts ...
    cache.clear()  # ... a write ends meanwhile ...
    cache.put(account, generation)  # ... and its (maybe stale) result must not be kept
    assert cache.get("tenant-a", account.id) is None
    cache.put(account, cache.generation)
    assert cache.get("tenant-a", account.id) == account


def test_entries_expire() -> None:
    cache = AccountCache(0.0)
    account = make_account("tenant-a")
    cache.put(account, cache.generation)
    assert cache.get("tenant-a", account.id) is None
