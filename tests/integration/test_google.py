"""Gmail accounts end to end: a real broker over mTLS, the real google-auth / google-api-python-client, and the local
Google emulator (tests/emulators/google) in place of Google.

Canary addresses and the emulator's own tokens stand in for personal data; failure messages never print them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1 import resources_pb2 as rpb

from server.config import Config, LimitsConfig, OAuthConfig
from server.providers.google.oauth import METADATA_SCOPE, READONLY_SCOPE, SEND_SCOPE
from tests.broker import RunningBroker, broker_config, error_reason, rich_status, running_broker, stubs
from tests.emulators.google import GoogleEmulator
from tests.emulators.google.fixtures import google_emulator  # noqa: F401 - a fixture, found by name
from tests.pki import TestPki

CONCURRENT_CALLS = 100
REDIRECT_URI = "https://app.example.test/oauth/callback"
USER = "canary.gmail.user@example.test"
OTHER_USER = "canary.other.user@example.test"
USERINFO_EMAIL = "https://www.googleapis.com/auth/userinfo.email"
HEARTBEAT = duration_pb2.Duration(seconds=5)
BROAD = ("https://mail.google.com/", "gmail.modify", "gmail.compose")


@dataclasses.dataclass
class GoogleSetup:
    emulator: GoogleEmulator
    config: Config
    pki: TestPki


@pytest.fixture
def google(tmp_path: Path, pki: TestPki, google_emulator: GoogleEmulator) -> GoogleSetup:  # noqa: F811
    client = google_emulator.register_client([REDIRECT_URI])
    google_emulator.add_user(USER)
    google_emulator.add_user(OTHER_USER)
    config = dataclasses.replace(
        broker_config(tmp_path, pki),
        # 100 concurrent calls from one identity (the single-flight test) are more than the default cap of 64.
        limits=LimitsConfig(max_concurrent_calls_per_identity=CONCURRENT_CALLS + 10),
        google=google_emulator.broker_config(client, max_retry_seconds=5.0, history_poll_seconds=0.2),
    )
    return GoogleSetup(google_emulator, config, pki)


@asynccontextmanager
async def serving(setup: GoogleSetup, config: Config | None = None) -> AsyncIterator[RunningBroker]:
    async with running_broker(config or setup.config, setup.pki) as running:
        yield running


async def _fails(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


async def _connect(
    accounts: object,
    emulator: GoogleEmulator,
    capabilities: list[int],
    *,
    user: str = USER,
    untick: tuple[str, ...] = (),
    account: str = "",
) -> rpb.Account:
    begun = await accounts.BeginOAuth(  # type: ignore[attr-defined]
        apb.BeginOAuthRequest(
            provider=rpb.PROVIDER_GOOGLE, capabilities=capabilities, redirect_uri=REDIRECT_URI, account=account
        ),
        timeout=10,
    )
    location = await asyncio.to_thread(emulator.authorize, begun.authorization_uri, user=user, untick=untick)
    back = _query(location)
    assert back["state"] == begun.state
    return await accounts.CompleteOAuth(  # type: ignore[attr-defined,no-any-return]
        apb.CompleteOAuthRequest(state=back["state"], code=back["code"]), timeout=10
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


def _live_refresh_tokens(emulator: GoogleEmulator) -> set[str]:
    with emulator.state.lock:
        return {t for t, r in emulator.state.refresh_tokens.items() if not r.revoked and not r.grant.revoked}


async def _started(stream: object, emulator: GoogleEmulator) -> mpb.MailboxEvent:
    """Wait for the first heartbeat (the feed is up), deliver a message and read up to its MessageAdded."""
    first: mpb.MailboxEvent = await stream.read()  # type: ignore[attr-defined]
    assert first.WhichOneof("event") == "heartbeat"
    emulator.deliver(USER, _mail("canary watching"))
    while True:
        event: mpb.MailboxEvent = await stream.read()  # type: ignore[attr-defined]
        if event.WhichOneof("event") == "message_added":
            return event


def _retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay of an error, in seconds."""
    status = rich_status(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


def _inbox(account: rpb.Account) -> mpb.ListMessagesRequest:
    return mpb.ListMessagesRequest(parent=account.name, folder=f"{account.name}/folders/INBOX")


def _store_bytes(data_dir: Path) -> bytes:
    """The raw bytes of the SQLite store, its WAL and shm."""
    return b"".join(p.read_bytes() for p in data_dir.glob("broker.db*"))


async def _read_to_the_end(stream: object, seen: list[mpb.MailboxEvent]) -> None:
    """Read events into ``seen`` until the stream ends (an error raises; a clean end returns)."""
    while (event := await stream.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        seen.append(event)


# -- consent -------------------------------------------------------------------------------------------------------


async def test_consent_asks_the_narrowest_scopes_with_pkce_and_stores_only_the_refresh_token_sealed(
    google: GoogleSetup,
) -> None:
    async with serving(google) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, _ = stubs(channel)
        begun = await accounts.BeginOAuth(
            apb.BeginOAuthRequest(
                provider=rpb.PROVIDER_GOOGLE, capabilities=[rpb.CAPABILITY_READ], redirect_uri=REDIRECT_URI
            ),
            timeout=10,
        )
        query = _query(begun.authorization_uri)
        assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
        assert (query["access_type"], query["include_granted_scopes"], query["response_type"]) == (
            "offline",
            "true",
            "code",
        )
        assert sorted(query["scope"].split()) == sorted([READONLY_SCOPE, "openid", "email"])
        assert list(begun.scopes) == query["scope"].split()
        assert not any(b in query["scope"] for b in BROAD)
        assert query["state"] == begun.state and "code_verifier" not in query

        location = await asyncio.to_thread(google.emulator.authorize, begun.authorization_uri, user=USER)
        back = _query(location)
        account = await accounts.CompleteOAuth(
            apb.CompleteOAuthRequest(state=back["state"], code=back["code"]), timeout=10
        )
        assert account.provider == rpb.PROVIDER_GOOGLE and account.state == rpb.ACCOUNT_STATE_ACTIVE
        assert sorted(account.capabilities) == sorted([rpb.CAPABILITY_METADATA, rpb.CAPABILITY_READ])
        assert account.email_address == USER

        # The same state again: single use.
        error = await _fails(
            accounts.CompleteOAuth(apb.CompleteOAuthRequest(state=back["state"], code=back["code"]), timeout=10)
        )
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_OAUTH_STATE")

        events = await accounts.ListAuditEvents(apb.ListAuditEventsRequest(account=account.name), timeout=10)
        consent = [e for e in events.audit_events if e.action == rpb.AUDIT_ACTION_CONSENT_GRANTED]
        assert len(consent) == 1 and consent[0].provider == rpb.PROVIDER_GOOGLE
        # What Google granted, in its spelling (the email scope comes back as userinfo.email).
        granted = set(consent[0].scopes)
        assert {READONLY_SCOPE, "openid"} <= granted and granted & {"email", USERINFO_EMAIL}
        assert len(granted) == 3

    # At rest: the refresh token is sealed, no access token is anywhere, the address is not in the clear.
    store = broker.store()
    account_id = account.name.split("/")[1]
    refresh_token = store.read_secret(account_id, "refresh_token")
    assert refresh_token is not None
    live = _live_refresh_tokens(google.emulator)
    assert refresh_token.decode() in live
    on_disk = _store_bytes(Path(google.config.data_dir))
    access_tokens = list(google.emulator.state.access_tokens)
    assert access_tokens
    leaked = [
        what
        for what, value in [("refresh token", refresh_token.decode()), ("address", USER)]
        + [("access token", t) for t in access_tokens]
        if value.encode() in on_disk
    ]
    assert leaked == []


async def test_a_state_is_bound_to_its_caller_and_expires(google: GoogleSetup) -> None:
    short = dataclasses.replace(google.config, oauth=OAuthConfig(state_ttl_seconds=0.001))
    async with serving(google, short) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, _ = stubs(channel)
        begun = await accounts.BeginOAuth(
            apb.BeginOAuthRequest(
                provider=rpb.PROVIDER_GOOGLE, capabilities=[rpb.CAPABILITY_READ], redirect_uri=REDIRECT_URI
            ),
            timeout=10,
        )
        back = _query(await asyncio.to_thread(google.emulator.authorize, begun.authorization_uri, user=USER))
        expired = await _fails(
            accounts.CompleteOAuth(apb.CompleteOAuthRequest(state=back["state"], code=back["code"]), timeout=10)
        )
        assert (expired.code(), error_reason(expired)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_OAUTH_STATE")
        assert google.emulator.counters().get("token.authorization_code", 0) == 0
        assert len((await accounts.ListAccounts(apb.ListAccountsRequest(), timeout=10)).accounts) == 0

    async with (
        serving(google) as broker,
        broker.channel(broker.pki.alice) as alice,
        broker.channel(broker.pki.bob) as bob,
    ):
        begun = await stubs(alice)[0].BeginOAuth(
            apb.BeginOAuthRequest(
                provider=rpb.PROVIDER_GOOGLE, capabilities=[rpb.CAPABILITY_READ], redirect_uri=REDIRECT_URI
            ),
            timeout=10,
        )
        back = _query(await asyncio.to_thread(google.emulator.authorize, begun.authorization_uri, user=USER))
        foreign = await _fails(
            stubs(bob)[0].CompleteOAuth(apb.CompleteOAuthRequest(state=back["state"], code=back["code"]), timeout=10)
        )
        assert (foreign.code(), error_reason(foreign)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_OAUTH_STATE")
        # Bob's attempt did not use up Alice's state.
        account = await stubs(alice)[0].CompleteOAuth(
            apb.CompleteOAuthRequest(state=back["state"], code=back["code"]), timeout=10
        )
        assert account.state == rpb.ACCOUNT_STATE_ACTIVE


async def test_bad_begin_requests_are_refused_with_a_reason(google: GoogleSetup) -> None:
    async with serving(google) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, _ = stubs(channel)
        cases = [
            (
                apb.BeginOAuthRequest(
                    provider=rpb.PROVIDER_GOOGLE,
                    capabilities=[rpb.CAPABILITY_READ],
                    redirect_uri="https://evil.example/cb",
                ),
                "REDIRECT_URI_NOT_REGISTERED",
            ),
            (
                apb.BeginOAuthRequest(provider=rpb.PROVIDER_GOOGLE, redirect_uri=REDIRECT_URI),
                "INVALID_CAPABILITIES",
            ),
            (
                apb.BeginOAuthRequest(
                    provider=rpb.PROVIDER_GOOGLE,
                    capabilities=[rpb.CAPABILITY_READ],
                    redirect_uri=REDIRECT_URI,
                    login_hint="a\r\nb",
                ),
                "INVALID_ARGUMENT",
            ),
        ]
        for request, reason in cases:
            error = await _fails(accounts.BeginOAuth(request, timeout=10))
            assert (error.code(), error_reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, reason)


async def test_unticked_scopes_decide_the_capabilities_and_none_is_refused(google: GoogleSetup) -> None:
    async with serving(google) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, _ = stubs(channel)
        send_only = await _connect(
            accounts,
            google.emulator,
            [rpb.CAPABILITY_READ, rpb.CAPABILITY_SEND],
            untick=(READONLY_SCOPE,),
        )
        assert list(send_only.capabilities) == [rpb.CAPABILITY_SEND]

        error = await _fails(
            _connect(accounts, google.emulator, [rpb.CAPABILITY_METADATA], user=OTHER_USER, untick=(METADATA_SCOPE,))
        )
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_USABLE_SCOPES_GRANTED")
        listed = await accounts.ListAccounts(apb.ListAccountsRequest(), timeout=10)
        assert [a.name for a in listed.accounts] == [send_only.name]
        # The grant the broker could not use was given back.
        assert google.emulator.granted_scopes(OTHER_USER, google.config.google.client_id) == set()


async def test_incremental_consent_adds_send_and_records_a_second_consent(google: GoogleSetup) -> None:
    async with serving(google) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, google.emulator, [rpb.CAPABILITY_READ])
        refused = await _fails(
            mail.SendMessage(
                mpb.SendMessageRequest(
                    account=account.name,
                    message=mpb.OutgoingMessage(to_recipients=[rpb.EmailAddress(address=OTHER_USER)], subject="x"),
                ),
                timeout=10,
            )
        )
        assert error_reason(refused) == "CAPABILITY_NOT_GRANTED"

        extended = await _connect(accounts, google.emulator, [rpb.CAPABILITY_SEND], account=account.name)
        assert extended.name == account.name
        assert sorted(extended.capabilities) == sorted(
            [rpb.CAPABILITY_METADATA, rpb.CAPABILITY_READ, rpb.CAPABILITY_SEND]
        )
        request = google.emulator.authorization_requests()[-1]
        assert set(request["scope"].split()) == {READONLY_SCOPE, SEND_SCOPE, "openid", "email"}

        sent = await mail.SendMessage(
            mpb.SendMessageRequest(
                account=account.name,
                message=mpb.OutgoingMessage(
                    to_recipients=[rpb.EmailAddress(address=OTHER_USER)],
                    bcc_recipients=[rpb.EmailAddress(address="canary.hidden@example.test")],
                    subject="canary subject",
                    text_body="hello",
                ),
            ),
            timeout=10,
        )
        assert sent.message
        (delivered,) = google.emulator.sent_messages(USER)
        assert set(delivered.recipients) == {OTHER_USER, "canary.hidden@example.test"}
        assert b"canary.hidden@example.test" not in delivered.raw  # Gmail drops Bcc from what it stores

        events = await accounts.ListAuditEvents(apb.ListAuditEventsRequest(account=account.name), timeout=10)
        consents = [e for e in events.audit_events if e.action == rpb.AUDIT_ACTION_CONSENT_GRANTED]
        assert len(consents) == 2 and SEND_SCOPE in consents[1].scopes


async def test_incremental_consent_by_another_mailbox_changes_nothing(google: GoogleSetup) -> None:
    async with serving(google) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, _ = stubs(channel)
        account = await _connect(accounts, google.emulator, [rpb.CAPABILITY_READ])
        error = await _fails(
            _connect(accounts, google.emulator, [rpb.CAPABILITY_SEND], user=OTHER_USER, account=account.name)
        )
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.FAILED_PRECONDITION, "OAUTH_ACCOUNT_MISMATCH")
        again = await accounts.GetAccount(apb.GetAccountRequest(name=account.name), timeout=10)
        assert list(again.capabilities) == list(account.capabilities)


# -- mail ----------------------------------------------------------------------------------------------------------


async def test_list_read_and_stream_an_attachment(google: GoogleSetup) -> None:
    payload = bytes(range(256)) * 1000
    google.emulator.deliver(USER, _mail("canary first"))
    google.emulator.deliver(USER, _mail("canary second", attachment=payload))
    async with serving(google) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, google.emulator, [rpb.CAPABILITY_READ])
        folders = await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10)
        roles = {f.role for f in folders.folders}
        assert {rpb.FOLDER_ROLE_INBOX, rpb.FOLDER_ROLE_SENT, rpb.FOLDER_ROLE_TRASH} <= roles

        listed = await mail.ListMessages(_inbox(account), timeout=10)
        assert [m.subject for m in listed.messages] == ["canary second", "canary first"]
        full = await mail.GetMessage(
            mpb.GetMessageRequest(name=listed.messages[0].name, view=rpb.MESSAGE_VIEW_FULL), timeout=10
        )
        assert full.text_body.strip() == "canary body text"
        (attachment,) = full.attachments
        chunks = [c async for c in mail.GetAttachment(mpb.GetAttachmentRequest(name=attachment.name), timeout=10)]
        assert b"".join(c.data for c in chunks) == payload and len(chunks) > 1
        # Reading set nothing: the message is still unread at Gmail.
        assert "UNREAD" in google.emulator.message_labels(USER, listed.messages[0].name.rsplit("/", 1)[1])


