"""The broker over real mTLS on loopback: identities, policy, tenancy, validation errors and their reasons."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1 import resources_pb2 as rpb

from server.domain.models import Capability
from server.providers.imap.ids import folder_id
from tests.broker import RunningBroker, error_reason, rich_status, seed_account, stubs


async def _fails(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_health_is_serving_for_the_server_and_both_services(broker: RunningBroker) -> None:
    async with broker.channel(broker.pki.alice) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "mailbroker.v1.AccountService", "mailbroker.v1.MailService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_certificate_identity_reaches_the_handler_and_scopes_the_tenant(broker: RunningBroker) -> None:
    store = broker.store()
    alices = seed_account(store, broker.pki.alice.identity)
    async with broker.channel(broker.pki.alice) as a, broker.channel(broker.pki.bob) as b:
        accounts_a, _ = stubs(a)
        accounts_b, _ = stubs(b)
        got = await accounts_a.GetAccount(apb.GetAccountRequest(name=f"accounts/{alices.id}"), timeout=5)
        assert got.name == f"accounts/{alices.id}"
        assert got.provider == rpb.PROVIDER_IMAP
        assert list(got.capabilities) == [rpb.CAPABILITY_METADATA, rpb.CAPABILITY_READ, rpb.CAPABILITY_SEND]
        listed = await accounts_a.ListAccounts(apb.ListAccountsRequest(), timeout=5)
        assert [x.name for x in listed.accounts] == [got.name]

        # Bob is another tenant: Alice's account does not exist for him, in any call.
        error = await _fails(accounts_b.GetAccount(apb.GetAccountRequest(name=got.name), timeout=5))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
        error = await _fails(accounts_b.DeleteAccount(apb.DeleteAccountRequest(name=got.name), timeout=5))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
        assert not (await accounts_b.ListAccounts(apb.ListAccountsRequest(), timeout=5)).accounts


async def test_an_empty_store_lists_an_empty_page(broker: RunningBroker) -> None:
    async with broker.channel(broker.pki.alice) as channel:
        accounts, _ = stubs(channel)
        reply = await accounts.ListAccounts(apb.ListAccountsRequest(), timeout=5)
        assert list(reply.accounts) == [] and reply.next_page_token == ""


async def test_identity_unknown_to_the_policy_is_denied(broker: RunningBroker) -> None:
    async with broker.channel(broker.pki.mallory) as channel:
        accounts, _ = stubs(channel)
        error = await _fails(accounts.ListAccounts(apb.ListAccountsRequest(), timeout=5))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.PERMISSION_DENIED, "IDENTITY_NOT_ALLOWED")


async def test_policy_limits_methods_per_identity(broker: RunningBroker) -> None:
    async with broker.channel(broker.pki.carol) as channel:
        accounts, mail = stubs(channel)
        await accounts.ListAccounts(apb.ListAccountsRequest(), timeout=5)
        error = await _fails(accounts.DeleteAccount(apb.DeleteAccountRequest(name="accounts/abc"), timeout=5))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.PERMISSION_DENIED, "METHOD_NOT_ALLOWED")
        error = await _fails(mail.ListFolders(mpb.ListFoldersRequest(parent="accounts/abc"), timeout=5))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.PERMISSION_DENIED, "METHOD_NOT_ALLOWED")


@pytest.mark.parametrize("who", ["foreign", "expired", "not_yet_valid", None])
async def test_certificates_that_do_not_verify_never_reach_a_handler(broker: RunningBroker, who: str | None) -> None:
    client = getattr(broker.pki, who) if who else None
    async with broker.channel(client) as channel:
        accounts, _ = stubs(channel)
        error = await _fails(accounts.ListAccounts(apb.ListAccountsRequest(), timeout=5))
        assert error.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("request_", "code", "reason", "field"),
    [
        (apb.GetAccountRequest(name=""), grpc.StatusCode.INVALID_ARGUMENT, "MISSING_FIELD", "name"),
        (apb.GetAccountRequest(name="accounts/"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_RESOURCE_NAME", "name"),
        (apb.GetAccountRequest(name="users/abc"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_RESOURCE_NAME", "name"),
        (
            apb.GetAccountRequest(name="accounts/abc/x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_RESOURCE_NAME",
            "name",
        ),
        (
            apb.GetAccountRequest(name="accounts/../x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_RESOURCE_NAME",
            "name",
        ),
        (apb.GetAccountRequest(name="accounts/abc"), grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", None),
        (apb.ListAccountsRequest(page_size=-1), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_SIZE", "page_size"),
        (
            apb.ListAccountsRequest(page_token="garbage"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
            "page_token",
        ),
        (apb.ListAuditEventsRequest(page_size=-5), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_SIZE", "page_size"),
        (
            apb.ListAuditEventsRequest(page_token="AAAA"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
            "page_token",
        ),
        (
            apb.ListAuditEventsRequest(account="nope"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_RESOURCE_NAME",
            "account",
        ),
        (apb.DeleteAccountRequest(name="accounts/zzz"), grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", None),
    ],
)
async def test_bad_requests_get_a_status_and_a_reason(
    broker: RunningBroker, request_: object, code: grpc.StatusCode, reason: str, field: str | None
) -> None:
    method = type(request_).__name__.removesuffix("Request")
    async with broker.channel(broker.pki.alice) as channel:
        accounts, _ = stubs(channel)
        error = await _fails(getattr(accounts, method)(request_, timeout=5))
    assert (error.code(), error_reason(error)) == (code, reason)
    status = rich_status(error)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    has_bad_request = any(d.Unpack(bad_request) for d in status.details)
    if field is None:
        assert not has_bad_request
    else:
        assert [v.field for v in bad_request.field_violations] == [field]


async def test_page_tokens_are_bound_to_the_tenant(broker: RunningBroker) -> None:
    store = broker.store()
    for _ in range(3):
        seed_account(store, broker.pki.alice.identity)
    async with broker.channel(broker.pki.alice) as a, broker.channel(broker.pki.bob) as b:
        accounts_a, _ = stubs(a)
        accounts_b, _ = stubs(b)
        first = await accounts_a.ListAccounts(apb.ListAccountsRequest(page_size=2), timeout=5)
        assert len(first.accounts) == 2 and first.next_page_token
        second = await accounts_a.ListAccounts(
            apb.ListAccountsRequest(page_size=2, page_token=first.next_page_token), timeout=5
        )
        assert len(second.accounts) == 1 and not second.next_page_token
        assert not {x.name for x in first.accounts} & {x.name for x in second.accounts}
        error = await _fails(
            accounts_b.ListAccounts(apb.ListAccountsRequest(page_token=first.next_page_token), timeout=5)
        )
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
        # The same token for another list is refused too.
        error = await _fails(
            accounts_a.ListAuditEvents(apb.ListAuditEventsRequest(page_token=first.next_page_token), timeout=5)
        )
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


async def test_mail_methods_check_name_tenant_and_capability_before_the_provider(broker: RunningBroker) -> None:
    store = broker.store()
    metadata_only = seed_account(store, broker.pki.alice.identity, capabilities=frozenset({Capability.METADATA}))
    name = f"accounts/{metadata_only.id}"
    async with broker.channel(broker.pki.alice) as a, broker.channel(broker.pki.bob) as b:
        _, mail = stubs(a)
        _, mail_b = stubs(b)
        cases = [
            (
                mail.GetMessage(
                    mpb.GetMessageRequest(name=f"{name}/messages/m1", view=rpb.MESSAGE_VIEW_FULL), timeout=5
                ),
                grpc.StatusCode.PERMISSION_DENIED,
                "CAPABILITY_NOT_GRANTED",
            ),
            (
                mail.SendMessage(mpb.SendMessageRequest(account=name), timeout=5),
                grpc.StatusCode.PERMISSION_DENIED,
                "CAPABILITY_NOT_GRANTED",
            ),
            (
                mail.ListMessages(mpb.ListMessagesRequest(parent=name, query="x"), timeout=5),
                grpc.StatusCode.PERMISSION_DENIED,
                "CAPABILITY_NOT_GRANTED",
            ),
            (
                # Past every check, the driver meets a server that is not there (loopback port 1).
                mail.ListFolders(mpb.ListFoldersRequest(parent=name), timeout=5),
                grpc.StatusCode.UNAVAILABLE,
                "PROVIDER_UNREACHABLE",
            ),
            (
                mail.ListMessages(mpb.ListMessagesRequest(parent=name, folder="accounts/other/folders/f"), timeout=5),
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_RESOURCE_NAME",
            ),
            (
                mail.GetMessage(mpb.GetMessageRequest(name=f"{name}/folders/m1"), timeout=5),
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_RESOURCE_NAME",
            ),
            (
                mail_b.ListFolders(mpb.ListFoldersRequest(parent=name), timeout=5),
                grpc.StatusCode.NOT_FOUND,
                "ACCOUNT_NOT_FOUND",
            ),
        ]
        for call, code, reason in cases:
            error = await _fails(call)
            assert (error.code(), error_reason(error)) == (code, reason)
        streams = [
            (mail.WatchMailbox(mpb.WatchMailboxRequest(account=name), timeout=5), "PROVIDER_UNREACHABLE"),
            (
                mail.GetAttachment(mpb.GetAttachmentRequest(name=f"{name}/messages/m1/attachments/a1"), timeout=5),
                "CAPABILITY_NOT_GRANTED",
            ),
            (mail_b.WatchMailbox(mpb.WatchMailboxRequest(account=name), timeout=5), "ACCOUNT_NOT_FOUND"),
        ]
        for stream, reason in streams:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stream:
                    pass
            assert error_reason(caught.value) == reason


async def test_oauth_without_a_configured_provider_says_so_with_a_reason(broker: RunningBroker) -> None:
    """The default config has no OAuth client: GOOGLE and MICROSOFT are refused as not configured."""
    async with broker.channel(broker.pki.alice) as channel:
        accounts, _ = stubs(channel)
        begin = {"capabilities": [rpb.CAPABILITY_READ], "redirect_uri": "https://app.example/callback"}
        expected = [
            (accounts.BeginOAuth(apb.BeginOAuthRequest(**begin), timeout=5), "INVALID_ARGUMENT", "INVALID_PROVIDER"),
            (
                accounts.BeginOAuth(apb.BeginOAuthRequest(provider=rpb.PROVIDER_IMAP, **begin), timeout=5),
                "INVALID_ARGUMENT",
                "INVALID_PROVIDER",
            ),
            (
                accounts.BeginOAuth(apb.BeginOAuthRequest(provider=rpb.PROVIDER_GOOGLE, **begin), timeout=5),
                "FAILED_PRECONDITION",
                "PROVIDER_NOT_CONFIGURED",
            ),
            (
                accounts.BeginOAuth(apb.BeginOAuthRequest(provider=rpb.PROVIDER_MICROSOFT, **begin), timeout=5),
                "FAILED_PRECONDITION",
                "PROVIDER_NOT_CONFIGURED",
            ),
            (accounts.CompleteOAuth(apb.CompleteOAuthRequest(), timeout=5), "INVALID_ARGUMENT", "INVALID_OAUTH_STATE"),
            (
                accounts.CompleteOAuth(apb.CompleteOAuthRequest(state="never-issued", code="c"), timeout=5),
                "INVALID_ARGUMENT",
                "INVALID_OAUTH_STATE",
            ),
        ]
        for call, code, reason in expected:
            error = await _fails(call)
            assert (error.code().name, error_reason(error)) == (code, reason)


async def test_delete_account_erases_it_returns_a_receipt_and_audits(broker: RunningBroker) -> None:
    store = broker.store()
    doomed = seed_account(store, broker.pki.alice.identity)
    survivor = seed_account(store, broker.pki.alice.identity)
    async with broker.channel(broker.pki.alice) as channel:
        accounts, _ = stubs(channel)
        receipt = await accounts.DeleteAccount(apb.DeleteAccountRequest(name=f"accounts/{doomed.id}"), timeout=5)
        assert receipt.account == f"accounts/{doomed.id}"
        assert [s.kind for s in receipt.steps] == [
            rpb.ERASURE_STEP_KIND_REVOKE_AT_PROVIDER,
            rpb.ERASURE_STEP_KIND_STOP_WATCHES,
            rpb.ERASURE_STEP_KIND_PURGE_ROWS,
            rpb.ERASURE_STEP_KIND_SCRUB_STORAGE,
            rpb.ERASURE_STEP_KIND_RECORD_AUDIT,
        ]
        assert receipt.steps[0].outcome == rpb.ERASURE_OUTCOME_NOT_APPLICABLE
        assert all(s.outcome == rpb.ERASURE_OUTCOME_DONE for s in receipt.steps[1:])
        error = await _fails(accounts.GetAccount(apb.GetAccountRequest(name=receipt.account), timeout=5))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        error = await _fails(accounts.DeleteAccount(apb.DeleteAccountRequest(name=receipt.account), timeout=5))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
        still = await accounts.GetAccount(apb.GetAccountRequest(name=f"accounts/{survivor.id}"), timeout=5)
        assert still.state == rpb.ACCOUNT_STATE_ACTIVE
        events = await accounts.ListAuditEvents(apb.ListAuditEventsRequest(account=receipt.account), timeout=5)
        assert [e.action for e in events.audit_events] == [rpb.AUDIT_ACTION_ACCOUNT_ERASED]
        assert events.audit_events[0].name == receipt.audit_event
        assert len(events.audit_events[0].erasure_steps) == 5
    assert store.read_secret(doomed.id, "imap_password") is None


async def test_only_auditors_list_every_tenant(broker: RunningBroker) -> None:
    async with broker.channel(broker.pki.alice) as a, broker.channel(broker.pki.bob) as b:
        accounts_a, _ = stubs(a)
        accounts_b, _ = stubs(b)
        error = await _fails(accounts_a.ListAuditEvents(apb.ListAuditEventsRequest(all_tenants=True), timeout=5))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.PERMISSION_DENIED, "AUDITOR_ONLY")
        await accounts_b.ListAuditEvents(apb.ListAuditEventsRequest(all_tenants=True), timeout=5)


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """The broker's real logging set-up (allow-list and redacting filter) writing to a buffer, at DEBUG."""
    from server.logging import configure_logging

    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    yield stream
    for handler in logging.getLogger().handlers[:]:
        logging.getLogger().removeHandler(handler)
        handler.close()


