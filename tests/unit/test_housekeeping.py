"""The idempotency sweeper: records older than the retention go, younger ones stay; it sweeps at start-up."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

from server.crypto.keyring import Keyring
from server.domain.blocking import BlockingPool
from server.domain.housekeeping import IdempotencySweeper
from server.domain.models import Account, AccountProfile, AccountState, Capability, Provider
from server.store.engine import create_engine
from server.store.ids import new_account_id
from server.store.migrate import upgrade
from server.store.repository import Store

T0 = datetime(2026, 1, 1, tzinfo=UTC)


async def test_the_sweeper_drops_records_past_the_retention_from_its_first_sweep(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'store.db'}")
    upgrade(engine)
    now = [T0]
    store = Store(engine, Keyring(current_version=1, keys={1: secrets.token_bytes(32)}), clock=lambda: now[0])
    account = Account(
        id=new_account_id(),
        tenant="t",
        provider=Provider.IMAP,
        state=AccountState.ACTIVE,
        capabilities=frozenset({Capability.SEND}),
        profile=AccountProfile(email_address="", username="", imap_server=None, smtp_server=None),
        create_time=T0,
        update_time=T0,
    )
    store.create_account(account, {})
    store.claim_request(account.id, "day-old", "f")
    now[0] = T0 + timedelta(hours=20)
    store.claim_request(account.id, "recent", "f")
    now[0] = T0 + timedelta(hours=25)
    blocking = BlockingPool(1, "test-housekeeping")
    sweeper = IdempotencySweeper(store, blocking, retention=timedelta(hours=24), clock=lambda: now[0])
    sweeper.start()
    try:
        await sweeper.wait_for_sweeps(1)
    finally:
        await sweeper.stop()
        blocking.shutdown()
        engine.dispose()
    assert store.claim_request(account.id, "day-old", "f") is None  # gone: claimable again
    assert store.claim_request(account.id, "recent", "f") is not None  # still remembered