async def test_a_metadata_account_cannot_read_bodies(google: GoogleSetup) -> None:
    google.emulator.deliver(USER, _mail("canary meta"))
    async with serving(google) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, google.emulator, [rpb.CAPABILITY_METADATA])
        assert list(account.capabilities) == [rpb.CAPABILITY_METADATA]
        assert METADATA_SCOPE in google.emulator.authorization_requests()[-1]["scope"].split()
        listed = await mail.ListMessages(_inbox(account), timeout=10)
        assert [m.subject for m in listed.messages] == ["canary meta"]
        error = await _fails(
            mail.GetMessage(mpb.GetMessageRequest(name=listed.messages[0].name, view=rpb.MESSAGE_VIEW_FULL), timeout=10)
        )
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.PERMISSION_DENIED, "CAPABILITY_NOT_GRANTED")


# -- tokens --------------------------------------------------------------------------------------------------------


async def test_a_hundred_concurrent_calls_on_a_cold_token_make_one_refresh(google: GoogleSetup) -> None:
    google.emulator.deliver(USER, _mail("canary concurrent"))
    async with serving(google) as broker, broker.channel(broker.pki.alice) as channel:
        account = await _connect(stubs(channel)[0], google.emulator, [rpb.CAPABILITY_READ])
    before = google.emulator.counters().get("token.refresh_token", 0)
    # A restarted broker holds no access token: the first calls all need one.
    async with serving(google) as broker, broker.channel(broker.pki.alice) as channel:
        _, mail = stubs(channel)
        calls = [mail.ListMessages(_inbox(account), timeout=30) for _ in range(CONCURRENT_CALLS)]
        results = await asyncio.gather(*calls)
        assert all(len(r.messages) == 1 for r in results)
    assert google.emulator.counters().get("token.refresh_token", 0) - before == 1


