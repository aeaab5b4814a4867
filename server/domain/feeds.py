"""Change-feed fan-out: one upstream watcher per watched (account, folder) per process, shared by every
subscriber, each subscriber with its own bounded queue.

A watcher is provider code that implements :class:`Upstream`; the hub starts it on the first subscriber,
stops it after the last one leaves, and ends every subscriber when the account is erased. A subscriber that
falls too far behind is ended (it resumes from its last resume token), never silently skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from server.domain.mail import FeedEvent
from server.errors import BrokerError, ResourceExhausted

log = logging.getLogger("mailbroker.feeds")

SUBSCRIBER_QUEUE = 1000


class FeedEnded(Exception):
    """Put on a subscriber's queue to end its stream with ``error``."""

    def __init__(self, error: BrokerError) -> None:
        super().__init__(error.reason)
        self.error = error


@dataclass(eq=False)
class Subscriber:
    """One WatchMailbox stream's view of one folder watcher."""

    queue: asyncio.Queue[FeedEvent | FeedEnded] = field(default_factory=lambda: asyncio.Queue(SUBSCRIBER_QUEUE))
    start: asyncio.Future[dict[str, object]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    ended: bool = False

    def deliver(self, event: FeedEvent) -> None:
        if self.ended:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.end(
                ResourceExhausted(
                    "the feed consumer fell behind; resume from the last token", reason="FEED_CONSUMER_TOO_SLOW"
                )
            )

    def end(self, error: BrokerError) -> None:
        if self.ended:
            return
        self.ended = True
        # Make room: the end must be seen even by a subscriber whose queue is full.
        while self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(FeedEnded(error))
        if not self.start.done():
            self.start.set_exception(error)


class Upstream(Protocol):
    """A provider's watcher for one folder of one account."""

    def join(self, subscriber: Subscriber, cursor: dict[str, object] | None) -> None:
        """Admit a subscriber: replay what it missed since ``cursor``, then live events; resolve
        ``subscriber.start`` with the cursor it starts from."""

    def leave(self, subscriber: Subscriber) -> None: ...

    @property
    def idle(self) -> bool:
        """No subscriber left."""
        ...

    async def run(self) -> None:
        """Watch until cancelled; on a fatal error end every subscriber and return."""
        ...


@dataclass
class _Running:
    upstream: Upstream
    task: asyncio.Task[None]


class FeedHub:
    """Shares one upstream per (account, folder) between all its subscribers in this process."""

    def __init__(self) -> None:
        self._running: dict[tuple[str, str], _Running] = {}
        # Every watcher task until it has finished, cancelled ones included, so shutdown can wait for their
        # connections to close.
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def watched_accounts(self) -> int:
        return len({account for account, _ in self._running})

    def subscribe(
        self,
        account_id: str,
        folder: str,
        factory: Callable[[], Upstream],
        cursor: dict[str, object] | None,
    ) -> Subscriber:
        key = (account_id, folder)
        running = self._running.get(key)
        if running is None or running.task.done():
            upstream = factory()
            task = asyncio.get_running_loop().create_task(self._run(key, upstream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            running = _Running(upstream, task)
            self._running[key] = running
        subscriber = Subscriber()
        running.upstream.join(subscriber, cursor)
        return subscriber

    async def _run(self, key: tuple[str, str], upstream: Upstream) -> None:
        try:
            await upstream.run()
        finally:
            current = self._running.get(key)
            if current is not None and current.upstream is upstream:
                del self._running[key]

    def unsubscribe(self, account_id: str, folder: str, subscriber: Subscriber) -> None:
        subscriber.ended = True
        running = self._running.get((account_id, folder))
        if running is None:
            return
        running.upstream.leave(subscriber)
        if running.upstream.idle:
            running.task.cancel()
            del self._running[(account_id, folder)]

    async def close_account(self, account_id: str, error: BrokerError) -> int:
        """End every feed of an account (erasure); returns how many watchers were stopped."""
        keys = [key for key in self._running if key[0] == account_id]
        for key in keys:
            running = self._running.pop(key)
            for subscriber in list(getattr(running.upstream, "subscribers", ())):
                subscriber.end(error)
            running.task.cancel()
        return len(keys)

    async def close(self) -> None:
        self._running = {}
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):  # shutting down: nothing left to tell
                await task
