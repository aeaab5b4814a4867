"""Outlook / Microsoft 365 accounts end to end: a real broker over mTLS, the real msal and requests, and the local
Microsoft emulator (tests/emulators/microsoft) in place of Microsoft.

Canary addresses and the emulator's own tokens stand in for personal data; failure messages never print them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
from google.protobuf import duration_pb2
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1 import resources_pb2 as rpb

from server.config import Config, LimitsConfig
from server.providers.microsoft.graph import MAX_CONCURRENT_REQUESTS, WELL_KNOWN
from server.providers.microsoft.oauth import open_credential
from tests.broker import RunningBroker, broker_config, error_reason, running_broker, stubs
from tests.conformance.outlook_backend import REDIRECT_URI, microsoft_config
from tests.emulators.microsoft import MicrosoftEmulator
from tests.emulators.microsoft.fixtures import microsoft_emulator  # noqa: F401 - a fixture, found by name
from tests.pki import TestPki

CONCURRENT_CALLS = 100
GRAPH = "https://graph.microsoft.com/"
USER = "canary.outlook.user@contoso.test"
OTHER_USER = "canary.other.user@contoso.test"
HEARTBEAT = duration_pb2.Duration(seconds=5)
BROAD = ("mail.readwrite", "mail.read.shared", "mail.send.shared", ".default")


@dataclasses.dataclass
class MicrosoftSetup:
    emulator: MicrosoftEmulator
    config: Config
    pki: TestPki
    client_id: str


@pytest.fixture
def microsoft(tmp_path: Path, pki: TestPki, microsoft_emulator: MicrosoftEmulator) -> MicrosoftSetup:  # noqa: F811
    app = microsoft_emulator.register_app([REDIRECT_URI])
    microsoft_emulator.add_user(USER)
    microsoft_emulator.add_user(OTHER_USER)
    config = dataclasses.replace(
        broker_config(tmp_path, pki),
        # 100 concurrent calls from one identity (the single-flight test) are more than the default cap of 64.
        limits=LimitsConfig(max_concurrent_calls_per_identity=CONCURRENT_CALLS + 10),
        microsoft=microsoft_config(microsoft_emulator, app, max_retry_seconds=5.0),
    )
    return MicrosoftSetup(microsoft_emulator, config, pki, app.client_id)


@asynccontextmanager
async def serving(setup: MicrosoftSetup, config: Config | None = None) -> AsyncIterator[RunningBroker]:
    async with running_broker(config or setup.config, setup.pki) as running:
        yield running


async def _fails(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


async def _begin(accounts: object, capabilities: list[int], account: str = "") -> apb.BeginOAuthResponse:
    return await accounts.BeginOAuth(  # type: ignore[attr-defined,no-any-return]
        apb.BeginOAuthRequest(
            provider=rpb.PROVIDER_MICROSOFT, capabilities=capabilities, redirect_uri=REDIRECT_URI, account=account
        ),
        timeout=10,
    )


async def _connect(
    accounts: object,
    emulator: MicrosoftEmulator,
    capabilities: list[int],
    *,
    user: str = USER,
    untick: tuple[str, ...] = (),
    account: str = "",
) -> rpb.Account:
    begun = await _begin(accounts, capabilities, account)
    _, posted = await asyncio.to_thread(emulator.authorize_form_post, begun.authorization_uri, user=user, untick=untick)
    assert posted["state"] == begun.state
    return await accounts.CompleteOAuth(  # type: ignore[attr-defined,no-any-return]
        apb.CompleteOAuthRequest(state=posted["state"], code=posted["code"]), timeout=10
    )


def _mail(subject: str, *, attachment: bytes | None = None) -> bytes:
    message = EmailMessage()
    message["From"] = "Canary Sender <canary.sender@example.test>"
    message["To"] = USER
    message["Subject"] = subject
    message["Message-ID"] = f"<{subject.replace(' ', '-')}@example.test>"
    message.set_content("canary body text")
    if attachment is not None:
        message.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="data.bin")
    return bytes(message)


def _live_refresh_tokens(emulator: MicrosoftEmulator) -> set[str]:
    with emulator.state.lock:
        return {t for t, r in emulator.state.refresh_tokens.items() if not r.grant.revoked}


def _stored_refresh_token(broker: RunningBroker, account: rpb.Account) -> str:
    sealed = broker.store().read_secret(account.name.split("/")[1], "refresh_token")
    assert sealed is not None
    return open_credential(sealed.decode())[0]


async def _started(stream: object, emulator: MicrosoftEmulator) -> mpb.MailboxEvent:
    """Wait for the first heartbeat (the feed is up), deliver a message and read up to its MessageAdded."""
    first: mpb.MailboxEvent = await stream.read()  # type: ignore[attr-defined]
    assert first.WhichOneof("event") == "heartbeat"
    emulator.deliver(USER, _mail("canary watching"))
    while True:
        event: mpb.MailboxEvent = await stream.read()  # type: ignore[attr-defined]
        if event.WhichOneof("event") == "message_added":
            return event


async def _next_change(stream: object) -> mpb.MailboxEvent:
    while True:
        event: mpb.MailboxEvent = await stream.read()  # type: ignore[attr-defined]
        if event.WhichOneof("event") != "heartbeat":
            return event


def _inbox(account: rpb.Account) -> mpb.ListMessagesRequest:
    return mpb.ListMessagesRequest(parent=account.name, folder=f"{account.name}/folders/inbox")


def _store_bytes(data_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in data_dir.glob("*.db*"))


async def _read_to_the_end(stream: object, seen: list[mpb.MailboxEvent]) -> None:
    while (event := await stream.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        seen.append(event)


# -- consent -------------------------------------------------------------------------------------------------------


async def test_consent_asks_the_narrowest_scopes_with_pkce_and_stores_only_the_refresh_token_sealed(
    microsoft: MicrosoftSetup,
) -> None:
    async with serving(microsoft) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, _ = stubs(channel)
        begun = await _begin(accounts, [rpb.CAPABILITY_READ])
        query = _query(begun.authorization_uri)
        assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
        assert (query["response_type"], query["response_mode"]) == ("code", "form_post")
        assert sorted(query["scope"].split()) == sorted(["Mail.Read", "email", "openid", "profile", "offline_access"])
        assert not any(b in query["scope"].lower() for b in BROAD)
        assert query["state"] == begun.state and "code_verifier" not in query

        _, posted = await asyncio.to_thread(microsoft.emulator.authorize_form_post, begun.authorization_uri, user=USER)
        account = await accounts.CompleteOAuth(
            apb.CompleteOAuthRequest(state=posted["state"], code=posted["code"]), timeout=10
        )
        assert account.provider == rpb.PROVIDER_MICROSOFT and account.state == rpb.ACCOUNT_STATE_ACTIVE
        assert sorted(account.capabilities) == sorted([rpb.CAPABILITY_METADATA, rpb.CAPABILITY_READ])
        assert account.email_address == USER

        again = await _fails(
            accounts.CompleteOAuth(apb.CompleteOAuthRequest(state=posted["state"], code=posted["code"]), timeout=10)
        )
        assert (again.code(), error_reason(again)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_OAUTH_STATE")

        events = await accounts.ListAuditEvents(apb.ListAuditEventsRequest(account=account.name), timeout=10)
        (consent,) = [e for e in events.audit_events if e.action == rpb.AUDIT_ACTION_CONSENT_GRANTED]
        assert consent.provider == rpb.PROVIDER_MICROSOFT
        assert "Mail.Read" in consent.scopes and not any(b in " ".join(consent.scopes).lower() for b in BROAD)

    # At rest: the refresh token sealed, no access token anywhere, the address not in the clear.
    refresh_token = _stored_refresh_token(broker, account)
    assert refresh_token in _live_refresh_tokens(microsoft.emulator)
    on_disk = _store_bytes(Path(microsoft.config.data_dir))
    with microsoft.emulator.state.lock:
        access_tokens = list(microsoft.emulator.state.access_tokens)
    assert access_tokens
    leaked = [
        what
        for what, value in [("refresh token", refresh_token), ("address", USER)]
        + [("access token", t) for t in access_tokens]
        if value.encode() in on_disk
    ]
    assert leaked == []


async def test_unticked_scopes_decide_the_capabilities_and_none_is_refused(microsoft: MicrosoftSetup) -> None:
    async with serving(microsoft) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, _ = stubs(channel)
        send_only = await _connect(
            accounts, microsoft.emulator, [rpb.CAPABILITY_READ, rpb.CAPABILITY_SEND], untick=("Mail.Read",)
        )
        assert list(send_only.capabilities) == [rpb.CAPABILITY_SEND]

        error = await _fails(
            _connect(
                accounts, microsoft.emulator, [rpb.CAPABILITY_METADATA], user=OTHER_USER, untick=("Mail.ReadBasic",)
            )
        )
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_USABLE_SCOPES_GRANTED")
        listed = await accounts.ListAccounts(apb.ListAccountsRequest(), timeout=10)
        assert [a.name for a in listed.accounts] == [send_only.name]


async def test_incremental_consent_adds_send_and_bcc_stays_out_of_the_headers(microsoft: MicrosoftSetup) -> None:
    async with serving(microsoft) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, microsoft.emulator, [rpb.CAPABILITY_READ])
        outgoing = mpb.OutgoingMessage(
            to_recipients=[rpb.EmailAddress(address=OTHER_USER)],
            bcc_recipients=[rpb.EmailAddress(address="canary.hidden@example.test")],
            subject="canary subject",
            text_body="hello",
        )
        refused = await _fails(
            mail.SendMessage(mpb.SendMessageRequest(account=account.name, message=outgoing), timeout=10)
        )
        assert error_reason(refused) == "CAPABILITY_NOT_GRANTED"

        extended = await _connect(accounts, microsoft.emulator, [rpb.CAPABILITY_SEND], account=account.name)
        assert extended.name == account.name
        assert sorted(extended.capabilities) == sorted(
            [rpb.CAPABILITY_METADATA, rpb.CAPABILITY_READ, rpb.CAPABILITY_SEND]
        )
        asked = microsoft.emulator.authorization_requests()[-1]["scope"].split()
        assert {"Mail.Read", "Mail.Send"} <= set(asked) and "Mail.ReadBasic" not in asked

        sent = await mail.SendMessage(mpb.SendMessageRequest(account=account.name, message=outgoing), timeout=10)
        # sendMail answers 202 with nothing to name the sent copy by: only the Message-ID the broker made.
        assert sent.internet_message_id and not sent.message
        (delivered,) = microsoft.emulator.sent_messages(USER)
        assert delivered.kind == "mime"
        assert set(delivered.recipients) == {OTHER_USER, "canary.hidden@example.test"}
        assert b"canary.hidden@example.test" not in delivered.raw

        events = await accounts.ListAuditEvents(apb.ListAuditEventsRequest(account=account.name), timeout=10)
        consents = [e for e in events.audit_events if e.action == rpb.AUDIT_ACTION_CONSENT_GRANTED]
        assert len(consents) == 2 and "Mail.Send" in consents[1].scopes


async def test_incremental_consent_by_another_mailbox_changes_nothing(microsoft: MicrosoftSetup) -> None:
    async with serving(microsoft) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, _ = stubs(channel)
        account = await _connect(accounts, microsoft.emulator, [rpb.CAPABILITY_READ])
        error = await _fails(
            _connect(accounts, microsoft.emulator, [rpb.CAPABILITY_SEND], user=OTHER_USER, account=account.name)
        )
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.FAILED_PRECONDITION, "OAUTH_ACCOUNT_MISMATCH")


# -- mail ----------------------------------------------------------------------------------------------------------


async def test_list_read_and_stream_an_attachment_without_marking_anything_read(microsoft: MicrosoftSetup) -> None:
    payload = bytes(range(256)) * 1000
    microsoft.emulator.deliver(USER, _mail("canary first"))
    microsoft.emulator.deliver(USER, _mail("canary second", attachment=payload))
    async with serving(microsoft) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, microsoft.emulator, [rpb.CAPABILITY_READ])
        folders = await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10)
        roles = {f.role for f in folders.folders}
        assert {rpb.FOLDER_ROLE_INBOX, rpb.FOLDER_ROLE_SENT, rpb.FOLDER_ROLE_TRASH, rpb.FOLDER_ROLE_DRAFTS} <= roles

        listed = await mail.ListMessages(_inbox(account), timeout=10)
        assert [m.subject for m in listed.messages] == ["canary second", "canary first"]
        full = await mail.GetMessage(
            mpb.GetMessageRequest(name=listed.messages[0].name, view=rpb.MESSAGE_VIEW_FULL), timeout=10
        )
        assert full.text_body.strip() == "canary body text"
        (attachment,) = full.attachments
        chunks = [c async for c in mail.GetAttachment(mpb.GetAttachmentRequest(name=attachment.name), timeout=10)]
        assert b"".join(c.data for c in chunks) == payload and len(chunks) > 1
        with microsoft.emulator.state.lock:
            box = microsoft.emulator.mailbox(USER)
            assert not any(m.is_read for m in box.messages.values())
        # The attachment came through /$value, never as contentBytes in JSON.
        assert microsoft.emulator.counters().get("graph.attachment.value", 0) == 1


async def test_a_metadata_account_never_asks_for_a_body(microsoft: MicrosoftSetup) -> None:
    microsoft.emulator.deliver(USER, _mail("canary meta"))
    async with serving(microsoft) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, microsoft.emulator, [rpb.CAPABILITY_METADATA])
        assert list(account.capabilities) == [rpb.CAPABILITY_METADATA]
        assert "Mail.ReadBasic" in microsoft.emulator.authorization_requests()[-1]["scope"].split()
        listed = await mail.ListMessages(_inbox(account), timeout=10)
        assert [m.subject for m in listed.messages] == ["canary meta"]
        await mail.GetMessage(
            mpb.GetMessageRequest(name=listed.messages[0].name, view=rpb.MESSAGE_VIEW_METADATA), timeout=10
        )
        error = await _fails(
            mail.GetMessage(mpb.GetMessageRequest(name=listed.messages[0].name, view=rpb.MESSAGE_VIEW_FULL), timeout=10)
        )
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.PERMISSION_DENIED, "CAPABILITY_NOT_GRANTED")
    selects = [
        ",".join(r.query.get("$select", [""])).lower() for r in microsoft.emulator.requests("/v1.0/me/") if r.query
    ]
    assert selects and not any(field in s.split(",") for s in selects for field in ("body", "bodypreview"))


async def test_at_most_four_requests_per_mailbox_are_in_flight(microsoft: MicrosoftSetup) -> None:
    for n in range(3):
        microsoft.emulator.deliver(USER, _mail(f"canary parallel {n}"))
    async with serving(microsoft) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, microsoft.emulator, [rpb.CAPABILITY_READ])
        listed = await mail.ListMessages(_inbox(account), timeout=10)
        names = [m.name for m in listed.messages] * 4
        with microsoft.emulator.hold_graph_requests():
            calls = [
                asyncio.ensure_future(
                    mail.GetMessage(mpb.GetMessageRequest(name=n, view=rpb.MESSAGE_VIEW_METADATA), timeout=30)
                )
                for n in names
            ]
            assert await asyncio.to_thread(microsoft.emulator.wait_for_in_flight, USER, MAX_CONCURRENT_REQUESTS)
            # Four are held at the emulator; the rest wait in the broker, none was turned away.
            assert microsoft.emulator.in_flight(USER) == MAX_CONCURRENT_REQUESTS
        results = await asyncio.gather(*calls)
        assert len(results) == len(names)
        assert microsoft.emulator.counters().get("graph.throttled", 0) == 0


# -- tokens --------------------------------------------------------------------------------------------------------


async def test_a_hundred_concurrent_calls_on_a_cold_token_make_one_refresh(microsoft: MicrosoftSetup) -> None:
    microsoft.emulator.deliver(USER, _mail("canary concurrent"))
    async with serving(microsoft) as broker, broker.channel(broker.pki.alice) as channel:
        account = await _connect(stubs(channel)[0], microsoft.emulator, [rpb.CAPABILITY_READ])
    before = microsoft.emulator.counters().get("token.refresh_token", 0)
    async with serving(microsoft) as broker, broker.channel(broker.pki.alice) as channel:
        _, mail = stubs(channel)
        results = await asyncio.gather(
            *(mail.ListMessages(_inbox(account), timeout=60) for _ in range(CONCURRENT_CALLS))
        )
        assert all(len(r.messages) == 1 for r in results)
    assert microsoft.emulator.counters().get("token.refresh_token", 0) - before == 1


async def test_concurrent_calls_on_a_new_driver_look_up_the_well_known_folders_once(microsoft: MicrosoftSetup) -> None:
    async with serving(microsoft) as broker, broker.channel(broker.pki.alice) as channel:
        account = await _connect(stubs(channel)[0], microsoft.emulator, [rpb.CAPABILITY_READ])
    lookups = [f"/v1.0/me/mailFolders/{name}" for name in WELL_KNOWN]
    before = [r.path for r in microsoft.emulator.requests() if r.path in lookups]
    async with serving(microsoft) as broker, broker.channel(broker.pki.alice) as channel:
        _, mail = stubs(channel)
        await asyncio.gather(*(mail.ListMessages(_inbox(account), timeout=60) for _ in range(CONCURRENT_CALLS)))
    after = [r.path for r in microsoft.emulator.requests() if r.path in lookups]
    assert sorted(after[len(before) :]) == sorted(lookups)


async def test_the_rotated_refresh_token_is_persisted_on_every_refresh(microsoft: MicrosoftSetup) -> None:
    async with serving(microsoft) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, microsoft.emulator, [rpb.CAPABILITY_READ])
        first = _stored_refresh_token(broker, account)
        microsoft.emulator.expire_access_tokens(USER)
        await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10)
        second = _stored_refresh_token(broker, account)
        microsoft.emulator.expire_access_tokens(USER)
        await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10)
        third = _stored_refresh_token(broker, account)
        assert len({first, second, third}) == 3
        # The refresh asked for exactly what was granted (msal adds the OpenID scopes).
        (refresh,) = [r for r in microsoft.emulator.requests() if b"grant_type=refresh_token" in r.body][-1:]
        asked = set(parse_qs(refresh.body.decode())["scope"][0].lower().split())
        assert asked == {"mail.read", "email", "openid", "profile", "offline_access"}


@pytest.mark.parametrize("how", ["revoke_consent", "require_interaction"])
async def test_a_refused_grant_makes_the_account_need_reauth_and_consent_brings_it_back(
    microsoft: MicrosoftSetup, how: str
) -> None:
    async with serving(microsoft) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, microsoft.emulator, [rpb.CAPABILITY_READ])
        stream = mail.WatchMailbox(mpb.WatchMailboxRequest(account=account.name, heartbeat_interval=HEARTBEAT))
        await _started(stream, microsoft.emulator)

        if how == "revoke_consent":
            microsoft.emulator.revoke_consent(USER)
        else:
            microsoft.emulator.require_interaction(USER)
        microsoft.emulator.expire_access_tokens(USER)
        error = await _fails(mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_NEEDS_REAUTH")
        state = await accounts.GetAccount(apb.GetAccountRequest(name=account.name), timeout=10)
        assert state.state == rpb.ACCOUNT_STATE_NEEDS_REAUTH

        seen: list[mpb.MailboxEvent] = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await _read_to_the_end(stream, seen)
        changes = [e.account_state_changed for e in seen if e.WhichOneof("event") == "account_state_changed"]
        assert changes and all(c.state == rpb.ACCOUNT_STATE_NEEDS_REAUTH for c in changes)
        assert error_reason(ended.value) == "ACCOUNT_NEEDS_REAUTH"

        again = await _connect(accounts, microsoft.emulator, [rpb.CAPABILITY_READ], account=account.name)
        assert again.state == rpb.ACCOUNT_STATE_ACTIVE
        await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10)


async def test_throttling_is_retried_after_retry_after_within_the_limit(microsoft: MicrosoftSetup) -> None:
    async with serving(microsoft) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, microsoft.emulator, [rpb.CAPABILITY_READ])
        await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10)
        microsoft.emulator.throttle(2, status=429, retry_after=0, user=USER)
        await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10)
        microsoft.emulator.throttle(1, status=503, code="serviceNotAvailable", retry_after=0, user=USER)
        await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10)
        assert microsoft.emulator.counters()["graph.throttled"] == 3

        microsoft.emulator.throttle(1, status=429, retry_after=60, user=USER)  # longer than the broker will wait
        error = await _fails(mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_RATE_LIMITED")


# -- feed and erasure ----------------------------------------------------------------------------------------------


async def test_the_delta_feed_delivers_resumes_after_a_restart_and_resyncs_an_expired_cursor(
    microsoft: MicrosoftSetup,
) -> None:
    async with serving(microsoft) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, microsoft.emulator, [rpb.CAPABILITY_READ])
        stream = mail.WatchMailbox(mpb.WatchMailboxRequest(account=account.name, heartbeat_interval=HEARTBEAT))
        event = await _started(stream, microsoft.emulator)
        assert event.message_added.message.subject == "canary watching"
        token = event.resume_token
        stream.cancel()

    away = microsoft.emulator.deliver(USER, _mail("canary while away"))
    async with serving(microsoft) as broker, broker.channel(broker.pki.alice) as channel:
        _, mail = stubs(channel)
        resumed = mail.WatchMailbox(
            mpb.WatchMailboxRequest(account=account.name, resume_token=token, heartbeat_interval=HEARTBEAT)
        )
        event = await _next_change(resumed)
        assert event.WhichOneof("event") == "message_added"
        assert event.message_added.message.subject == "canary while away"
        microsoft.emulator.set_flag(USER, away.id)
        event = await _next_change(resumed)
        assert event.WhichOneof("event") == "message_updated" and event.message_updated.message.flagged
        microsoft.emulator.delete_message(USER, away.id, permanent=True)
        event = await _next_change(resumed)
        assert event.WhichOneof("event") == "message_deleted"
        resumed.cancel()

        microsoft.emulator.expire_delta_tokens(USER)
        expired = mail.WatchMailbox(
            mpb.WatchMailboxRequest(account=account.name, resume_token=token, heartbeat_interval=HEARTBEAT)
        )
        event = await _next_change(expired)
        assert event.WhichOneof("event") == "resync_required"
        assert event.resync_required.reason == mpb.RESYNC_REASON_CURSOR_EXPIRED
        expired.cancel()


async def test_one_delta_poller_serves_every_watched_folder_of_an_account(microsoft: MicrosoftSetup) -> None:
    projects = microsoft.emulator.create_folder(USER, "Canary Projects")
    async with serving(microsoft) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, microsoft.emulator, [rpb.CAPABILITY_READ])
        folders = await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10)
        (folder,) = [f for f in folders.folders if f.display_name == "Canary Projects"]
        watch = mpb.WatchMailboxRequest(
            account=account.name,
            folders=[f"{account.name}/folders/inbox", folder.name],
            heartbeat_interval=HEARTBEAT,
        )
        first, second = mail.WatchMailbox(watch), mail.WatchMailbox(watch)
        for stream in (first, second):
            assert (await stream.read()).WhichOneof("event") == "heartbeat"
        microsoft.emulator.deliver(USER, _mail("canary in projects"), projects)
        for stream in (first, second):
            event = await _next_change(stream)
            assert event.message_added.message.subject == "canary in projects"
        first.cancel()
        second.cancel()
    # Every delta request went through one account's poller: never two rounds of a folder at once.
    deltas = [r for r in microsoft.emulator.requests("/v1.0/me/mailFolders") if "delta" in r.path]
    assert deltas


async def test_delete_account_says_microsoft_cannot_revoke_and_where_the_user_removes_the_app(
    microsoft: MicrosoftSetup,
) -> None:
    async with serving(microsoft) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, microsoft.emulator, [rpb.CAPABILITY_READ])
        stream = mail.WatchMailbox(mpb.WatchMailboxRequest(account=account.name, heartbeat_interval=HEARTBEAT))
        await _started(stream, microsoft.emulator)
        receipt = await accounts.DeleteAccount(apb.DeleteAccountRequest(name=account.name), timeout=30)
        (revoke,) = [s for s in receipt.steps if s.kind == rpb.ERASURE_STEP_KIND_REVOKE_AT_PROVIDER]
        assert revoke.outcome == rpb.ERASURE_OUTCOME_NOT_SUPPORTED_BY_PROVIDER
        assert "myapps.microsoft.com" in revoke.detail
        steps = {s.kind: s.outcome for s in receipt.steps}
        assert steps[rpb.ERASURE_STEP_KIND_PURGE_ROWS] == rpb.ERASURE_OUTCOME_DONE
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await _read_to_the_end(stream, [])
        assert ended.value.code() == grpc.StatusCode.NOT_FOUND
        assert broker.store().read_secret(account.name.split("/")[1], "refresh_token") is None


def test_the_stored_credential_names_only_the_granted_scopes() -> None:
    from server.providers.microsoft.oauth import seal_credential

    sealed = seal_credential("rt", [GRAPH + "Mail.Read", "openid", "profile", "offline_access", "email"])
    assert json.loads(sealed)["scopes"] == ["email", "mail.read"]
    assert open_credential(sealed) == ("rt", ["email", "mail.read"])
    assert open_credential("bare-token") == ("bare-token", ["email"])
