"""Change feeds: a driver's folder watcher behind the FeedHub, as WatchMailbox uses it.

Events arrive in order with a cursor each; resuming from a cursor replays exactly what came after it; one upstream
serves every subscriber of a folder and stops with the last one.
"""

from __future__ import annotations

import asyncio
import json
import secrets

import pytest

from server.domain.feeds import FeedEnded, FeedHub, Subscriber, Upstream
from server.domain.mail import (
    Change,
    FeedEvent,
    Heartbeat,
    MessageAdded,
    MessageDeleted,
    MessageUpdated,
    ResyncRequired,
)
from server.errors import BrokerError, FailedPrecondition, NotFound
from server.providers.base import MailDriver
from tests.conformance import samples
from tests.conformance.backends import Backend, Flag

EVENT_TIMEOUT = 10.0


def _relay(cursor: dict[str, object]) -> dict[str, object]:
    """A cursor as it comes back from a client: sealed as JSON into a resume token and opened again."""
    return json.loads(json.dumps(cursor))  # type: ignore[no-any-return]


class _Feed:
    """Subscribes to one folder of one driver through a FeedHub, as the mail service does."""

    def __init__(self, hub: FeedHub, driver: MailDriver, folder_id: str) -> None:
        self.hub = hub
        self.driver = driver
        self.folder_id = folder_id
        self.account = f"conformance-{secrets.token_hex(4)}"

    async def subscribe(self, cursor: dict[str, object] | None = None) -> Subscriber:
        subscriber = self.hub.subscribe(
            self.account, self.folder_id, lambda: self.driver.folder_watcher(self.folder_id), cursor
        )
        await asyncio.wait_for(subscriber.start, EVENT_TIMEOUT)  # the watcher has the folder's state: safe to change
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.hub.unsubscribe(self.account, self.folder_id, subscriber)


async def _next(subscriber: Subscriber) -> FeedEvent:
    while True:
        item = await asyncio.wait_for(subscriber.queue.get(), EVENT_TIMEOUT)
        if isinstance(item, FeedEnded):
            raise item.error
        if not isinstance(item.change, Heartbeat):
            return item


def _check_cursor(event: FeedEvent) -> None:
    assert event.cursor, "an event carries no cursor"
    assert _relay(event.cursor) == event.cursor, "a cursor does not survive JSON"


def _describe(change: Change) -> tuple[str, str]:
    """(kind, Message-ID) of a message event, for comparing sequences without printing content."""
    if isinstance(change, MessageAdded | MessageUpdated):
        return type(change).__name__, change.message.internet_message_id
    return type(change).__name__, ""


async def test_a_subscriber_sees_an_arrival_a_flag_change_and_an_expunge_in_order(
    backend: Backend, feed_hub: FeedHub
) -> None:
    driver = await backend.new_driver()
    feed = _Feed(feed_hub, driver, driver.inbox_id)
    subscriber = await feed.subscribe()

    raw, mid = samples.simple("arrives while watched")
    await backend.seed(raw)
    added = await _next(subscriber)
    assert isinstance(added.change, MessageAdded), "the first event is not MessageAdded"
    message = added.change.message
    assert message.internet_message_id == mid
    assert message.subject == "arrives while watched"
    assert driver.inbox_id in message.folder_ids
    assert not message.read and not message.flagged
    assert (await driver.get_message(message.id, message.view)).internet_message_id == mid, "the event's id is wrong"
    _check_cursor(added)

    await backend.set_flag(mid, Flag.FLAGGED)
    updated = await _next(subscriber)
    assert isinstance(updated.change, MessageUpdated), "a flag change is not MessageUpdated"
    assert updated.change.message.id == message.id
    assert updated.change.message.flagged
    _check_cursor(updated)

    await backend.delete(mid)
    # IMAP deletes in two steps (\Deleted, then EXPUNGE); a watcher that looks in between may report the first as an
    # update of the same message. Nothing else may come before the deletion.
    event = await _next(subscriber)
    while isinstance(event.change, MessageUpdated):
        assert event.change.message.id == message.id, "an update of another message before the deletion"
        event = await _next(subscriber)
    assert isinstance(event.change, MessageDeleted), "an expunge is not MessageDeleted"
    assert event.change.message_id == message.id
    _check_cursor(event)


async def test_a_folder_other_than_the_inbox_can_be_watched(backend: Backend, feed_hub: FeedHub) -> None:
    if not backend.has_folders:
        pytest.skip(f"{backend.name} has no folders to create")
    driver = await backend.new_driver()
    await backend.create_folder("Watched Ñ")
    (folder,) = [f for f in await driver.list_folders() if f.display_name == "Watched Ñ"]
    subscriber = await _Feed(feed_hub, driver, folder.id).subscribe()

    raw, _ = samples.simple("to the inbox")
    await backend.seed(raw)
    raw, mid = samples.simple("to the watched folder")
    await backend.seed(raw, folder_name="Watched Ñ")

    event = await _next(subscriber)  # the inbox's arrival is not this feed's business
    assert _describe(event.change) == ("MessageAdded", mid)
    assert isinstance(event.change, MessageAdded) and event.change.message.folder_ids == (folder.id,)


