"""Change-feed fan-out: one upstream watcher per watched (account, folder) per process, shared by every
subscriber, each subscriber with its own bounded queue.

A watcher is provider code that implements :class:`Upstream`; the hub starts it on the first subscriber,
stops it after the last one leaves, and ends every subscriber when the account is erased. A subscriber that
falls too far behind is ended (it resumes from its last resume token), never silently skipped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import hashlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from server.domain.mail import FeedEvent, Folder, FolderAdded, FolderDeleted, ResyncReason, ResyncRequired
from server.errors import BrokerError, ProviderUnavailable, ResourceExhausted

log = logging.getLogger("mailbroker.feeds")

SUBSCRIBER_QUEUE = 1000
# gc.freeze() once watchers stop starting (this long after the last new one), when this many more run than at the
# last freeze: see FeedHub._settle_gc.
GC_SETTLE_SECONDS = 5.0
GC_FREEZE_GROWTH = 100


class FeedEnded(Exception):
    """Put on a subscriber's queue to end its stream with ``error``."""

    def __init__(self, error: BrokerError) -> None:
        super().__init__(error.reason)
        self.error = error


class FeedQueue:
    """A subscriber's bounded FIFO: the part of asyncio.Queue's interface feeds use, at a fraction of its memory
    (asyncio.Queue holds three deques and an Event even when empty, and 10,000 WatchMailbox streams hold two queues
    each; this one makes its deque on the first item). ``put_nowait`` raises asyncio.QueueFull, ``get_nowait``
    asyncio.QueueEmpty, as asyncio.Queue's do."""

    __slots__ = ("_items", "_waiter", "maxsize")

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: collections.deque[FeedEvent | FeedEnded] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def qsize(self) -> int:
        return len(self._items) if self._items is not None else 0

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: FeedEvent | FeedEnded) -> None:
        if self._items is None:
            self._items = collections.deque()
        elif len(self._items) >= self.maxsize:
            raise asyncio.QueueFull
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def get_nowait(self) -> FeedEvent | FeedEnded:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    async def get(self) -> FeedEvent | FeedEnded:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class Wake:
    """A flag a task can wait for, like asyncio.Event for one waiter (without Event's deque of waiters)."""

    __slots__ = ("_is_set", "_waiter")

    def __init__(self) -> None:
        self._is_set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._is_set = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def clear(self) -> None:
        self._is_set = False

    async def wait(self) -> None:
        if self._is_set:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


