"""A bounded pool of logged-in IMAP connections for one account: reused, health-checked, reconnecting with
exponential backoff and jitter. Each connection is used by one operation at a time, in a worker thread."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import re
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from imapclient import IMAPClient

from server.domain.blocking import BlockingPool
from server.errors import DeadlineExceeded, ProviderUnavailable
from server.providers.imap.connection import (
    ConnectionLost,
    abort_connection,
    close_imap,
    provider_errors,
    set_command_timeout,
)
from server.providers.stats import IMAP, ProviderStats

log = logging.getLogger("mailbroker.imap.pool")

T = TypeVar("T")
_FETCH_SEQ = re.compile(rb"^(\d+) \(")
# The server's reports that change the selected folder's numbering, kept in the order they arrived.
_TRACKED = frozenset({"EXISTS", "EXPUNGE"})


@dataclass
class ImapSession:
    """A pooled connection and what it has selected, so consecutive reads of one folder skip the SELECT.

    ``updates`` holds, in arrival order, every ``* n EXISTS``, ``* n EXPUNGE`` and the sequence number of every
    ``* n FETCH`` the server sent on this connection, whatever command it came with (imaplib files untagged
    responses by kind and so loses their order, which is what sequence-number bookkeeping needs). The driver
    consumes it to keep ``exists`` right and to tell that a message it just fetched was expunged meanwhile.
    """

    client: IMAPClient
    last_used: float = field(default_factory=time.monotonic)
    selected: tuple[str, bool] | None = None  # (folder, readonly)
    uidvalidity: int = 0
    exists: int = 0
    updates: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        imap = getattr(self.client, "_imap", None)
        original = getattr(type(imap), "_append_untagged", None)
        if imap is None or original is None:  # not a real connection (unit tests' fakes)
            return
        updates = self.updates
        connection = weakref.ref(imap)  # no reference cycle: the connection is freed (and closed) as before

        def record(typ: str, dat: Any) -> None:
            if typ in _TRACKED:
                with contextlib.suppress(TypeError, ValueError):
                    updates.append((typ, int(dat)))
            elif typ == "FETCH":
                head = dat[0] if isinstance(dat, tuple) else dat
                if isinstance(head, bytes) and (match := _FETCH_SEQ.match(head)) is not None:
                    updates.append((typ, int(match.group(1))))
            target = connection()
            if target is not None:
                original(target, typ, dat)

        imap._append_untagged = record  # imaplib's one entry point for untagged data (stdlib, stable)

    def take_updates(self, follow: int | None = None) -> bool:
        """Apply the pending reports to ``exists``; with ``follow`` (the sequence number a FETCH just reported for
        a message), also say whether an EXPUNGE after that FETCH removed that message."""
        updates, self.updates[:] = list(self.updates), []
        gone = False
        tracking = False
        for typ, number in updates:
            if typ == "EXISTS":
                self.exists = number
            elif typ == "EXPUNGE":
                self.exists = max(0, self.exists - 1)
                if tracking and follow is not None and not gone:
                    if number == follow:
                        gone = True
                    elif number < follow:
                        follow -= 1
            elif follow is not None and number == follow:
                tracking = True  # expunges reported before this FETCH were already counted in its number
        return gone


class ImapPool:
    """At most ``size`` connections; callers beyond that wait for one to come back."""

    def __init__(
        self,
        connect: Callable[[], IMAPClient],
        blocking: BlockingPool,
        *,
        size: int = 4,
        check_after: float = 30.0,
        attempts: int = 3,
        backoff: float = 0.2,
        backoff_cap: float = 2.0,
        command_timeout: float | None = None,
        stats: ProviderStats | None = None,
    ) -> None:
        self._connect = connect
        self._stats = stats if stats is not None else ProviderStats()
        self._command_timeout = command_timeout
        self._blocking = blocking
        self._slots = asyncio.Semaphore(size)
        self._idle: list[ImapSession] = []
        self._check_after = check_after
        self._attempts = attempts
        self._backoff = backoff
        self._backoff_cap = backoff_cap
        self._closed = False
        self._retiring: set[asyncio.Task[None]] = set()
        self.opened = 0  # connections opened over the pool's life (for tests and metrics)
        self.in_use = 0  # slots held: connections lent out or being opened (for metrics)

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def _open(self) -> ImapSession:
        for attempt in range(1, self._attempts + 1):
            connecting = self._blocking.submit(self._connect)
            try:
                client = await asyncio.shield(connecting)
            except asyncio.CancelledError:
                # The thread goes on connecting and logging in: the client it makes belongs to no one, so it is
                # closed as soon as it exists (left to the garbage collector, its TLS socket would stay open).
                connecting.add_done_callback(functools.partial(close_orphan, self._blocking))
                raise
            except ProviderUnavailable:
                # Only transient failures are retried; bad credentials or TLS trust fail at once.
                if attempt == self._attempts:
                    raise
                delay = min(self._backoff_cap, self._backoff * 2 ** (attempt - 1))
                log.info("imap connect retry", extra={"attempt": attempt, "component": "imap"})
                self._stats.retry(IMAP)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not crypto
                continue
            self.opened += 1
            return ImapSession(client)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _healthy(self, session: ImapSession) -> bool:
        if time.monotonic() - session.last_used < self._check_after:
            return True
        try:
            await self._blocking.run(_noop, session.client)
        except ProviderUnavailable:
            return False
        return True

    async def _checkout(self) -> ImapSession:
        while self._idle:
            candidate = self._idle.pop()
            if await self._healthy(candidate):
                return candidate
            _shutdown(candidate.client)  # it failed its health check: nothing polite to say to it
        return await self._open()

    async def run(self, fn: Callable[[ImapSession], T], *, retry_lost: bool = True) -> T:
        """Run ``fn(session)`` in a worker thread on a pooled connection, mapping provider errors.

        The connection goes back to the pool only when ``fn`` has finished with it. If the caller is cancelled
        (a deadline, a client gone), the worker thread still holds the connection: it is discarded, and its slot
        freed, once that thread is done, so no two threads ever share an IMAP connection.
        """
        with self._stats.counting(IMAP):
            try:
                return await self._run_once(fn)
            except ConnectionLost:
                # A pooled connection can die between uses (a server restart, an idle timeout, a folder deleted
                # under it); one retry on a fresh connection hides that. Not for operations that must not repeat.
                if not retry_lost:
                    raise
                self._stats.retry(IMAP)
                return await self._run_once(fn)

    async def _run_once(self, fn: Callable[[ImapSession], T]) -> T:
        if self._closed:
            raise ProviderUnavailable("the account's connections are closed", reason="ACCOUNT_CLOSED")
        await self._slots.acquire()
        self.in_use += 1
        try:
            session = await self._checkout()
        except BaseException:
            self.in_use -= 1
            self._slots.release()
            raise
        work = self._blocking.submit(_guarded, fn, session, self._command_timeout)
        try:
            result = await asyncio.shield(work)
        except asyncio.CancelledError:
            # The caller's deadline passed (or it went away): nothing may go on talking to the server for it.
            abort_connection(session.client)
            work.add_done_callback(lambda _: self._retire_later(session))
            raise
        except (ProviderUnavailable, DeadlineExceeded):  # a command may be half-done on it: cut it
            await self._release(session, broken=True)
            raise
        except BaseException:
            # A failure that is not about the connection (bad input, not found) leaves it usable.
            await self._release(session, broken=False)
            raise
        await self._release(session, broken=False)
        return result

    async def _release(self, session: ImapSession, *, broken: bool) -> None:
        session.last_used = time.monotonic()
        try:
            if broken:
                # A connection that failed or timed out mid-command is cut, not logged out: a server that stopped
                # answering would hold a polite LOGOUT (and this caller) for the whole command timeout.
                _shutdown(session.client)
            elif self._closed:
                await self._discard(session)
            else:
                self._idle.append(session)
        finally:
            self.in_use -= 1
            self._slots.release()

    def _retire_later(self, session: ImapSession) -> None:
        task = asyncio.get_running_loop().create_task(self._release(session, broken=True))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _discard(self, session: ImapSession) -> None:
        try:
            await self._blocking.run(close_imap, session.client)
        except RuntimeError:
            # The thread pool is shut down (the broker is stopping and a cancelled call's thread finished late):
            # closing without LOGOUT sends nothing and does not block.
            _shutdown(session.client)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for session in idle:
            await self._discard(session)


_orphans: set[asyncio.Task[None]] = set()  # closings under way (the loop keeps only weak references to tasks)


def close_orphan(blocking: BlockingPool, opening: asyncio.Future[IMAPClient]) -> None:
    """Done callback for a connection opened in a thread for a caller that was cancelled meanwhile: log it out and
    close it (its socket would otherwise stay open until the garbage collector finds it)."""
    if opening.cancelled() or opening.exception() is not None:
        return
    client = opening.result()

    async def close() -> None:
        try:
            await blocking.run(close_imap, client)
        except RuntimeError:  # the thread pool is shut down
            _shutdown(client)

    task = asyncio.get_running_loop().create_task(close())
    _orphans.add(task)
    task.add_done_callback(_orphans.discard)


def _shutdown(client: IMAPClient) -> None:
    """Close the socket without logging out (no I/O that could block)."""
    with contextlib.suppress(Exception):
        client.shutdown()


def _noop(client: IMAPClient) -> None:
    with provider_errors():
        client.noop()


def _guarded(fn: Callable[[ImapSession], T], session: ImapSession, timeout: float | None) -> T:
    with provider_errors():
        if timeout is not None:
            set_command_timeout(session.client, timeout)
        return fn(session)
