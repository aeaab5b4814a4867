"""The identity matrix: every RPC of AccountService and MailService, enumerated from the proto descriptors, called by
every kind of client certificate, against a real broker over mTLS. Figure: unauthorized calls accepted = 0.

    alice          valid, owns the account every request names       control: reaches the handler
    absent         no client certificate                             the handshake fails, no handler runs
    foreign        alice's identity from another CA                  the handshake fails, no handler runs
    expired        alice's identity, not_after in the past           the handshake fails, no handler runs
    not_yet_valid  alice's identity, not_before in the future        the handshake fails, no handler runs
    mallory        valid certificate, identity unknown to the policy PERMISSION_DENIED IDENTITY_NOT_ALLOWED, no handler
    bob            valid, another tenant                             the same answer as for an account that never
                                                                     existed (NOT_FOUND where an account is named)

Whether a handler ran is seen on the server: the servicer methods are wrapped by a pass-through spy that records
the caller; nothing of the broker is replaced.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message as pb_message
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1 import resources_pb2 as rpb

from server.api.accounts import AccountServicer
from server.api.mail import MailServicer
from server.config import PolicyConfig, PolicyRule
from server.interceptors.context import current_principal
from tests.broker import RunningBroker, broker_config, error_reason, running_broker, seed_account
from tests.pki import PemPair, TestPki

SERVICES = (
    (apb.DESCRIPTOR.services_by_name["AccountService"], AccountServicer),
    (mpb.DESCRIPTOR.services_by_name["MailService"], MailServicer),
)
METHODS: list[MethodDescriptor] = [m for service, _ in SERVICES for m in service.methods]
NEVER_EXISTED = "a0000000000000000000000000"

# One request per RPC, naming the account it is given (alice's, or one that never existed). A new RPC without an
# entry here fails test_every_rpc_has_a_request.
REQUESTS: dict[str, Callable[[str], pb_message.Message]] = {
    "BeginOAuth": lambda a: apb.BeginOAuthRequest(
        provider=rpb.PROVIDER_GOOGLE,
        capabilities=[rpb.CAPABILITY_READ],
        redirect_uri="https://app.example/callback",
        account=f"accounts/{a}",
    ),
    "CompleteOAuth": lambda a: apb.CompleteOAuthRequest(state="s" * 43, code="code"),
    "ConnectImapAccount": lambda a: apb.ConnectImapAccountRequest(),
    "GetAccount": lambda a: apb.GetAccountRequest(name=f"accounts/{a}"),
    "ListAccounts": lambda a: apb.ListAccountsRequest(),
    "DeleteAccount": lambda a: apb.DeleteAccountRequest(name=f"accounts/{a}"),
    "ListAuditEvents": lambda a: apb.ListAuditEventsRequest(account=f"accounts/{a}"),
    "ListFolders": lambda a: mpb.ListFoldersRequest(parent=f"accounts/{a}"),
    "ListMessages": lambda a: mpb.ListMessagesRequest(parent=f"accounts/{a}", query="invoice"),
    "GetMessage": lambda a: mpb.GetMessageRequest(name=f"accounts/{a}/messages/m1", view=rpb.MESSAGE_VIEW_FULL),
    "GetAttachment": lambda a: mpb.GetAttachmentRequest(name=f"accounts/{a}/messages/m1/attachments/a1"),
    "SendMessage": lambda a: mpb.SendMessageRequest(
        account=f"accounts/{a}",
        request_id="matrix-1",
        message=mpb.OutgoingMessage(
            to_recipients=[rpb.EmailAddress(address="rcpt@example.test")], subject="matrix", text_body="hello"
        ),
    ),
    "WatchMailbox": lambda a: mpb.WatchMailboxRequest(account=f"accounts/{a}"),
}

# The RPCs that act on the account they name: another tenant's is NOT_FOUND, exactly like one that never existed.
ACCOUNT_SCOPED = frozenset(
    {
        "GetAccount",
        "DeleteAccount",
        "ListFolders",
        "ListMessages",
        "GetMessage",
        "GetAttachment",
        "SendMessage",
        "WatchMailbox",
    }
)
# What authentication, authorization and tenancy answer: the control (alice, on her own account) gets none of them.
DENIALS = frozenset(
    {
        "NO_CLIENT_IDENTITY",
        "IDENTITY_NOT_ALLOWED",
        "METHOD_NOT_ALLOWED",
        "POLICY_CAPABILITY_CAPPED",
        "IDENTITY_TENANT_CONFLICT",
        "ACCOUNT_NOT_FOUND",
    }
)
HANDSHAKE_FAILS = ("absent", "foreign", "expired", "not_yet_valid")
IDENTITIES = (*HANDSHAKE_FAILS, "mallory", "bob", "alice")  # alice last: her DeleteAccount erases an account


@dataclass(frozen=True)
class Outcome:
    """What a client can observe of a call: its status, reason, message, ErrorInfo metadata, or the response."""

    code: grpc.StatusCode
    reason: str = ""
    details: str = ""
    metadata: tuple[tuple[str, str], ...] = ()
    responses: tuple[bytes, ...] = ()


def test_every_rpc_has_a_request() -> None:
    assert sorted(m.name for m in METHODS) == sorted(REQUESTS)
    assert len(METHODS) == len({m.name for m in METHODS})  # names are unique across both services


class HandlerSpy:
    """Records (identity, method) each time a servicer method starts; calls through unchanged."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for service, servicer in SERVICES:
            for method in service.methods:
                monkeypatch.setattr(servicer, method.name, self._wrap(getattr(servicer, method.name), method.name))

    def _wrap(self, original: Callable[..., Any], name: str) -> Callable[..., Any]:
        spy = self
        if inspect.isasyncgenfunction(original):

            @functools.wraps(original)
            async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
                spy.calls.append((current_principal.get().identity, name))
                async for item in original(self, request, context):
                    yield item

            return stream

        @functools.wraps(original)
        async def unary(self: Any, request: Any, context: Any) -> Any:
            spy.calls.append((current_principal.get().identity, name))
            return await original(self, request, context)

        return unary


