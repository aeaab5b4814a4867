"""MailService servicer: resolves the account and its capability, then hands over to the provider driver.

No provider driver has landed yet, so every method checks the name, the tenant and the capability and then
answers UNIMPLEMENTED (reason PROVIDER_NOT_IMPLEMENTED).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from mailbroker.v1 import mail_service_pb2 as pb
from mailbroker.v1 import mail_service_pb2_grpc, resources_pb2

from server.api import names
from server.domain.accounts import Accounts
from server.domain.models import Capability
from server.errors import Unimplemented
from server.interceptors.context import current_principal

Context = grpc.aio.ServicerContext[Any, Any]


def _no_driver() -> Unimplemented:
    return Unimplemented("no mail provider driver is available in this version", reason="PROVIDER_NOT_IMPLEMENTED")


class MailServicer(mail_service_pb2_grpc.MailServiceServicer):
    def __init__(self, accounts: Accounts) -> None:
        self._accounts = accounts

    async def _require(self, account_id: str, capability: Capability) -> None:
        await self._accounts.require(current_principal.get(), account_id, capability)

    async def ListFolders(self, request: pb.ListFoldersRequest, context: Context) -> pb.ListFoldersResponse:
        await self._require(names.parse_account(request.parent, "parent"), Capability.METADATA)
        raise _no_driver()

    async def ListMessages(self, request: pb.ListMessagesRequest, context: Context) -> pb.ListMessagesResponse:
        account_id = names.parse_account(request.parent, "parent")
        if request.folder:
            folder_account, _ = names.parse_child(request.folder, "folders", "folder")
            if folder_account != account_id:
                raise names.mismatched("folder", "parent")
        await self._require(account_id, Capability.READ if request.query else Capability.METADATA)
        raise _no_driver()

    async def GetMessage(self, request: pb.GetMessageRequest, context: Context) -> resources_pb2.Message:
        account_id, _ = names.parse_child(request.name, "messages")
        full = request.view == resources_pb2.MESSAGE_VIEW_FULL
        await self._require(account_id, Capability.READ if full else Capability.METADATA)
        raise _no_driver()

    async def GetAttachment(
        self, request: pb.GetAttachmentRequest, context: Context
    ) -> AsyncIterator[pb.AttachmentChunk]:
        account_id, _, _ = names.parse_attachment(request.name)
        await self._require(account_id, Capability.READ)
        raise _no_driver()
        yield  # pragma: no cover - makes this an async generator, the shape every streaming method has

    async def SendMessage(self, request: pb.SendMessageRequest, context: Context) -> pb.SendMessageResponse:
        await self._require(names.parse_account(request.account, "account"), Capability.SEND)
        raise _no_driver()

    async def WatchMailbox(self, request: pb.WatchMailboxRequest, context: Context) -> AsyncIterator[pb.MailboxEvent]:
        await self._require(names.parse_account(request.account, "account"), Capability.METADATA)
        raise _no_driver()
        yield  # pragma: no cover - makes this an async generator, the shape every streaming method has
