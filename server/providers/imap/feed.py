"""The IMAP change feed for one folder: IDLE on an asyncio connection, then ask the server what changed since the
last MODSEQ (CONDSTORE/QRESYNC, RFC 7162). Cursors are ``{"v": UIDVALIDITY, "m": MODSEQ, "n": UIDNEXT}``: resuming
from one replays exactly what came after it; a UIDVALIDITY change yields ResyncRequired. Reconnects (with backoff
and jitter) catch up from the last MODSEQ, so a dropped connection loses nothing."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from server.domain.feeds import UpstreamBase
from server.domain.mail import (
    FeedEvent,
    Message,
    MessageAdded,
    MessageDeleted,
    MessageUpdated,
    ResyncReason,
    ResyncRequired,
)
from server.errors import BrokerError, FailedPrecondition, NotFound, Unauthenticated
from server.providers.imap import ids
from server.providers.imap.aioimap import AsyncImap, Changes, Examined

log = logging.getLogger("mailbroker.imap.feed")

# IDLE is re-issued this often (RFC 2177 asks for < 29 min), and the folder checked then too. Not more often:
# every re-IDLE wakes a hibernated Dovecot session, and waking 1,000 of them in waves costs more than it saves.
IDLE_REFRESH_SECONDS = 25 * 60
BACKOFF_START = 0.5
BACKOFF_CAP = 30.0

Connect = Callable[[], Awaitable[AsyncImap]]
Summaries = Callable[[str, int, Sequence[int]], Awaitable[dict[int, Message]]]


def _now() -> datetime:
    return datetime.now(UTC)


class FolderWatcher(UpstreamBase):
    """Watches one folder of one account for every subscriber of it in this process."""

    def __init__(self, folder: str, connect: Connect, summaries: Summaries) -> None:
        super().__init__()
        self.folder = folder
        self.folder_id = ids.folder_id(folder)
        self._connect = connect
        self._summaries = summaries
        self._state: Examined | None = None

    async def run(self) -> None:
        failures = 0
        while True:
            connection: AsyncImap | None = None
            try:
                connection = await self._connect()
                if not connection.qresync:
                    raise FailedPrecondition(
                        "the IMAP server lacks QRESYNC, which change feeds need", reason="PROVIDER_CAPABILITY_MISSING"
                    )
                await connection.enable_qresync()
                await self._resume(connection)
                failures = 0
                while True:
                    await self._admit(connection)
                    self._wake.clear()
                    if self._joining:
                        continue
                    await connection.idle(IDLE_REFRESH_SECONDS, self._wake)
                    await self._poll(connection)
            except (Unauthenticated, FailedPrecondition, NotFound) as exc:
                # The credential was refused, the server cannot do feeds, or the folder is gone: final.
                self.end_all(exc)
                return
            except BrokerError as exc:
                if self._state is None:
                    # Never connected: tell the subscribers now rather than keep them waiting for a server that
                    # may not be there. Once a feed is up, outages are retried and caught up on instead.
                    self.end_all(exc)
                    return
                failures += 1
                delay = min(BACKOFF_CAP, BACKOFF_START * 2 ** min(failures, 10))
                log.info("imap feed reconnect", extra={"attempt": failures, "component": "imap-feed"})
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
            finally:
                if connection is not None:
                    await connection.close()

    # Internals

    def _cursor(self) -> dict[str, object]:
        assert self._state is not None
        return {"v": self._state.uidvalidity, "m": self._state.highestmodseq, "n": self._state.uidnext}

    async def _resume(self, connection: AsyncImap) -> None:
        """Select the folder; after a reconnect, replay to subscribers what happened while we were away."""
        previous = self._state
        current = await connection.examine(self.folder)
        if previous is None:
            self._state = current
            return
        if current.uidvalidity != previous.uidvalidity:
            self._state = current
            self._broadcast(
                [
                    FeedEvent(
                        ResyncRequired(ResyncReason.UIDVALIDITY_CHANGED, ids.folder_id(self.folder)),
                        self._cursor(),
                        _now(),
                    )
                ]
            )
            return
        self._state = Examined(previous.uidvalidity, previous.uidnext, previous.highestmodseq, current.exists)
        await self._poll(connection)

    async def _admit(self, connection: AsyncImap) -> None:
        joining, self._joining = self._joining, []
        for subscriber, cursor in joining:
            if subscriber.ended:
                continue
            events: list[FeedEvent] = []
            if cursor is not None:
                events = await self._catch_up(connection, cursor)
            subscriber.deliver_all(events, self.folder_id)
            if not subscriber.start.done():
                subscriber.start.set_result(self._cursor())
            self.subscribers.add(subscriber)

    async def _catch_up(self, connection: AsyncImap, cursor: dict[str, object]) -> list[FeedEvent]:
        assert self._state is not None
        try:
            uidvalidity, modseq, uidnext = (int(cursor[k]) for k in ("v", "m", "n"))  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError):
            uidvalidity = -1
        if uidvalidity != self._state.uidvalidity:
            return [
                FeedEvent(
                    ResyncRequired(ResyncReason.UIDVALIDITY_CHANGED, ids.folder_id(self.folder)), self._cursor(), _now()
                )
            ]
        if modseq >= self._state.highestmodseq:
            return []
        changes = await connection.changes_since(modseq)
        # Only up to what the live subscribers have seen; anything newer reaches this one with the next poll,
        # so no cursor handed out here may point past it either.
        changes.fetched = [c for c in changes.fetched if c[1] <= self._state.highestmodseq]
        changes.highestmodseq = min(changes.highestmodseq, self._state.highestmodseq)
        return await self._events(changes, uidnext, modseq)

    async def _poll(self, connection: AsyncImap) -> None:
        """Deliver everything changed since the last poll; again while the server reported more meanwhile."""
        assert self._state is not None
        while True:
            connection.unsolicited = False
            changes = await connection.changes_since(self._state.highestmodseq)
            events = await self._events(changes, self._state.uidnext, self._state.highestmodseq)
            if events:
                last = events[-1].cursor
                self._state.highestmodseq = max(self._state.highestmodseq, int(last["m"]))  # type: ignore[call-overload]
                self._state.uidnext = max(self._state.uidnext, int(last["n"]))  # type: ignore[call-overload]
            self._broadcast(events)
            if not connection.unsolicited:
                return

    async def _events(self, changes: Changes, uidnext: int, modseq: int) -> list[FeedEvent]:
        """Events in MODSEQ order, each with the cursor just after it.

        Expunges have no MODSEQ of their own; they are placed at the folder's HIGHESTMODSEQ read before the fetch,
        after the changes up to it. An expunge that raced past that read keeps the older cursor, so a resume may
        repeat it: deletions are delivered at least once, and nothing is ever skipped.
        """
        assert self._state is not None
        uidvalidity = self._state.uidvalidity
        now = _now()
        fetched = sorted(changes.fetched, key=lambda c: c[1])
        summaries = await self._summaries(self.folder, uidvalidity, [uid for uid, _, _ in fetched]) if fetched else {}
        position = {"m": modseq, "n": uidnext}
        events: list[FeedEvent] = []
        deletions = sorted(changes.vanished)

        def cursor() -> dict[str, object]:
            return {"v": uidvalidity, **position}

        def add_deletions() -> None:
            # Every deletion but the last keeps the cursor from before the group: a stream cut in the middle of
            # it resumes from there and gets the whole group again, rather than losing its tail.
            before = cursor()
            position["m"] = max(position["m"], changes.highestmodseq)
            for index, uid in enumerate(deletions):
                at = cursor() if index == len(deletions) - 1 else before
                events.append(FeedEvent(MessageDeleted(ids.MessageRef(self.folder, uidvalidity, uid).id()), at, now))
            deletions.clear()

        for uid, uid_modseq, _ in fetched:
            if deletions and uid_modseq > changes.highestmodseq:
                add_deletions()
            position["m"] = max(position["m"], uid_modseq)
            position["n"] = max(position["n"], uid + 1)
            message = summaries.get(uid)
            if message is None:  # gone again before we could read it; its VANISHED comes with a later poll
                continue
            change = MessageAdded(message) if uid >= uidnext else MessageUpdated(message)
            events.append(FeedEvent(change, cursor(), now))
        if deletions:
            add_deletions()
        return events