async def test_a_rotated_refresh_token_is_persisted_before_use(google: GoogleSetup) -> None:
    google.emulator.set_policy(rotate_refresh_tokens=True)
    async with serving(google) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, google.emulator, [rpb.CAPABILITY_READ])
        account_id = account.name.split("/")[1]
        first = broker.store().read_secret(account_id, "refresh_token")
        await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10)
        second = broker.store().read_secret(account_id, "refresh_token")
        assert first != second
        google.emulator.expire_access_tokens(USER)
        await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10)
        third = broker.store().read_secret(account_id, "refresh_token")
        assert third not in (first, second)
        assert third is not None and _live_refresh_tokens(google.emulator) == {third.decode()}


async def test_a_revoked_grant_makes_the_account_need_reauth_and_consent_brings_it_back(google: GoogleSetup) -> None:
    async with serving(google) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, google.emulator, [rpb.CAPABILITY_READ])
        stream = mail.WatchMailbox(mpb.WatchMailboxRequest(account=account.name, heartbeat_interval=HEARTBEAT))
        await _started(stream, google.emulator)

        google.emulator.revoke_user(USER)
        google.emulator.expire_access_tokens(USER)
        error = await _fails(mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_NEEDS_REAUTH")
        state = await accounts.GetAccount(apb.GetAccountRequest(name=account.name), timeout=10)
        assert state.state == rpb.ACCOUNT_STATE_NEEDS_REAUTH

        seen: list[mpb.MailboxEvent] = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await _read_to_the_end(stream, seen)
        changes = [e.account_state_changed for e in seen if e.WhichOneof("event") == "account_state_changed"]
        assert changes and all(c.state == rpb.ACCOUNT_STATE_NEEDS_REAUTH for c in changes)
        assert (ended.value.code(), error_reason(ended.value)) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "ACCOUNT_NEEDS_REAUTH",
        )

        again = await _connect(accounts, google.emulator, [rpb.CAPABILITY_READ], account=account.name)
        assert again.state == rpb.ACCOUNT_STATE_ACTIVE
        await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10)


