"""The Gmail change feed of one label: ``history.list`` polled from a historyId, shared by every subscriber.

Cursor: ``{"h": "<historyId>"}`` — the feed resumes *after* that history record (Gmail returns the records after
``startHistoryId``). A historyId Gmail no longer keeps (404) gives an explicit ResyncRequired, never a silent skip.

Per record, for the watched label L: a message added with L, or L added to a message → MessageAdded; a message
deleted, or L removed from it → MessageDeleted; any other label change of a message carrying L (read, starred) →
MessageUpdated. Added and updated messages are read (metadata) when the event is made; one deleted since is
left to its own deletion record.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from server.domain.feeds import Subscriber, UpstreamBase
from server.domain.mail import (
    FeedEvent,
    Message,
    MessageAdded,
    MessageDeleted,
    MessageUpdated,
    MessageView,
    ResyncReason,
    ResyncRequired,
)
from server.errors import BrokerError, NotFound, ProviderUnavailable

if TYPE_CHECKING:
    from server.providers.google.gmail import GmailDriver

log = logging.getLogger("mailbroker.gmail.history")


def _cursor(history_id: int) -> dict[str, object]:
    return {"h": str(history_id)}


def _position(cursor: dict[str, object] | None) -> int | None:
    value = cursor.get("h") if isinstance(cursor, dict) else None
    if isinstance(value, str) and value.isdigit() and len(value) <= 20:
        return int(value)
    return None


@dataclass(frozen=True)
class _Batch:
    """What one poll of the account's history found: the records after ``start``, up to ``latest``."""

    start: int
    records: list[dict[str, Any]]
    latest: int


@dataclass(frozen=True)
class _Expired:
    """The poller's own position fell out of Gmail's history; it goes on from ``latest``."""

    latest: int


@dataclass(frozen=True)
class _Failed:
    error: BrokerError


class AccountHistory:
    """The one ``history.list`` poller of an account, shared by every label watcher of it (one per driver, and the
    broker keeps one driver per account). It runs while at least one watcher is registered."""

    def __init__(self, driver: GmailDriver, interval: float) -> None:
        self._driver = driver
        self._interval = interval
        self._watchers: dict[HistoryWatcher, asyncio.Queue[_Batch | _Expired | _Failed]] = {}
        self._task: asyncio.Task[None] | None = None
        self._position: int | None = None

    @property
    def position(self) -> int | None:
        return self._position

    def register(self, watcher: HistoryWatcher, position: int) -> asyncio.Queue[_Batch | _Expired | _Failed]:
        """Feed ``watcher`` from now on. A poller not yet polling starts from ``position`` (the watcher's own)."""
        queue: asyncio.Queue[_Batch | _Expired | _Failed] = asyncio.Queue()
        self._watchers[watcher] = queue
        if self._position is None:
            self._position = position
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return queue

    def unregister(self, watcher: HistoryWatcher) -> None:
        self._watchers.pop(watcher, None)
        if not self._watchers and self._task is not None:
            self._task.cancel()
            self._task = None

    def _send(self, item: _Batch | _Expired | _Failed) -> None:
        for queue in self._watchers.values():
            queue.put_nowait(item)

    async def _run(self) -> None:
        while True:
            try:
                await self._poll()
            except ProviderUnavailable as exc:
                log.info("history poll failed", extra={"reason": exc.reason, "component": "feeds"})
            except BrokerError as exc:
                self._position = None
                self._send(_Failed(exc))  # the grant is gone: every watcher ends its subscribers
            await asyncio.sleep(self._interval)

    async def _poll(self) -> None:
        if self._position is None:
            self._position = await self._driver.current_history_id()
        start = self._position
        try:
            records, latest = await self._driver.history_since(start)
        except NotFound:
            self._position = await self._driver.current_history_id()
            self._send(_Expired(self._position))
            return
        self._position = latest
        if records or latest != start:
            self._send(_Batch(start, records, latest))


