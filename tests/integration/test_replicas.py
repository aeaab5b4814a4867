"""Two broker replicas, each in its own process, on one PostgreSQL database: what one does, the other sees.

The figures (how long the other replica took to end a feed of an erased account; token-endpoint requests for 100
calls spread over both) are printed with ``-s``; the tests assert outcomes and counts, never times.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1 import resources_pb2 as rpb
from sqlalchemy.engine import make_url

from server.config import Config, LimitsConfig, MailConfig, MetricsConfig
from server.crypto.keyring import load_keyring
from server.store.engine import create_engine
from server.store.repository import Store
from tests.broker import broker_config, error_reason, stubs
from tests.emulators.google import GoogleEmulator
from tests.emulators.google.fixtures import google_emulator  # noqa: F401 - a fixture, found by name
from tests.fleet import Replica, on_postgres, replicas
from tests.integration.test_google import REDIRECT_URI, USER, _connect, _inbox, _live_refresh_tokens, _mail
from tests.integration.test_imap import connect_request, sample
from tests.mailserver import Mailbox, MailServers
from tests.pki import PemPair, TestPki
from tests.postgres import PostgresServer

CALLS = 100


def channel(replica: Replica, pki: TestPki, client: PemPair) -> grpc.aio.Channel:
    key, cert = client.key_cert_pair()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(), private_key=key, certificate_chain=cert
    )
    return grpc.aio.secure_channel(replica.target, credentials)


@pytest.fixture
def fleet_config(tmp_path: Path, pki: TestPki, postgres: PostgresServer, mail_servers: MailServers) -> Config:
    config = on_postgres(broker_config(tmp_path, pki), postgres.new_database())
    return dataclasses.replace(
        config,
        metrics=MetricsConfig(listen="127.0.0.1:0"),
        imap=dataclasses.replace(config.imap, ca_file=mail_servers.ca_path),
        mail=MailConfig(folder_poll_seconds=0.5),
        limits=LimitsConfig(max_concurrent_calls_per_identity=CALLS + 10),
    )


@pytest.fixture
def fleet(fleet_config: Config, tmp_path: Path) -> Iterator[list[Replica]]:
    with replicas(fleet_config, tmp_path / "fleet") as started:
        yield started


async def test_an_account_connected_through_one_replica_is_usable_through_the_other(
    fleet: list[Replica], pki: TestPki, mail_servers: MailServers, mailbox: Mailbox
) -> None:
    one, other = fleet
    mail_servers.deliver(mailbox.address, sample("canary replica one", to=mailbox.address))
    async with channel(one, pki, pki.alice) as first, channel(other, pki, pki.alice) as second:
        account = await stubs(first)[0].ConnectImapAccount(connect_request(mail_servers, mailbox), timeout=30)
        accounts, mail = stubs(second)
        seen = await accounts.GetAccount(apb.GetAccountRequest(name=account.name), timeout=10)
        assert seen.name == account.name
        listed = await mail.ListMessages(mpb.ListMessagesRequest(parent=account.name), timeout=30)
        assert [m.subject for m in listed.messages] == ["canary replica one"]
        # Tenancy holds on every replica: another tenant's caller does not see it there either.
    for replica in fleet:  # and each says, on its /metrics, that it hears the others
        scrape = await asyncio.to_thread(_scrape, replica.metrics_port)
        assert "mailbroker_fleet_listener_connected 1.0" in scrape
    async with channel(other, pki, pki.bob) as foreign:
        accounts, _ = stubs(foreign)
        listing = await accounts.ListAccounts(apb.ListAccountsRequest(), timeout=10)
        assert account.name not in [a.name for a in listing.accounts]


async def test_delete_through_one_replica_ends_feeds_and_refuses_calls_on_the_other(
    fleet: list[Replica], pki: TestPki, mail_servers: MailServers, mailbox: Mailbox
) -> None:
    one, other = fleet
    async with channel(one, pki, pki.alice) as first, channel(other, pki, pki.alice) as second:
        account = await stubs(first)[0].ConnectImapAccount(connect_request(mail_servers, mailbox), timeout=30)
        accounts, mail = stubs(second)
        stream = await _watching(mail, account.name)
        mail_servers.deliver(mailbox.address, sample("canary before erasure", to=mailbox.address))
        added = await asyncio.wait_for(stream.read(), 20)
        assert added.WhichOneof("event") == "message_added"

        erased_at = time.monotonic()
        receipt = await stubs(first)[0].DeleteAccount(apb.DeleteAccountRequest(name=account.name), timeout=30)
        assert receipt.account == account.name
        scrub = next(step for step in receipt.steps if step.kind == rpb.ERASURE_STEP_KIND_SCRUB_STORAGE)
        assert scrub.outcome == rpb.ERASURE_OUTCOME_DONE
        assert "crypto-shredding" in scrub.detail  # the receipt says what completes the erasure on PostgreSQL
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await _read_to_the_end(stream)
        took = time.monotonic() - erased_at
        assert (ended.value.code(), error_reason(ended.value)) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_ERASED")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await accounts.GetAccount(apb.GetAccountRequest(name=account.name), timeout=10)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    print(f"\nfigure: feed on the other replica ended {took * 1000:.0f} ms after DeleteAccount was called")


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


async def _watching(mail: object, account: str) -> Any:
    """A WatchMailbox stream, once the replica's upstream watcher has had time to enter IDLE."""
    request = mpb.WatchMailboxRequest(account=account, heartbeat_interval=duration_pb2.Duration(seconds=5))
    stream = mail.WatchMailbox(request, timeout=120)  # type: ignore[attr-defined]
    await asyncio.sleep(1.0)
    return stream


