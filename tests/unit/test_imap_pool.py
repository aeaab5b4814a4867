"""The per-account IMAP pool: reuse, bounds, health checks, reconnects with backoff, and what it retries."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from server.domain.blocking import BlockingPool
from server.errors import NotFound, ProviderUnavailable, Unauthenticated
from server.providers.imap.connection import ConnectionLost
from server.providers.imap.pool import ImapPool, ImapSession


class FakeClient:
    """Stands in for a logged-in IMAPClient: counts NOOPs and logouts, can be made to fail."""

    def __init__(self) -> None:
        self.noops = 0
        self.logged_out = False
        self.broken = False

    def noop(self) -> None:
        self.noops += 1
        if self.broken:
            raise ConnectionLost()

    def logout(self) -> None:
        self.logged_out = True

    def shutdown(self) -> None:
        self.logged_out = True


class Connector:
    def __init__(self, failures: list[Exception] | None = None) -> None:
        self.failures = list(failures or [])
        self.made: list[FakeClient] = []
        self.lock = threading.Lock()

    def __call__(self) -> Any:
        with self.lock:
            if self.failures:
                raise self.failures.pop(0)
            client = FakeClient()
            self.made.append(client)
            return client


@pytest.fixture
def blocking() -> Iterator[BlockingPool]:
    pool = BlockingPool(8)
    yield pool
    pool.shutdown()


async def test_connections_are_reused(blocking: BlockingPool) -> None:
    connector = Connector()
    pool = ImapPool(connector, blocking, size=2)
    for _ in range(10):
        await pool.run(lambda s: None)
    assert len(connector.made) == 1
    await pool.close()
    assert connector.made[0].logged_out


async def test_concurrency_is_bounded_by_the_pool_size(blocking: BlockingPool) -> None:
    connector = Connector()
    pool = ImapPool(connector, blocking, size=3)
    active = 0
    peak = 0
    lock = threading.Lock()

    def work(session: ImapSession) -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        threading.Event().wait(0.02)
        with lock:
            active -= 1

    await asyncio.gather(*(pool.run(work) for _ in range(20)))
    assert peak == 3
    assert len(connector.made) == 3
    await pool.close()


async def test_a_lost_connection_is_replaced_and_other_errors_keep_it(blocking: BlockingPool) -> None:
    connector = Connector()
    pool = ImapPool(connector, blocking, size=1)
    attempts: list[int] = []

    def lose(session: ImapSession) -> None:
        attempts.append(id(session.client))
        raise ConnectionLost()

    def missing(session: ImapSession) -> None:
        raise NotFound("gone", reason="MESSAGE_NOT_FOUND")

    with pytest.raises(NotFound):
        await pool.run(missing)
    assert pool.idle == 1
    with pytest.raises(ConnectionLost):
        await pool.run(lose)
    # Retried once, on a fresh connection; both lost connections were discarded.
    assert len(attempts) == 2
    assert attempts[0] != attempts[1]
    assert pool.idle == 0
    assert connector.made[0].logged_out
    assert connector.made[1].logged_out
    await pool.run(lambda s: None)
    assert len(connector.made) == 3
    with pytest.raises(ConnectionLost):
        await pool.run(lose, retry_lost=False)
    assert len(attempts) == 3
    await pool.close()


async def test_idle_connections_are_health_checked_before_reuse(blocking: BlockingPool) -> None:
    connector = Connector()
    pool = ImapPool(connector, blocking, size=1, check_after=0.0)
    await pool.run(lambda s: None)
    first = connector.made[0]
    await pool.run(lambda s: None)
    assert first.noops == 1  # checked, found alive, reused
    first.broken = True
    await pool.run(lambda s: None)
    assert len(connector.made) == 2  # the dead one was discarded and replaced
    await pool.close()


async def test_transient_connect_failures_are_retried_with_backoff(blocking: BlockingPool) -> None:
    connector = Connector([ProviderUnavailable(reason="PROVIDER_UNREACHABLE")] * 2)
    pool = ImapPool(connector, blocking, size=1, attempts=3, backoff=0.01)
    await pool.run(lambda s: None)
    assert len(connector.made) == 1
    await pool.close()

    connector = Connector([ProviderUnavailable(reason="PROVIDER_UNREACHABLE")] * 3)
    pool = ImapPool(connector, blocking, size=1, attempts=3, backoff=0.01)
    with pytest.raises(ProviderUnavailable):
        await pool.run(lambda s: None)
    assert connector.failures == []  # all three attempts were made


async def test_bad_credentials_are_not_retried(blocking: BlockingPool) -> None:
    connector = Connector([Unauthenticated(reason="PROVIDER_AUTH_FAILED"), Unauthenticated()])
    pool = ImapPool(connector, blocking, size=1, attempts=3, backoff=0.01)
    with pytest.raises(Unauthenticated):
        await pool.run(lambda s: None)
    assert len(connector.failures) == 1  # one attempt only


async def test_work_runs_off_the_event_loop_thread(blocking: BlockingPool) -> None:
    pool = ImapPool(Connector(), blocking, size=1)
    loop_thread = threading.get_ident()
    thread = await pool.run(lambda s: threading.get_ident())
    assert thread != loop_thread
    await pool.close()


async def test_a_cancelled_call_never_lends_its_busy_connection_to_another(blocking: BlockingPool) -> None:
    connector = Connector()
    pool = ImapPool(connector, blocking, size=1)
    release = threading.Event()
    seen: list[int] = []

    def slow(session: ImapSession) -> None:
        seen.append(id(session.client))
        release.wait(5)

    first = asyncio.ensure_future(pool.run(slow))
    await asyncio.sleep(0.05)
    first.cancel()
    second = asyncio.ensure_future(pool.run(lambda s: seen.append(id(s.client))))
    await asyncio.sleep(0.05)
    assert not second.done()  # the slot stays taken while the cancelled call's thread still runs
    release.set()
    await second
    assert seen[0] != seen[1]  # the busy connection was retired, not handed over
    assert connector.made[0].logged_out
    await pool.close()


async def test_a_connection_that_opens_after_its_caller_was_cancelled_is_closed(blocking: BlockingPool) -> None:
    connecting, release = threading.Event(), threading.Event()
    made: list[FakeClient] = []

    def connect() -> Any:
        connecting.set()
        release.wait(10)
        made.append(FakeClient())
        return made[-1]

    pool = ImapPool(connect, blocking, size=1)
    call = asyncio.ensure_future(pool.run(lambda session: None))
    await asyncio.to_thread(connecting.wait, 10)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    release.set()  # the login completes in its thread after the caller has gone
    for _ in range(500):
        if made and made[0].logged_out:
            break
        await asyncio.sleep(0.01)
    assert made and made[0].logged_out, "the orphaned connection was left open"
    assert pool.idle == 0
