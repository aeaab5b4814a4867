"""Deadlines and resource limits against a mail server that never answers: the caller's deadline (or the server's
default one) ends the call and the connection to the mail server with it; concurrent calls and streams per
identity and feeds per account are capped (RESOURCE_EXHAUSTED with a reason); oversized messages are refused."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1 import resources_pb2 as rpb

from server.config import Config, LimitsConfig
from server.domain.models import (
    Account,
    AccountProfile,
    AccountState,
    Capability,
    MailServer,
    Provider,
    TransportSecurity,
)
from server.providers.imap import ids
from server.store.ids import new_account_id
from tests.broker import RunningBroker, broker_config, error_reason, running_broker, stubs
from tests.pki import TestPki

WAIT = 20  # generous: only the broker cutting the connection ends these waits (its IMAP timeout is 300 s)


class SilentImapServer:
    """Greets, answers CAPABILITY and LOGIN, then never answers anything else; reports each command it swallowed
    and each connection that the client closed."""

    def __init__(self) -> None:
        self.swallowed: asyncio.Queue[bytes] = asyncio.Queue()
        self.closed: asyncio.Queue[None] = asyncio.Queue()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> SilentImapServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):  # connections a failed test left open, so no transport outlives it
            writer.close()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        writer.write(b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n")
        try:
            while line := await reader.readline():
                tag, _, rest = line.partition(b" ")
                command = rest.split(b" ", 1)[0].strip().upper()
                if command == b"CAPABILITY":
                    writer.write(b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag + b" OK done\r\n")
                elif command == b"LOGIN":
                    writer.write(tag + b" OK logged in\r\n")
                else:
                    await self.swallowed.put(command)
                await writer.drain()
        except ConnectionError:
            pass
        await self.closed.put(None)
        self._writers.discard(writer)
        writer.close()


def seed(running: RunningBroker, tenant: str, port: int) -> str:
    now = datetime.now(UTC)
    server = MailServer("127.0.0.1", port, TransportSecurity.PLAINTEXT)
    account = Account(
        id=new_account_id(),
        tenant=tenant,
        provider=Provider.IMAP,
        state=AccountState.ACTIVE,
        capabilities=frozenset(Capability),
        profile=AccountProfile("someone@example.test", "someone@example.test", server, server),
        create_time=now,
        update_time=now,
    )
    running.store().create_account(account, {"imap_password": b"pw"})
    return f"accounts/{account.id}"


def limits_config(tmp_path: Path, pki: TestPki, **limits: Any) -> Config:
    config = broker_config(tmp_path, pki)
    imap = dataclasses.replace(config.imap, allow_plaintext=True, timeout_seconds=300.0)
    return dataclasses.replace(config, imap=imap, limits=LimitsConfig(**limits))


@pytest.fixture
async def silent() -> AsyncIterator[SilentImapServer]:
    async with SilentImapServer() as server:
        yield server


async def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), error_reason(caught.value)


async def test_the_callers_deadline_ends_the_call_and_the_connection_to_the_mail_server(
    tmp_path: Path, pki: TestPki, silent: SilentImapServer
) -> None:
    async with running_broker(limits_config(tmp_path, pki), pki) as running:
        name = seed(running, pki.alice.identity, silent.port)
        async with running.channel(pki.alice) as channel:
            _, mail = stubs(channel)
            code, _ = await _code(mail.ListFolders(mpb.ListFoldersRequest(parent=name), timeout=1))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert await asyncio.wait_for(silent.swallowed.get(), WAIT) == b"LIST"
            # The server never answered: only the broker can have closed the connection, at the deadline.
            await asyncio.wait_for(silent.closed.get(), WAIT)


async def test_a_unary_call_without_a_deadline_gets_the_servers_default(
    tmp_path: Path, pki: TestPki, silent: SilentImapServer
) -> None:
    async with running_broker(limits_config(tmp_path, pki, default_deadline_seconds=1.0), pki) as running:
        name = seed(running, pki.alice.identity, silent.port)
        async with running.channel(pki.alice) as channel:
            _, mail = stubs(channel)
            assert await _code(mail.ListFolders(mpb.ListFoldersRequest(parent=name))) == (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "DEFAULT_DEADLINE_EXCEEDED",
            )
            await asyncio.wait_for(silent.closed.get(), WAIT)


async def test_concurrent_calls_per_identity_are_capped(tmp_path: Path, pki: TestPki, silent: SilentImapServer) -> None:
    config = limits_config(tmp_path, pki, max_concurrent_calls_per_identity=2)
    async with running_broker(config, pki) as running:
        name = seed(running, pki.alice.identity, silent.port)
        async with running.channel(pki.alice) as alice, running.channel(pki.bob) as bob:
            _, mail = stubs(alice)
            hanging = [mail.ListFolders(mpb.ListFoldersRequest(parent=name), timeout=60) for _ in range(2)]
            for _ in hanging:
                await asyncio.wait_for(silent.swallowed.get(), WAIT)  # both are in flight at the mail server
            assert await _code(mail.ListFolders(mpb.ListFoldersRequest(parent=name), timeout=10)) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "TOO_MANY_CONCURRENT_CALLS",
            )
            # Another identity is not held up by alice's calls.
            bob_accounts, _ = stubs(bob)
            await bob_accounts.ListAccounts(apb.ListAccountsRequest(), timeout=10)
            for call in hanging:
                call.cancel()


async def test_streams_per_identity_and_watches_per_account_are_capped(
    tmp_path: Path, pki: TestPki, silent: SilentImapServer
) -> None:
    config = limits_config(tmp_path, pki, max_streams_per_identity=2, max_watches_per_account=1)
    async with running_broker(config, pki) as running:
        name = seed(running, pki.alice.identity, silent.port)
        attachment = f"{name}/messages/{ids.MessageRef('INBOX', 1, 1).id()}/attachments/{ids.part_id('2')}"
        async with running.channel(pki.alice) as channel:
            _, mail = stubs(channel)
            watch = mail.WatchMailbox(mpb.WatchMailboxRequest(account=name), timeout=60)
            reading = asyncio.ensure_future(watch.read())
            await asyncio.wait_for(silent.swallowed.get(), WAIT)  # the feed is open at the mail server
            second_watch = mail.WatchMailbox(mpb.WatchMailboxRequest(account=name), timeout=10)
            assert await _code(second_watch.read()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WATCHES")
            stream = mail.GetAttachment(mpb.GetAttachmentRequest(name=attachment), timeout=60)
            fetching = asyncio.ensure_future(stream.read())
            while await asyncio.wait_for(silent.swallowed.get(), WAIT) != b"EXAMINE":
                pass  # the attachment stream is open at the mail server too
            third = mail.GetAttachment(mpb.GetAttachmentRequest(name=attachment), timeout=10)
            assert await _code(third.read()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS")
            watch.cancel()
            stream.cancel()
            for task in (reading, fetching):
                with pytest.raises(asyncio.CancelledError):
                    await task


async def test_a_message_over_the_receive_limit_is_refused(tmp_path: Path, pki: TestPki) -> None:
    config = broker_config(tmp_path, pki, max_receive_message_bytes=64 * 1024)
    async with running_broker(config, pki) as running, running.channel(pki.alice) as channel:
        _, mail = stubs(channel)
        message = mpb.OutgoingMessage(
            to_recipients=[rpb.EmailAddress(address="a@example.test")],
            attachments=[mpb.OutgoingAttachment(filename="big.bin", content=b"x" * 100_000)],
        )
        call = mail.SendMessage(mpb.SendMessageRequest(account="accounts/abc", message=message), timeout=10)
        code, _ = await _code(call)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # the transport's limit: gRPC's own status, no ErrorInfo