async def _read_to_the_end(stream: object) -> None:
    """Read events (heartbeats may come) until the stream ends: with an error, raised; cleanly, a failure."""
    while True:
        event = await asyncio.wait_for(stream.read(), 30)  # type: ignore[attr-defined]
        assert event is not grpc.aio.EOF, "the feed ended without an error"


@pytest.fixture
def google_fleet_config(fleet_config: Config, google_emulator: GoogleEmulator) -> Config:  # noqa: F811
    client = google_emulator.register_client([REDIRECT_URI])
    google_emulator.add_user(USER)
    return dataclasses.replace(
        fleet_config,
        google=google_emulator.broker_config(client, max_retry_seconds=5.0),
    )


async def test_a_hundred_calls_spread_over_replicas_on_an_expired_token_make_one_refresh(
    google_fleet_config: Config,
    google_emulator: GoogleEmulator,  # noqa: F811
    pki: TestPki,
    tmp_path: Path,
) -> None:
    emulator = google_emulator
    emulator.set_policy(rotate_refresh_tokens=True)  # a refresh token used twice would be refused: invalid_grant
    emulator.deliver(USER, _mail("canary fleet"))
    with replicas(google_fleet_config, tmp_path / "fleet") as (one, other):
        async with channel(one, pki, pki.alice) as first, channel(other, pki, pki.alice) as second:
            account = await _connect(stubs(first)[0], emulator, [rpb.CAPABILITY_READ])
            mails = [stubs(first)[1], stubs(second)[1]]
            refreshes = []
            for _round in range(2):  # a cold start, then every access token expired at Google
                before = emulator.counters().get("token.refresh_token", 0)
                calls = [mails[i % 2].ListMessages(_inbox(account), timeout=60) for i in range(CALLS)]
                results = await asyncio.gather(*calls)
                assert all(len(r.messages) == 1 for r in results)
                refreshes.append(emulator.counters().get("token.refresh_token", 0) - before)
                emulator.expire_access_tokens(USER)
    assert refreshes == [1, 1]
    # The refresh token the fleet holds is the one live at Google: none was lost or used twice.
    engine = create_engine(google_fleet_config.store_url)
    try:
        stored = Store(engine, load_keyring(google_fleet_config.keyring_file, {})).read_secret(
            account.name.split("/")[1], "refresh_token"
        )
    finally:
        engine.dispose()
    assert stored is not None and _live_refresh_tokens(emulator) == {stored.decode()}
    print(f"\nfigure: token-endpoint requests for {CALLS} calls over 2 replicas, twice: {refreshes}")