async def _call(channel: grpc.aio.Channel, method: MethodDescriptor, request: pb_message.Message) -> Outcome:
    path = f"/{method.containing_service.full_name}/{method.name}"
    response_class = message_factory.GetMessageClass(method.output_type)
    kwargs: dict[str, Any] = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": response_class.FromString,
    }
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path, **kwargs)(request, timeout=10)
            responses = tuple([r.SerializeToString(deterministic=True) async for r in stream])
        else:
            reply = await channel.unary_unary(path, **kwargs)(request, timeout=10)
            responses = (reply.SerializeToString(deterministic=True),)
    except grpc.aio.AioRpcError as error:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        metadata: tuple[tuple[str, str], ...] = ()
        for detail in status.details if status else []:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                metadata = tuple(sorted(info.metadata.items()))
        return Outcome(error.code(), error_reason(error), error.details() or "", metadata)
    return Outcome(grpc.StatusCode.OK, responses=responses)


@pytest.fixture
async def matrix_broker(
    tmp_path: Path, pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[RunningBroker, HandlerSpy]]:
    spy = HandlerSpy()
    spy.install(monkeypatch)  # before start: the servicers are registered with the spied methods
    # alice and bob may call everything, each a tenant of its own; nobody audits; mallory is unknown.
    policy = PolicyConfig(rules=(PolicyRule(identities=(pki.alice.identity, pki.bob.identity), methods=("*",)),))
    config = replace(broker_config(tmp_path, pki), policy=policy)
    async with running_broker(config, pki) as running:
        yield running, spy


async def test_identity_matrix_accepts_no_unauthorized_call(matrix_broker: tuple[RunningBroker, HandlerSpy]) -> None:
    broker, spy = matrix_broker
    pki = broker.pki
    store = broker.store()
    alices = seed_account(store, pki.alice.identity).id
    alices_doomed = seed_account(store, pki.alice.identity).id  # only DeleteAccount names it
    accepted: list[str] = []
    calls = 0

    def client(who: str) -> PemPair | None:
        return None if who == "absent" else getattr(pki, who)

    for method in METHODS:
        account = alices_doomed if method.name == "DeleteAccount" else alices
        request = REQUESTS[method.name](account)
        for who in IDENTITIES:
            before = len(spy.calls)
            async with broker.channel(client(who)) as channel:
                outcome = await _call(channel, method, request)
                if who == "bob":
                    baseline = await _call(channel, method, REQUESTS[method.name](NEVER_EXISTED))
            calls += 1
            reached = spy.calls[before:]
            cell = f"{method.name} as {who}: {outcome.code.name} {outcome.reason}"
            if who in HANDSHAKE_FAILS:
                if outcome.code is not grpc.StatusCode.UNAVAILABLE or outcome.reason or reached:
                    accepted.append(cell)
            elif who == "mallory":
                denied = (outcome.code, outcome.reason) == (grpc.StatusCode.PERMISSION_DENIED, "IDENTITY_NOT_ALLOWED")
                if not denied or reached:
                    accepted.append(cell)
            elif who == "bob":
                # Whatever bob is told about alice's account, he is told about one that never existed too.
                leaks = any(account.encode() in r for r in outcome.responses) or account in outcome.details
                not_found = (outcome.code, outcome.reason) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
                if outcome != baseline or leaks or (method.name in ACCOUNT_SCOPED and not not_found):
                    accepted.append(cell)
            else:  # alice, the control: her call gets past authentication and authorization to the handler
                assert reached == [(pki.alice.identity, method.name)], cell
                assert outcome.code is not grpc.StatusCode.UNAUTHENTICATED, cell
                assert outcome.reason not in DENIALS, cell

    print(
        f"\nidentity matrix: {len(METHODS)} RPCs x {len(IDENTITIES)} identities = {calls} calls; "
        f"unauthorized calls accepted = {len(accepted)}"
    )
    assert accepted == []
    assert calls == len(METHODS) * len(IDENTITIES)