async def test_resuming_from_a_cursor_replays_exactly_what_came_after_it(backend: Backend, feed_hub: FeedHub) -> None:
    driver = await backend.new_driver()
    feed = _Feed(feed_hub, driver, driver.inbox_id)
    subscriber = await feed.subscribe()
    first_raw, first = samples.simple("first")
    second_raw, second = samples.simple("second")
    await backend.seed(first_raw)
    after_first = await _next(subscriber)
    await backend.seed(second_raw)
    after_second = await _next(subscriber)
    assert [_describe(e.change) for e in (after_first, after_second)] == [
        ("MessageAdded", first),
        ("MessageAdded", second),
    ]
    feed.unsubscribe(subscriber)

    # While nobody watches: the first message is read elsewhere, a third one arrives.
    await backend.set_flag(first, Flag.READ)
    third_raw, third = samples.simple("third")
    await backend.seed(third_raw)

    resumed = await feed.subscribe(_relay(after_first.cursor))
    replayed = [await _next(resumed) for _ in range(3)]
    assert [_describe(e.change) for e in replayed] == [
        ("MessageAdded", second),
        ("MessageUpdated", first),
        ("MessageAdded", third),
    ], "the replay is not exactly what came after the cursor"
    assert isinstance(replayed[1].change, MessageUpdated) and replayed[1].change.message.read
    # Nothing more was replayed: the next event is a live one.
    live_raw, live = samples.simple("live again")
    await backend.seed(live_raw)
    assert _describe((await _next(resumed)).change) == ("MessageAdded", live)

    # The cursor of the last replayed event resumes after it.
    feed.unsubscribe(resumed)
    again = await feed.subscribe(_relay(replayed[-1].cursor))
    assert _describe((await _next(again)).change) == ("MessageAdded", live)


async def test_resuming_from_the_start_cursor_replays_what_arrived_after_subscribing(
    backend: Backend, feed_hub: FeedHub
) -> None:
    driver = await backend.new_driver()
    before_raw, _ = samples.simple("before anyone watched")
    await backend.seed(before_raw)
    feed = _Feed(feed_hub, driver, driver.inbox_id)
    subscriber = await feed.subscribe()
    start = subscriber.start.result()
    feed.unsubscribe(subscriber)

    raw, mid = samples.simple("while away")
    await backend.seed(raw)
    resumed = await feed.subscribe(_relay(start))

    assert _describe((await _next(resumed)).change) == ("MessageAdded", mid)


async def test_a_cursor_the_driver_cannot_use_yields_an_explicit_resync(backend: Backend, feed_hub: FeedHub) -> None:
    driver = await backend.new_driver()
    feed = _Feed(feed_hub, driver, driver.inbox_id)

    resumed = await feed.subscribe({"not": "a cursor of this driver"})

    event = await _next(resumed)
    assert isinstance(event.change, ResyncRequired), "a useless cursor was silently accepted"
    _check_cursor(event)
    # The resync's cursor is a fresh start: the feed goes on from it.
    raw, mid = samples.simple("after the resync")
    await backend.seed(raw)
    assert _describe((await _next(resumed)).change) == ("MessageAdded", mid)


class _TrackedUpstream:
    """An upstream that records whether its run() is going, to see the hub start and stop it."""

    def __init__(self, inner: Upstream) -> None:
        self.inner = inner
        self.running = False
        self.stopped = asyncio.Event()

    def join(self, subscriber: Subscriber, cursor: dict[str, object] | None) -> None:
        self.inner.join(subscriber, cursor)

    def leave(self, subscriber: Subscriber) -> None:
        self.inner.leave(subscriber)

    def end_all(self, error: BrokerError) -> None:
        self.inner.end_all(error)

    @property
    def idle(self) -> bool:
        return self.inner.idle

    async def run(self) -> None:
        self.running = True
        try:
            await self.inner.run()
        finally:
            self.running = False
            self.stopped.set()