async def test_an_unexpected_error_is_a_generic_internal_with_a_safe_logged_traceback(
    broker: RunningBroker, monkeypatch: pytest.MonkeyPatch, captured_logs: io.StringIO
) -> None:
    from server.store.repository import Store

    def explode(*_: object) -> None:
        raise RuntimeError("canary-internal-detail")

    monkeypatch.setattr(Store, "list_accounts", explode)
    async with broker.channel(broker.pki.alice) as channel:
        accounts, _ = stubs(channel)
        error = await _fails(accounts.ListAccounts(apb.ListAccountsRequest(), timeout=5))
    assert (error.code(), error_reason(error)) == (grpc.StatusCode.INTERNAL, "INTERNAL")
    assert "canary" not in (error.details() or "")
    # The operator gets the traceback (types and frames) in the log, without the exception's text.
    records = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
    (failure,) = [r for r in records if r.get("msg") == "unhandled error"]
    assert "RuntimeError" in failure["exc"]
    assert "explode" in failure["exc"]
    assert "canary" not in captured_logs.getvalue()
    access = [r for r in records if r.get("msg") == "rpc"]
    assert access[-1]["status"] == "INTERNAL"
    assert access[-1]["caller"] == broker.pki.alice.identity


@pytest.mark.parametrize("query", ["{99+}", 'a" OR "b', "x)", "tab\there", "a" * 513])
async def test_queries_that_could_escape_into_provider_syntax_are_refused(broker: RunningBroker, query: str) -> None:
    account = seed_account(broker.store(), broker.pki.alice.identity)
    async with broker.channel(broker.pki.alice) as channel:
        _, mail = stubs(channel)
        error = await _fails(
            mail.ListMessages(mpb.ListMessagesRequest(parent=f"accounts/{account.id}", query=query), timeout=5)
        )
    assert (error.code(), error_reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_QUERY")


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(2**62, 0), (-(2**62), 0), (4, 999_999_999), (301, 0), (-5, 0), (0, 0)],
)
async def test_a_heartbeat_interval_out_of_range_is_invalid_argument_never_internal(
    broker: RunningBroker, seconds: int, nanos: int
) -> None:
    # Found by the long fuzz run: a Duration beyond what a timedelta can hold made WatchMailbox answer INTERNAL.
    account = seed_account(broker.store(), broker.pki.alice.identity)
    async with broker.channel(broker.pki.alice) as channel:
        _, mail = stubs(channel)
        request = mpb.WatchMailboxRequest(
            account=f"accounts/{account.id}", heartbeat_interval=duration_pb2.Duration(seconds=seconds, nanos=nanos)
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in mail.WatchMailbox(request, timeout=10):
                pass
        assert (caught.value.code(), error_reason(caught.value)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_HEARTBEAT_INTERVAL",
        )


async def test_too_many_watched_folders_are_refused_before_any_is_parsed_or_the_account_looked_up(
    broker: RunningBroker,
) -> None:
    account = seed_account(broker.store(), broker.pki.alice.identity)
    name = f"accounts/{account.id}"
    folder = f"{name}/folders/{folder_id('INBOX')}"
    requests = {
        # 21 names of one folder: entries are counted, not distinct folders.
        "repeated": mpb.WatchMailboxRequest(account=name, folders=[folder] * 21),
        # 100,000 entries none of which is a folder name: refused for the count, not for folders[0].
        "huge": mpb.WatchMailboxRequest(account=name, folders=["x"] * 100_000),
        # An account that does not exist: the same answer, so the count check tells nothing about accounts.
        "no such account": mpb.WatchMailboxRequest(
            account="accounts/nosuchaccount", folders=[f"accounts/nosuchaccount/folders/{folder_id('INBOX')}"] * 21
        ),
    }
    seen = {}
    async with broker.channel(broker.pki.alice) as channel:
        _, mail = stubs(channel)
        for case, request in requests.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in mail.WatchMailbox(request, timeout=10):
                    pass
            status = rich_status(caught.value)
            bad_request = error_details_pb2.BadRequest()
            fields = [
                v.field
                for d in (status.details if status else [])
                if d.Unpack(bad_request)
                for v in bad_request.field_violations
            ]
            seen[case] = (caught.value.code(), error_reason(caught.value), fields)
        # 20 entries are within the limit: the call gets past the check (to the mail server, which is not there).
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in mail.WatchMailbox(mpb.WatchMailboxRequest(account=name, folders=[folder] * 20), timeout=10):
                pass
    too_many = (grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_FOLDERS", ["folders"])
    assert seen == {case: too_many for case in requests}
    assert error_reason(caught.value) == "PROVIDER_UNREACHABLE"