@dataclass(eq=False)
class Subscriber:
    """One WatchMailbox stream's view of one folder watcher."""

    queue: FeedQueue = field(default_factory=lambda: FeedQueue(SUBSCRIBER_QUEUE))
    start: asyncio.Future[dict[str, object]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    ended: bool = False
    # Set whenever something is queued: a stream reading several subscribers waits on one event they share rather
    # than on a task per queue (bench: 10,000 WatchMailbox streams on one process).
    wake: Wake | None = None

    def deliver(self, event: FeedEvent) -> None:
        if self.ended:
            return
        try:
            self.queue.put_nowait(event)
            if self.wake is not None:
                self.wake.set()
        except asyncio.QueueFull:
            self.end(
                ResourceExhausted(
                    "the feed consumer fell behind; resume from the last token", reason="FEED_CONSUMER_TOO_SLOW"
                )
            )

    def deliver_all(self, events: list[FeedEvent], folder_id: str) -> None:
        """Queue a batch, or, when it cannot fit, one ResyncRequired that carries the batch's final cursor: the
        consumer lists afresh rather than losing the part that did not fit."""
        if self.ended or not events:
            return
        if len(events) > self.queue.maxsize - self.queue.qsize():
            last = events[-1]
            events = [FeedEvent(ResyncRequired(ResyncReason.GAP, folder_id), last.cursor, last.observe_time)]
        for event in events:
            self.deliver(event)

    def end(self, error: BrokerError, final: FeedEvent | None = None) -> None:
        """End the stream with ``error``, after ``final`` (a position-less event, such as AccountStateChanged)."""
        if self.ended:
            return
        self.ended = True
        # Drop everything still queued, not only enough to make room: the consumer's last resume token is then
        # from before all of it, so resuming replays it. Dropping only the oldest would leave a hole.
        while not self.queue.empty():
            self.queue.get_nowait()
        if final is not None:
            self.queue.put_nowait(final)
        self.queue.put_nowait(FeedEnded(error))
        if self.wake is not None:
            self.wake.set()
        if not self.start.done():
            self.start.set_exception(error)


class Upstream(Protocol):
    """A provider's watcher for one folder of one account."""

    def join(self, subscriber: Subscriber, cursor: dict[str, object] | None) -> None:
        """Admit a subscriber: replay what it missed since ``cursor``, then live events; resolve
        ``subscriber.start`` with the cursor it starts from."""

    def leave(self, subscriber: Subscriber) -> None: ...

    def end_all(self, error: BrokerError, final: FeedEvent | None = None) -> None:
        """End every subscriber's stream with ``error`` (erasure, a credential the provider refused), after
        ``final`` when given."""

    @property
    def idle(self) -> bool:
        """No subscriber left."""
        ...

    async def run(self) -> None:
        """Watch until cancelled; on a fatal error end every subscriber and return."""
        ...


class UpstreamBase:
    """The subscriber bookkeeping every Upstream shares. A subclass's ``run`` admits ``_joining`` subscribers
    from its own task (so a catch-up and the live events cannot interleave) and is woken by ``_wake``."""

    folder_id = ""  # the folder this upstream watches, for ResyncRequired events ("" for account-wide ones)

    def __init__(self) -> None:
        self.subscribers: set[Subscriber] = set()
        self._joining: list[tuple[Subscriber, dict[str, object] | None]] = []
        self._wake = asyncio.Event()

    def join(self, subscriber: Subscriber, cursor: dict[str, object] | None) -> None:
        self._joining.append((subscriber, cursor))
        self._wake.set()

    def leave(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)
        self._joining = [(s, c) for s, c in self._joining if s is not subscriber]

    @property
    def idle(self) -> bool:
        return not self.subscribers and not self._joining

    def end_all(self, error: BrokerError, final: FeedEvent | None = None) -> None:
        """End every subscriber's stream with ``error``, after ``final`` when given."""
        for subscriber in [*self.subscribers, *(s for s, _ in self._joining)]:
            subscriber.end(error, final)
        self.subscribers.clear()
        self._joining.clear()

    def _broadcast(self, events: list[FeedEvent]) -> None:
        for subscriber in list(self.subscribers):
            subscriber.deliver_all(events, self.folder_id)
            if subscriber.ended:
                self.subscribers.discard(subscriber)


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
        self._frozen_at = 0  # watchers running at the last gc.freeze()
        self._gc_settle: asyncio.TimerHandle | None = None

    def _settle_gc(self) -> None:
        """A watcher's objects live as long as it does, and at 1,000 feeds the GC's full collections over them
        stalled the event loop for 0.4-1.5 s (bench --probe). So once watchers stop starting, with many more running
        than at the last freeze, everything alive moves into the GC's permanent generation (gc.freeze; reference
        counting still frees it); when fewer than half as many run again, it is unfrozen."""
        if self._gc_settle is not None:
            self._gc_settle.cancel()

        def settle() -> None:
            self._gc_settle = None
            running = len(self._running)
            if running >= self._frozen_at + GC_FREEZE_GROWTH:
                gc.collect(1)  # the young generations' garbage first (cheap); it would never be collected after
                gc.freeze()
                self._frozen_at = running
            elif running < self._frozen_at // 2:
                gc.unfreeze()
                self._frozen_at = running

        self._gc_settle = asyncio.get_running_loop().call_later(GC_SETTLE_SECONDS, settle)

    @property
    def watched_accounts(self) -> int:
        # list() copies the keys in one C call: the metrics endpoint asks from its own thread.
        return len({account for account, _ in list(self._running)})

    def watched_account_ids(self) -> set[str]:
        return {account for account, _ in list(self._running)}

    @property
    def watchers(self) -> int:
        """Upstream watchers running, one per watched (account, folder)."""
        return len(self._running)

    def subscribe(
        self,
        account_id: str,
        folder: str,
        factory: Callable[[], Upstream],
        cursor: dict[str, object] | None,
        wake: Wake | None = None,
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
            self._settle_gc()
        subscriber = Subscriber(wake=wake)
        running.upstream.join(subscriber, cursor)
        return subscriber

    async def _run(self, key: tuple[str, str], upstream: Upstream) -> None:
        try:
            await upstream.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A watcher must never die silently: its subscribers would wait forever. They end, and resume.
            log.error("feed watcher failed", exc_info=True, extra={"component": "feeds"})
            upstream.end_all(
                ProviderUnavailable("the change feed failed; resume from the last token", reason="FEED_FAILED")
            )
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

    async def close_account(self, account_id: str, error: BrokerError, final: FeedEvent | None = None) -> int:
        """End every feed of an account (erasure, a refused grant), after ``final`` when given; returns how many
        watchers were stopped."""
        keys = [key for key in self._running if key[0] == account_id]
        for key in keys:
            running = self._running.pop(key)
            running.upstream.end_all(error, final)
            running.task.cancel()
        return len(keys)

    async def close(self) -> None:
        if self._gc_settle is not None:
            self._gc_settle.cancel()
        self._running = {}
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):  # shutting down: nothing left to tell
                await task


class FolderListWatcher(UpstreamBase):
    """Folder created/deleted events for one account, by polling its folder list (providers push no such events
    that all of them share). Cursor: ``{"d": digest of the folder ids}``; a subscriber resuming with another
    digest gets ResyncRequired (list the folders again), since the old list is not kept."""

    def __init__(self, list_folders: Callable[[], Awaitable[list[Folder]]], interval: float) -> None:
        super().__init__()
        self._list_folders = list_folders
        self._interval = interval
        self._folders: dict[str, Folder] | None = None

    def _cursor(self) -> dict[str, object]:
        assert self._folders is not None
        digest = hashlib.sha256("\0".join(sorted(self._folders)).encode()).hexdigest()[:32]
        return {"d": digest}

    async def run(self) -> None:
        while True:
            try:
                await self._poll()
            except BrokerError as exc:
                if self._folders is None:  # never listed: tell the subscribers instead of keeping them waiting
                    self.end_all(exc)
                    return
                log.info("folder poll failed", extra={"reason": exc.reason, "component": "feeds"})
            self._admit()
            self._wake.clear()
            # Jittered: watchers started together (a broker restart, a thousand clients resuming) would otherwise poll
            # in waves, a thousand LISTs at once, holding up every feed's reads for a second (bench --probe).
            wait = self._interval * random.uniform(0.75, 1.25)  # noqa: S311 - jitter, not crypto
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):  # not wait_for: see aioimap._readline
                    await self._wake.wait()

    async def _poll(self) -> None:
        current = {folder.id: folder for folder in await self._list_folders()}
        previous, self._folders = self._folders, current
        if previous is None:
            return
        now = datetime.now(UTC)
        events = [FeedEvent(FolderAdded(current[f]), self._cursor(), now) for f in sorted(current.keys() - previous)]
        events += [FeedEvent(FolderDeleted(f), self._cursor(), now) for f in sorted(previous.keys() - current)]
        self._broadcast(events)

    def _admit(self) -> None:
        joining, self._joining = self._joining, []
        for subscriber, cursor in joining:
            if subscriber.ended:
                continue
            if cursor is not None and cursor != self._cursor():
                subscriber.deliver(FeedEvent(ResyncRequired(ResyncReason.GAP), self._cursor(), datetime.now(UTC)))
            if not subscriber.start.done():
                subscriber.start.set_result(self._cursor())
            self.subscribers.add(subscriber)
