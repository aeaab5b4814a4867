"""AccountService servicer: converts requests to domain calls and results back; nothing else."""

from __future__ import annotations

from typing import Any

import grpc
from mailbroker.v1 import account_service_pb2 as pb
from mailbroker.v1 import account_service_pb2_grpc, resources_pb2

from server.api import convert, names
from server.domain.accounts import Accounts
from server.domain.audit import AuditLog
from server.domain.erasure import Erasure
from server.domain.imap_accounts import ImapAccounts, ImapConnectRequest
from server.domain.oauth import OAuthFlows
from server.interceptors.context import current_principal

Context = grpc.aio.ServicerContext[Any, Any]


class AccountServicer(account_service_pb2_grpc.AccountServiceServicer):
    def __init__(
        self, accounts: Accounts, audit: AuditLog, erasure: Erasure, imap: ImapAccounts, oauth: OAuthFlows
    ) -> None:
        self._oauth = oauth
        self._accounts = accounts
        self._imap = imap
        self._audit = audit
        self._erasure = erasure

    async def BeginOAuth(self, request: pb.BeginOAuthRequest, context: Context) -> pb.BeginOAuthResponse:
        begun = await self._oauth.begin(
            current_principal.get(),
            convert.provider_from_proto(request.provider),
            convert.capabilities_from_proto(request.capabilities),
            request.redirect_uri,
            names.parse_account(request.account, "account") if request.account else None,
            request.login_hint,
        )
        return pb.BeginOAuthResponse(
            authorization_uri=begun.authorization_uri,
            state=begun.state,
            expire_time=convert.timestamp(begun.expire_time),
            scopes=begun.scopes,
        )

    async def CompleteOAuth(self, request: pb.CompleteOAuthRequest, context: Context) -> resources_pb2.Account:
        account = await self._oauth.complete(current_principal.get(), request.state, request.code)
        return convert.account_to_proto(account)

    async def ConnectImapAccount(
        self, request: pb.ConnectImapAccountRequest, context: Context
    ) -> resources_pb2.Account:
        connect = ImapConnectRequest(
            imap_server=convert.mail_server_from_proto(
                request.imap_server, "imap_server", request.HasField("imap_server")
            ),
            smtp_server=convert.mail_server_from_proto(
                request.smtp_server, "smtp_server", request.HasField("smtp_server")
            ),
            username=request.username,
            password=request.password,
            capabilities=convert.capabilities_from_proto(request.capabilities),
            email_address=request.email_address,
        )
        account = await self._imap.connect(current_principal.get(), connect, context.time_remaining())
        return convert.account_to_proto(account)

    async def GetAccount(self, request: pb.GetAccountRequest, context: Context) -> resources_pb2.Account:
        account = await self._accounts.get(current_principal.get(), names.parse_account(request.name))
        return convert.account_to_proto(account)

    async def ListAccounts(self, request: pb.ListAccountsRequest, context: Context) -> pb.ListAccountsResponse:
        accounts, next_token = await self._accounts.list(current_principal.get(), request.page_size, request.page_token)
        return pb.ListAccountsResponse(
            accounts=[convert.account_to_proto(a) for a in accounts], next_page_token=next_token
        )

    async def DeleteAccount(self, request: pb.DeleteAccountRequest, context: Context) -> resources_pb2.ErasureReceipt:
        receipt = await self._erasure.erase(current_principal.get(), names.parse_account(request.name))
        return resources_pb2.ErasureReceipt(
            account=names.account_name(receipt.account_id),
            steps=[convert.erasure_step_to_proto(step) for step in receipt.steps],
            start_time=convert.timestamp(receipt.start_time),
            complete_time=convert.timestamp(receipt.complete_time),
            audit_event=names.audit_event_name(receipt.audit_event_id) if receipt.audit_event_id else "",
        )

    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context: Context) -> pb.ListAuditEventsResponse:
        account_id = names.parse_account(request.account, "account") if request.account else None
        events, next_token = await self._audit.list(
            current_principal.get(), account_id, request.page_size, request.page_token, request.all_tenants
        )
        return pb.ListAuditEventsResponse(
            audit_events=[convert.audit_event_to_proto(e) for e in events], next_page_token=next_token
        )