async def test_throttling_is_retried_after_retry_after_within_the_deadline(google: GoogleSetup) -> None:
    async with serving(google) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, google.emulator, [rpb.CAPABILITY_READ])
        google.emulator.throttle(2, status=429, retry_after=0)
        await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10)
        assert google.emulator.counters()["gmail.throttled"] == 2

        google.emulator.throttle(1, status=429, retry_after=60)  # longer than the broker will wait
        error = await _fails(mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_RATE_LIMITED")
        assert _retry_delay(error) == 60

        # Within the broker's retry budget but past the caller's deadline: the caller gets the reason, in time.
        google.emulator.throttle(1, status=429, retry_after=3)
        error = await _fails(mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=2))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_RATE_LIMITED")
        assert _retry_delay(error) == 3


# -- feed and erasure ----------------------------------------------------------------------------------------------


async def test_the_history_feed_delivers_resumes_after_a_restart_and_resyncs_an_expired_cursor(
    google: GoogleSetup,
) -> None:
    async with serving(google) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, google.emulator, [rpb.CAPABILITY_READ])
        stream = mail.WatchMailbox(mpb.WatchMailboxRequest(account=account.name, heartbeat_interval=HEARTBEAT))
        event = await _started(stream, google.emulator)
        assert event.message_added.message.subject == "canary watching"
        token = event.resume_token
        stream.cancel()

    google.emulator.deliver(USER, _mail("canary while away"))
    async with serving(google) as broker, broker.channel(broker.pki.alice) as channel:
        _, mail = stubs(channel)
        resumed = mail.WatchMailbox(
            mpb.WatchMailboxRequest(account=account.name, resume_token=token, heartbeat_interval=HEARTBEAT)
        )
        event = await resumed.read()
        while event.WhichOneof("event") == "heartbeat":
            event = await resumed.read()
        assert event.WhichOneof("event") == "message_added"
        assert event.message_added.message.subject == "canary while away"
        resumed.cancel()

        google.emulator.expire_history(USER)
        expired = mail.WatchMailbox(
            mpb.WatchMailboxRequest(account=account.name, resume_token=token, heartbeat_interval=HEARTBEAT)
        )
        event = await expired.read()
        while event.WhichOneof("event") == "heartbeat":
            event = await expired.read()
        assert event.WhichOneof("event") == "resync_required"
        assert event.resync_required.reason == mpb.RESYNC_REASON_CURSOR_EXPIRED
        expired.cancel()


