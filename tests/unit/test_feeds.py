"""The feed hub and subscribers: overflow never drops events silently, failing watchers end their streams."""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime

import pytest

from server.domain.feeds import FeedEnded, FeedHub, Subscriber, UpstreamBase
from server.domain.mail import FeedEvent, Heartbeat, ResyncReason, ResyncRequired
from server.domain.models import MailServer, TransportSecurity
from server.errors import ProviderUnavailable, ResourceExhausted
from server.providers.imap.aioimap import AsyncImap
from server.providers.imap.connection import Credentials
from server.providers.imap.network import NetworkGuard

LOOPBACK = NetworkGuard.from_config(["127.0.0.0/8"])  # the fake servers listen on loopback


def _event(n: int) -> FeedEvent:
    return FeedEvent(Heartbeat(), {"m": n}, datetime.now(UTC))


async def test_a_batch_too_big_for_the_queue_becomes_one_resync_with_the_final_cursor() -> None:
    subscriber = Subscriber()
    subscriber.deliver_all([_event(n) for n in range(5)], "f")
    subscriber.deliver_all([_event(n) for n in range(5, 5 + subscriber.queue.maxsize)], "f")
    delivered = [subscriber.queue.get_nowait() for _ in range(subscriber.queue.qsize())]
    assert [e.cursor["m"] for e in delivered[:5]] == [0, 1, 2, 3, 4]  # type: ignore[union-attr]
    (resync,) = delivered[5:]
    assert isinstance(resync, FeedEvent)
    assert resync.change == ResyncRequired(ResyncReason.GAP, "f")
    assert resync.cursor == {"m": 4 + subscriber.queue.maxsize}


async def test_an_overflowing_subscriber_is_ended_with_nothing_half_delivered() -> None:
    subscriber = Subscriber()
    for n in range(subscriber.queue.maxsize):
        subscriber.deliver(_event(n))
    subscriber.deliver(_event(-1))  # one too many
    assert subscriber.ended
    (only,) = [subscriber.queue.get_nowait() for _ in range(subscriber.queue.qsize())]
    # Everything queued was dropped with the end, so the consumer's last token predates all of it.
    assert isinstance(only, FeedEnded)
    assert isinstance(only.error, ResourceExhausted)
    assert only.error.reason == "FEED_CONSUMER_TOO_SLOW"


class Crashing(UpstreamBase):
    async def run(self) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("an unexpected bug in a watcher")


async def test_a_watcher_that_fails_unexpectedly_ends_its_subscribers() -> None:
    hub = FeedHub()
    subscriber = hub.subscribe("acct", "folder", Crashing, None)
    item = await asyncio.wait_for(subscriber.queue.get(), 5)
    assert isinstance(item, FeedEnded)
    assert item.error.reason == "FEED_FAILED"
    with pytest.raises(ProviderUnavailable):
        await subscriber.start
    await hub.close()


async def test_plaintext_injected_after_starttls_is_refused() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK ready\r\n")
        await reader.readline()  # STARTTLS
        # The OK and a forged answer in one plaintext write: a man in the middle's classic move.
        writer.write(b"F1 OK Begin TLS\r\nF2 OK LOGIN completed\r\n")
        await writer.drain()
        await reader.read(100)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ProviderUnavailable) as caught:
            await AsyncImap.connect(
                MailServer("127.0.0.1", port, TransportSecurity.STARTTLS),
                Credentials("user", "pw"),
                ssl.create_default_context(),
                5,
                guard=LOOPBACK,
            )
        assert caught.value.reason == "PROVIDER_PROTOCOL_ERROR"
    finally:
        server.close()
        await server.wait_closed()


async def test_idle_stays_open_through_keepalives_and_returns_real_changes() -> None:
    sent_done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK ready\r\n")
        while line := await reader.readline():
            tag = line.split(b" ", 1)[0]
            if line.endswith(b"LOGIN {4}\r\n") or line.endswith(b"{2}\r\n"):
                writer.write(b"+ go\r\n")
            elif b"CAPABILITY" in line:
                writer.write(b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag + b" OK\r\n")
            elif line.startswith(b"user"):
                writer.write(b"+ go\r\n")
            elif line.startswith(b"pw"):
                writer.write(b"F1 OK logged in\r\n")
            elif b"IDLE" in line:
                writer.write(b"+ idling\r\n* OK Still here\r\n")
                await writer.drain()
                await asyncio.sleep(0.3)
                writer.write(b"* 3 EXISTS\r\n")
                idle_tag = tag
            elif line == b"DONE\r\n":
                sent_done.set()
                writer.write(idle_tag + b" OK Idle completed\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await AsyncImap.connect(
            MailServer("127.0.0.1", port, TransportSecurity.PLAINTEXT),
            Credentials("user", "pw"),
            ssl.create_default_context(),
            5,
            guard=LOOPBACK,
        )
        lines = await client.idle(5, asyncio.Event())
        # The keepalive did not end the IDLE; the EXISTS that came after it did.
        assert lines == [b"* 3 EXISTS\r\n"]
        assert sent_done.is_set()
        await client.close()
    finally:
        server.close()
        await server.wait_closed()
