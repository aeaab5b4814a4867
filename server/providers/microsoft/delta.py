"""The Outlook change feed: Graph delta queries per folder (``/me/mailFolders/{id}/messages/delta``), polled by one
loop per account for every watched folder, each folder's changes shared by all its subscribers.

Cursor: ``{"d": "<@odata.deltaLink>", "t": "<the provider's clock when that round ended>", "r": [...]}``, where ``r``
holds short digests of the messages that round saw created within its last second. The deltaLink is Graph's
opaque sync state; it is followed only when it points into the configured Graph endpoint (the access token goes
with it). An expired sync state (410, syncStateNotFound) gives an explicit ResyncRequired CURSOR_EXPIRED; a cursor
that is not one of these gives ResyncRequired GAP; never a silent skip.

Per change: ``@removed`` → MessageDeleted (deleted, or moved out of the folder); otherwise the message is new to the
folder or changed. Graph does not say which: a message created after the round the cursor came from, or moved in
from elsewhere since, is MessageAdded; one this watcher already reported as added is MessageUpdated, as is any
older message (so a message moved in from another folder is reported as an update, which a consumer that does not
know it treats as new). Within a round only the last event carries the new deltaLink; the earlier ones carry the
round's starting point, so resuming from any of them replays the rest of the round (a repeat, never a loss).

A subscriber that joins a folder nobody watches with a usable cursor makes that cursor the watcher's position: its
catch-up and the live feed are one sequence. One that joins a running watcher is caught up from its own cursor to
now, after which the live feed may repeat what changed in between.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
from collections import OrderedDict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from server.domain.feeds import Subscriber, UpstreamBase
from server.domain.mail import (
    FeedEvent,
    MessageAdded,
    MessageDeleted,
    MessageUpdated,
    MessageView,
    ResyncReason,
    ResyncRequired,
)
from server.errors import BrokerError, CursorExpired, ProviderUnavailable
from server.providers.microsoft.graph import encode_id, message_from_resource

if TYPE_CHECKING:
    from server.providers.microsoft.graph import GraphDriver

log = logging.getLogger("mailbroker.graph.delta")

RECENT_ADDED = 10_000  # message ids reported as added, remembered per folder so a later change is an update
MAX_CURSOR_RECENT = 32  # digests of messages created in a round's last second, carried in its cursor


def _digest(graph_id: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(graph_id.encode("utf-8")).digest()[:9]).decode("ascii")


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class AccountDelta:
    """The one polling loop of an account: every ``interval`` it runs a delta round for each watched folder;
    between rounds it admits new subscribers as soon as they join."""

    def __init__(self, driver: GraphDriver, interval: float) -> None:
        self.driver = driver
        self._interval = interval
        self._folders: list[FolderDelta] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def register(self, folder: FolderDelta) -> None:
        self._folders.append(folder)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="mailbroker-graph-delta")

    def unregister(self, folder: FolderDelta) -> None:
        if folder in self._folders:
            self._folders.remove(folder)
        if not self._folders and self._task is not None:
            self._task.cancel()
            self._task = None

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._folders.clear()
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_poll = loop.time()
        while self._folders:
            self._wake.clear()
            poll = loop.time() >= next_poll
            if poll:
                next_poll = loop.time() + self._interval
            for folder in list(self._folders):
                if folder in self._folders:
                    try:
                        await folder.step(poll)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        # One folder's failure must not stop the others' feeds, nor leave its subscribers waiting.
                        log.error("delta watcher failed", exc_info=True, extra={"component": "feeds"})
                        folder.fail(
                            ProviderUnavailable(
                                "the change feed failed; resume from the last token", reason="FEED_FAILED"
                            )
                        )
            if any(folder.has_joining for folder in self._folders):
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_poll - loop.time())):
                    await self._wake.wait()


class FolderDelta(UpstreamBase):
    """The upstream of one folder (what the FeedHub runs and shares); the account's loop does its work."""

    def __init__(self, account: AccountDelta, folder_id: str) -> None:
        super().__init__()
        self.folder_id = folder_id
        self._account = account
        self._driver = account.driver
        self._graph_folder: str | None = None
        self._link: str | None = None  # the live deltaLink
        self._since: datetime | None = None  # the provider's clock when the live deltaLink's round ended
        self._recent: list[str] = []  # digests of what the live deltaLink's round saw created in its last second
        self._added: OrderedDict[str, None] = OrderedDict()
        self._done = asyncio.Event()

    # -- Upstream --------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        self._account.register(self)
        try:
            await self._done.wait()
        finally:
            self._account.unregister(self)

    def join(self, subscriber: Subscriber, cursor: dict[str, object] | None) -> None:
        super().join(subscriber, cursor)
        self._account.wake()

    @property
    def has_joining(self) -> bool:
        return bool(self._joining)

    def fail(self, error: BrokerError) -> None:
        self.end_all(error)
        self._done.set()

    # -- the account loop's work -----------------------------------------------------------------------------------

    async def step(self, poll: bool) -> None:
        """Start (once), poll when it is time, admit whoever joined."""
        try:
            if self._graph_folder is None:
                self._graph_folder = await self._driver.check_folder(self.folder_id, "folders")
            if poll and self._link is not None:
                await self._poll()
            await self._admit()
        except ProviderUnavailable as exc:
            if self._graph_folder is None:
                self.fail(exc)  # never started: tell the subscribers rather than keep them waiting
                return
            log.info("delta poll failed", extra={"reason": exc.reason, "component": "feeds"})
        except BrokerError as exc:
            self.fail(exc)  # the grant is gone or the folder was deleted: the subscribers must act

    def _cursor(self, link: str | None, since: datetime | None, recent: list[str]) -> dict[str, object]:
        return {"d": link or "", "t": since.isoformat() if since else "", "r": list(recent)}

    def _live_cursor(self) -> dict[str, object]:
        return self._cursor(self._link, self._since, self._recent)

    def _position(self, cursor: dict[str, object] | None) -> tuple[str, datetime | None, list[str]] | None:
        if not isinstance(cursor, dict):
            return None
        link = self._driver.own_link(cursor.get("d"))
        if link is None or "/delta" not in link:
            return None
        recent = cursor.get("r")
        digests = [r for r in recent if isinstance(r, str)][:MAX_CURSOR_RECENT] if isinstance(recent, list) else []
        return link, _parse_time(cursor.get("t")), digests

    def _resync(self, reason: ResyncReason) -> FeedEvent:
        return FeedEvent(ResyncRequired(reason, self.folder_id), self._live_cursor(), datetime.now(UTC))

    async def _start_fresh(self) -> None:
        """The folder's initial round (every message in it, no events): the live position is now."""
        assert self._graph_folder is not None
        url, params = self._driver.delta_start(self._graph_folder)
        items, link, server_time = await self._driver.delta_round(url, params)
        self._link, self._since = link, server_time or datetime.now(UTC)
        self._recent = self._remember_recent(items, self._since)

    async def _round(
        self, link: str, since: datetime | None, recent: list[str]
    ) -> tuple[list[FeedEvent], str, datetime, list[str]]:
        """The events of one round from ``link`` (whose round ended at ``since``), the next link and its time."""
        items, next_link, server_time = await self._driver.delta_round(link, None)
        next_since = server_time or datetime.now(UTC)
        well_known = await self._driver.well_known()
        seen = set(recent)
        changes: list[Any] = []
        for item in items:
            graph_id = str(item["id"])
            if "@removed" in item:
                changes.append(MessageDeleted(encode_id(graph_id)))
                self._added.pop(graph_id, None)
                continue
            message = message_from_resource(item, MessageView.METADATA, well_known)
            created = _parse_time(item.get("createdDateTime")) or _parse_time(item.get("receivedDateTime"))
            if graph_id in self._added or _digest(graph_id) in seen:
                changes.append(MessageUpdated(message))
            elif since is None or (created is not None and created >= since):
                changes.append(MessageAdded(message))
                self._remember(graph_id)
            else:
                changes.append(MessageUpdated(message))
        next_recent = self._remember_recent(items, next_since)
        before, after = self._cursor(link, since, recent), self._cursor(next_link, next_since, next_recent)
        now = datetime.now(UTC)
        events = [
            FeedEvent(change, after if index == len(changes) - 1 else before, now)
            for index, change in enumerate(changes)
        ]
        return events, next_link, next_since, next_recent

    def _remember(self, graph_id: str) -> None:
        self._added[graph_id] = None
        self._added.move_to_end(graph_id)
        while len(self._added) > RECENT_ADDED:
            self._added.popitem(last=False)

    def _remember_recent(self, items: list[dict[str, Any]], since: datetime) -> list[str]:
        """Messages created within the second the round ended (the provider's clock has whole seconds) were seen in
        this round; a later change of one is an update. Their digests go into the round's cursor."""
        digests = []
        for item in items:
            created = _parse_time(item.get("createdDateTime")) or _parse_time(item.get("receivedDateTime"))
            if "@removed" not in item and created is not None and created >= since:
                self._remember(str(item["id"]))
                digests.append(_digest(str(item["id"])))
        return digests[-MAX_CURSOR_RECENT:]

    async def _poll(self) -> None:
        assert self._link is not None
        try:
            events, self._link, self._since, self._recent = await self._round(self._link, self._since, self._recent)
        except CursorExpired:
            # Our own sync state expired (a long outage): every subscriber resynchronises.
            await self._start_fresh()
            self._broadcast([self._resync(ResyncReason.CURSOR_EXPIRED)])
            return
        if events:
            self._broadcast(events)

    async def _admit(self) -> None:
        while self._joining:
            subscriber, cursor = self._joining[0]
            if not subscriber.ended:
                await self._admit_one(subscriber, cursor)  # on a failure it stays in the queue
            if self._joining and self._joining[0][0] is subscriber:
                self._joining.pop(0)
            if not subscriber.ended:
                if not subscriber.start.done():
                    subscriber.start.set_result(self._live_cursor())
                self.subscribers.add(subscriber)

    async def _admit_one(self, subscriber: Subscriber, cursor: dict[str, object] | None) -> None:
        position = self._position(cursor)
        if self._link is None:
            if position is not None:
                try:
                    # Nobody watched: the subscriber's position becomes the live one.
                    events, self._link, self._since, self._recent = await self._round(*position)
                except CursorExpired:
                    await self._start_fresh()
                    subscriber.deliver(self._resync(ResyncReason.CURSOR_EXPIRED))
                    return
                subscriber.deliver_all(events, self.folder_id)
                return
            await self._start_fresh()
            if cursor is not None:
                subscriber.deliver(self._resync(ResyncReason.GAP))
            return
        if cursor is None or cursor == self._live_cursor():
            return
        if position is None:
            subscriber.deliver(self._resync(ResyncReason.GAP))
            return
        try:
            events, _, _, _ = await self._round(*position)
        except CursorExpired:
            subscriber.deliver(self._resync(ResyncReason.CURSOR_EXPIRED))
            return
        subscriber.deliver_all(events, self.folder_id)