async def test_delete_account_revokes_at_google_and_ends_feeds(google: GoogleSetup) -> None:
    async with serving(google) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, google.emulator, [rpb.CAPABILITY_READ])
        stream = mail.WatchMailbox(mpb.WatchMailboxRequest(account=account.name, heartbeat_interval=HEARTBEAT))
        await _started(stream, google.emulator)
        refresh_token = broker.store().read_secret(account.name.split("/")[1], "refresh_token")
        assert refresh_token is not None
        receipt = await accounts.DeleteAccount(apb.DeleteAccountRequest(name=account.name), timeout=30)
        steps = {s.kind: s.outcome for s in receipt.steps}
        assert steps[rpb.ERASURE_STEP_KIND_REVOKE_AT_PROVIDER] == rpb.ERASURE_OUTCOME_DONE
        assert google.emulator.counters().get("revoke.ok", 0) == 1
        assert google.emulator.granted_scopes(USER, google.config.google.client_id) == set()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await _read_to_the_end(stream, [])
        assert ended.value.code() == grpc.StatusCode.NOT_FOUND
    # Nothing of the account is left on disk: no refresh token, no address, in the database, its WAL or shm.
    on_disk = _store_bytes(Path(google.config.data_dir))
    assert [
        what for what, value in [("refresh token", refresh_token), ("address", USER.encode())] if value in on_disk
    ] == []


