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
import contextlib
import logging
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


class HistoryWatcher(UpstreamBase):
    def __init__(self, driver: GmailDriver, label: str, interval: float) -> None:
        super().__init__()
        self.folder_id = label
        self._driver = driver
        self._interval = interval
        self._position = 0

    async def run(self) -> None:
        try:
            await self._driver.check_folder(self.folder_id, "folders")
            self._position = await self._driver.current_history_id()
        except BrokerError as exc:
            self.end_all(exc)  # never started: tell the subscribers rather than keep them waiting
            return
        while True:
            try:
                await self._poll()
                await self._admit()
            except ProviderUnavailable as exc:
                log.info("history poll failed", extra={"reason": exc.reason, "component": "feeds"})
            except BrokerError as exc:
                self.end_all(exc)  # the grant is gone or the label was deleted: the subscribers must act
                return
            self._wake.clear()
            if self._joining:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()

    async def _poll(self) -> None:
        try:
            records, latest = await self._driver.history_since(self._position)
        except NotFound:
            # Our own position fell out of Gmail's history (a long outage): every subscriber resynchronises.
            self._position = await self._driver.current_history_id()
            self._broadcast([self._resync()])
            return
        events = await self._events(records, self._position)
        self._position = latest
        if events:
            self._broadcast(events)

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