class _Counted:
    """Subscribes to one driver's inbox through the hub with a factory that keeps every upstream it made.

    Every upstream the hub starts comes from the factory, and each holds its own connection to the provider (an IMAP
    watcher: one IDLE connection). Counting what the factory made, and whether each one's run() is going, counts
    the hub's running watchers - and so the provider connections - without reaching into the hub or the driver.
    """

    def __init__(self, hub: FeedHub, driver: MailDriver) -> None:
        self.hub = hub
        self.driver = driver
        self.account = f"conformance-{secrets.token_hex(4)}"
        self.made: list[_TrackedUpstream] = []

    def _factory(self) -> Upstream:
        self.made.append(_TrackedUpstream(self.driver.folder_watcher(self.driver.inbox_id)))
        return self.made[-1]

    async def subscribe(self) -> Subscriber:
        subscriber = self.hub.subscribe(self.account, self.driver.inbox_id, self._factory, None)
        await asyncio.wait_for(subscriber.start, EVENT_TIMEOUT)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.hub.unsubscribe(self.account, self.driver.inbox_id, subscriber)

    @property
    def running(self) -> int:
        return sum(upstream.running for upstream in self.made)


# How long a watcher may take to stop. Stopping needs no more than a goodbye to the provider.
STOP_SECONDS = 1.0
# Time for a watcher to settle into waiting for the provider after it delivered an event.
SETTLE_SECONDS = 0.2


async def test_subscribers_of_a_folder_share_one_upstream_that_stops_with_the_last(
    backend: Backend, feed_hub: FeedHub
) -> None:
    counted = _Counted(feed_hub, await backend.new_driver())

    one = await counted.subscribe()
    two = await counted.subscribe()
    assert len(counted.made) == 1, "a second subscriber started a second upstream"
    assert counted.running == 1
    assert feed_hub.watched_accounts == 1

    raw, mid = samples.simple("for both")
    await backend.seed(raw)
    seen_by_one, seen_by_two = await _next(one), await _next(two)
    assert _describe(seen_by_one.change) == _describe(seen_by_two.change) == ("MessageAdded", mid)
    assert seen_by_one.cursor == seen_by_two.cursor

    counted.unsubscribe(one)
    raw, mid = samples.simple("for the one left")
    await backend.seed(raw)
    assert _describe((await _next(two)).change) == ("MessageAdded", mid)
    assert counted.running == 1, "the upstream stopped with a subscriber left"

    await asyncio.sleep(SETTLE_SECONDS)
    counted.unsubscribe(two)
    await asyncio.wait_for(counted.made[0].stopped.wait(), EVENT_TIMEOUT)
    assert counted.running == 0
    assert feed_hub.watched_accounts == 0

    # A later subscriber gets a new upstream, and it works.
    three = await counted.subscribe()
    assert len(counted.made) == 2 and counted.running == 1
    raw, mid = samples.simple("after a restart of the watcher")
    await backend.seed(raw)
    assert _describe((await _next(three)).change) == ("MessageAdded", mid)


async def test_an_upstream_stops_promptly_when_its_last_subscriber_leaves(backend: Backend, feed_hub: FeedHub) -> None:
    counted = _Counted(feed_hub, await backend.new_driver())
    subscriber = await counted.subscribe()
    raw, _ = samples.simple("one event")
    await backend.seed(raw)
    await _next(subscriber)
    await asyncio.sleep(SETTLE_SECONDS)  # the watcher waits for the provider again

    started = asyncio.get_running_loop().time()
    counted.unsubscribe(subscriber)
    await asyncio.wait_for(counted.made[0].stopped.wait(), EVENT_TIMEOUT)

    took = asyncio.get_running_loop().time() - started
    assert took < STOP_SECONDS, f"the upstream took {took:.1f} s to stop"


async def test_an_upstream_stops_when_its_last_subscriber_leaves_right_after_an_event(
    backend: Backend, feed_hub: FeedHub
) -> None:
    # A client that goes away as soon as it has an event: the hub cancels the watcher while it is busy turning
    # back to the provider. The cancellation must not be lost, or the watcher and its connection outlive the feed.
    counted = _Counted(feed_hub, await backend.new_driver())
    subscriber = await counted.subscribe()
    raw, _ = samples.simple("the last event wanted")
    await backend.seed(raw)
    await _next(subscriber)

    counted.unsubscribe(subscriber)

    try:
        await asyncio.wait_for(counted.made[0].stopped.wait(), 5)
    except TimeoutError:
        pytest.fail("the upstream went on running after its last subscriber left")
    assert feed_hub.watched_accounts == 0


async def test_watching_a_folder_that_does_not_exist_ends_the_feed(backend: Backend, feed_hub: FeedHub) -> None:
    if not backend.has_folders:
        pytest.skip(f"{backend.name} has no folders to delete")
    driver = await backend.new_driver()
    await backend.create_folder("Short-lived")
    (folder,) = [f for f in await driver.list_folders() if f.display_name == "Short-lived"]
    await backend.delete_folder("Short-lived")

    subscriber = feed_hub.subscribe("conformance-gone", folder.id, lambda: driver.folder_watcher(folder.id), None)

    with pytest.raises((NotFound, FailedPrecondition)) as caught:
        await asyncio.wait_for(subscriber.start, EVENT_TIMEOUT)
    assert caught.value.reason == "FOLDER_NOT_FOUND"