async def test_one_history_poller_serves_every_watched_label_of_an_account(
    google: GoogleSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.providers.google.gmail import GmailDriver

    callers: set[asyncio.Task[object] | None] = set()
    original = GmailDriver.history_since

    async def recording(self: GmailDriver, start: int) -> object:
        callers.add(asyncio.current_task())
        return await original(self, start)

    monkeypatch.setattr(GmailDriver, "history_since", recording)
    async with serving(google) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, google.emulator, [rpb.CAPABILITY_READ])
        inbox = mail.WatchMailbox(mpb.WatchMailboxRequest(account=account.name, heartbeat_interval=HEARTBEAT))
        starred = mail.WatchMailbox(
            mpb.WatchMailboxRequest(
                account=account.name, folders=[f"{account.name}/folders/STARRED"], heartbeat_interval=HEARTBEAT
            )
        )
        for stream in (inbox, starred):
            assert (await stream.read()).WhichOneof("event") == "heartbeat"
        google.emulator.deliver(USER, _mail("canary both"), label_ids=("INBOX", "STARRED", "UNREAD"))
        for stream in (inbox, starred):
            event = await stream.read()
            while event.WhichOneof("event") == "heartbeat":
                event = await stream.read()
            assert event.message_added.message.subject == "canary both"
        inbox.cancel()
        starred.cancel()
    assert len(callers) == 1, "each label polled the account's history on its own"


@pytest.mark.parametrize("error", ["invalid_client", "unauthorized_client"])
async def test_a_refused_oauth_client_is_the_operators_problem_not_the_accounts(
    google: GoogleSetup, error: str
) -> None:
    """invalid_client on refresh means the broker's client id or secret is wrong: every account would get it. The
    account must not be marked NEEDS_REAUTH (nor, with automatic erasure on, erased later) for it."""
    async with serving(google) as broker, broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect(accounts, google.emulator, [rpb.CAPABILITY_READ])
        google.emulator.fail_next_token_requests(5, status=401, error=error, description="canary client refused")
        refused = await _fails(mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10))
        assert (refused.code(), error_reason(refused)) == (grpc.StatusCode.FAILED_PRECONDITION, "OAUTH_CLIENT_REJECTED")
        state = await accounts.GetAccount(apb.GetAccountRequest(name=account.name), timeout=10)
        assert state.state == rpb.ACCOUNT_STATE_ACTIVE
        google.emulator.clear_faults()
        await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10)  # fixed: works again