async def test_consent_given_through_one_replica_takes_effect_on_the_other(
    google_fleet_config: Config,
    google_emulator: GoogleEmulator,  # noqa: F811
    pki: TestPki,
    tmp_path: Path,
) -> None:
    """The other replica holds an access token of the READ grant; once SEND is granted through the first, the other
    sends at once: it dropped the old token (and its scopes) on the first's notice instead of waiting for expiry."""
    emulator = google_emulator
    emulator.deliver(USER, _mail("canary regrant"))
    with replicas(google_fleet_config, tmp_path / "fleet") as (one, other):
        async with channel(one, pki, pki.alice) as first, channel(other, pki, pki.alice) as second:
            accounts = stubs(first)[0]
            account = await _connect(accounts, emulator, [rpb.CAPABILITY_READ])
            _, mail = stubs(second)
            assert len((await mail.ListMessages(_inbox(account), timeout=30)).messages) == 1  # a READ-only token
            await _connect(accounts, emulator, [rpb.CAPABILITY_SEND], account=account.name)
            sent = await _send_once_granted(mail, account.name)
            assert sent.message
    assert len(emulator.sent_messages(USER)) == 1


async def _send_once_granted(mail: object, account: str) -> mpb.SendMessageResponse:
    """SendMessage, again while the replica still has the account's old capabilities cached (up to 2 s)."""
    recipient = rpb.EmailAddress(address="canary.rcpt@example.test")
    request = mpb.SendMessageRequest(
        account=account, message=mpb.OutgoingMessage(to_recipients=[recipient], subject="canary", text_body="x")
    )
    for _attempt in range(50):
        try:
            return await mail.SendMessage(request, timeout=30)  # type: ignore[attr-defined,no-any-return]
        except grpc.aio.AioRpcError as error:
            if error_reason(error) != "CAPABILITY_NOT_GRANTED":
                raise
        await asyncio.sleep(0.1)
    raise AssertionError("SEND never became usable on the other replica")


async def test_a_forged_erasure_notice_ends_nothing(
    fleet: list[Replica],
    fleet_config: Config,
    postgres: PostgresServer,
    pki: TestPki,
    mail_servers: MailServers,
    mailbox: Mailbox,
) -> None:
    """Anyone who can connect to the database can NOTIFY on the fleet's channel: a replica acts only on notices
    MACed with the broker's KEK, and on an erasure only once the store agrees the account is gone."""
    one, other = fleet
    async with channel(one, pki, pki.alice) as first, channel(other, pki, pki.alice) as second:
        account = await stubs(first)[0].ConnectImapAccount(connect_request(mail_servers, mailbox), timeout=30)
        _, mail = stubs(second)
        stream = await _watching(mail, account.name)
        database = make_url(fleet_config.store_url).database or ""
        forged = json.dumps({"t": "erased", "a": account.name.split("/")[1]})
        with postgres.connect(database, autocommit=True) as connection:
            connection.execute("SELECT pg_notify('mailbroker_fleet', %s)", (forged,))
        await asyncio.sleep(1.0)
        mail_servers.deliver(mailbox.address, sample("canary after the forged notice", to=mailbox.address))
        event = await asyncio.wait_for(stream.read(), 20)
        while event.WhichOneof("event") == "heartbeat":
            event = await asyncio.wait_for(stream.read(), 20)
        assert event.WhichOneof("event") == "message_added"
        stream.cancel()