class HistoryWatcher(UpstreamBase):
    """The feed of one label, fed by the account's :class:`AccountHistory`."""

    def __init__(self, driver: GmailDriver, label: str, history: AccountHistory) -> None:
        super().__init__()
        self.folder_id = label
        self._driver = driver
        self._history = history
        self._position = 0

    async def run(self) -> None:
        try:
            await self._driver.check_folder(self.folder_id, "folders")
            self._position = await self._driver.current_history_id()
        except BrokerError as exc:
            self.end_all(exc)  # never started: tell the subscribers rather than keep them waiting
            return
        batches = self._history.register(self, self._position)
        ahead = self._history.position
        try:
            while True:
                try:
                    if ahead is not None and ahead > self._position:
                        # The poller is past this watcher's start: the span between is read here, once.
                        await self._apply(_Batch(ahead, [], ahead))
                        ahead = None
                    await self._admit()
                    while not batches.empty():
                        if not await self._apply(batches.get_nowait()):
                            return
                except ProviderUnavailable as exc:
                    log.info("history read failed", extra={"reason": exc.reason, "component": "feeds"})
                except BrokerError as exc:
                    self.end_all(exc)  # the grant is gone or the label was deleted: the subscribers must act
                    return
                self._wake.clear()
                if self._joining or not batches.empty():
                    continue
                waiting = asyncio.ensure_future(batches.get())
                woken = asyncio.ensure_future(self._wake.wait())
                try:
                    done, _ = await asyncio.wait({waiting, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
                    if not waiting.done():
                        waiting.cancel()
                if waiting in done and not await self._apply(waiting.result()):
                    return
        finally:
            self._history.unregister(self)

    async def _apply(self, item: _Batch | _Expired | _Failed) -> bool:
        """Turn one item of the account's poller into events; False when the feed has ended."""
        if isinstance(item, _Failed):
            self.end_all(item.error)
            return False
        if isinstance(item, _Expired):
            self._position = item.latest
            self._broadcast([self._resync()])
            return True
        records = item.records
        if item.start > self._position:
            # This watcher started before the poller's last position: read the span between, so nothing is lost.
            try:
                missed, _ = await self._driver.history_since(self._position)
            except NotFound:
                self._position = item.latest
                self._broadcast([self._resync()])
                return True
            records = [r for r in missed if int(r.get("id", 0)) <= item.start] + records
        records = [r for r in records if int(r.get("id", 0)) > self._position]
        start, self._position = self._position, max(self._position, item.latest)
        events = await self._events(records, start)
        if events:
            self._broadcast(events)
        return True

    async def _admit(self) -> None:
        joining, self._joining = self._joining, []
        for subscriber, cursor in joining:
            if subscriber.ended:
                continue
            await self._catch_up(subscriber, cursor)
            if not subscriber.ended:
                if not subscriber.start.done():
                    subscriber.start.set_result(_cursor(self._position))
                self.subscribers.add(subscriber)

    async def _catch_up(self, subscriber: Subscriber, cursor: dict[str, object] | None) -> None:
        if cursor is None:
            return
        start = _position(cursor)
        if start is None or start > self._position:
            subscriber.deliver(self._resync(ResyncReason.GAP))
            return
        if start == self._position:
            return
        try:
            records, _ = await self._driver.history_since(start)
        except NotFound:
            subscriber.deliver(self._resync())
            return
        # Only up to where the live feed is: what comes after reaches this subscriber from the next poll.
        events = await self._events([r for r in records if int(r.get("id", 0)) <= self._position], start)
        subscriber.deliver_all(events, self.folder_id)

    def _resync(self, reason: ResyncReason = ResyncReason.CURSOR_EXPIRED) -> FeedEvent:
        return FeedEvent(ResyncRequired(reason, self.folder_id), _cursor(self._position), datetime.now(UTC))

    async def _events(self, records: list[dict[str, Any]], start: int) -> list[FeedEvent]:
        """The feed events of ``records`` (which follow ``start``). A record can hold several changes: only its last
        event carries the record's id; the ones before it carry the position before the record, so resuming from any
        of them replays the rest of the record (a repeat, never a loss)."""
        label = self.folder_id
        events: list[FeedEvent] = []
        now = datetime.now(UTC)
        previous = start
        for record in records:
            record_id = int(record.get("id", 0))
            changes = await self._changes(record, label)
            for index, change in enumerate(changes):
                position = record_id if index == len(changes) - 1 else previous
                events.append(FeedEvent(change, _cursor(position), now))
            previous = max(previous, record_id)
        return events

    async def _changes(self, record: dict[str, Any], label: str) -> list[Any]:
        changes: list[Any] = []
        for item in record.get("messagesAdded", []) or []:
            message = item.get("message", {})
            if label in (message.get("labelIds") or []):
                read = await self._read(message.get("id", ""))
                if read is not None:
                    changes.append(MessageAdded(read))
        for item in record.get("labelsAdded", []) or []:
            message = item.get("message", {})
            if label in (item.get("labelIds") or []):
                read = await self._read(message.get("id", ""))
                if read is not None:
                    changes.append(MessageAdded(read))
            elif label in (message.get("labelIds") or []):
                read = await self._read(message.get("id", ""))
                if read is not None:
                    changes.append(MessageUpdated(read))
        for item in record.get("labelsRemoved", []) or []:
            message = item.get("message", {})
            if label in (item.get("labelIds") or []):
                changes.append(MessageDeleted(str(message.get("id", ""))))
            elif label in (message.get("labelIds") or []):
                read = await self._read(message.get("id", ""))
                if read is not None:
                    changes.append(MessageUpdated(read))
        for item in record.get("messagesDeleted", []) or []:
            message = item.get("message", {})
            labels = message.get("labelIds")
            if labels is None or label in labels:
                changes.append(MessageDeleted(str(message.get("id", ""))))
        return changes

    async def _read(self, message_id: str) -> Message | None:
        try:
            return await self._driver.get_message(str(message_id), MessageView.METADATA)
        except NotFound:
            return None
