"""MailService servicer: converts requests to domain calls and results back; nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from mailbroker.v1 import mail_service_pb2 as pb
from mailbroker.v1 import mail_service_pb2_grpc, resources_pb2

from server.api import convert, names
from server.domain.accounts import Accounts
from server.domain.mailbox import MAX_WATCHED_FOLDERS, Mailboxes, too_many_folders
from server.interceptors.context import current_principal

Context = grpc.aio.ServicerContext[Any, Any]


class MailServicer(mail_service_pb2_grpc.MailServiceServicer):
    def __init__(self, accounts: Accounts, mailboxes: Mailboxes) -> None:
        self._accounts = accounts
        self._mailboxes = mailboxes

    async def ListFolders(self, request: pb.ListFoldersRequest, context: Context) -> pb.ListFoldersResponse:
        account_id = names.parse_account(request.parent, "parent")
        folders, next_token = await self._mailboxes.list_folders(
            current_principal.get(), account_id, request.page_size, request.page_token
        )
        return pb.ListFoldersResponse(
            folders=[convert.folder_to_proto(account_id, f) for f in folders], next_page_token=next_token
        )

    async def ListMessages(self, request: pb.ListMessagesRequest, context: Context) -> pb.ListMessagesResponse:
        account_id = names.parse_account(request.parent, "parent")
        folder_id = None
        if request.folder:
            folder_account, folder_id = names.parse_child(request.folder, "folders", "folder")
            if folder_account != account_id:
                raise names.mismatched("folder", "parent")
        messages, next_token = await self._mailboxes.list_messages(
            current_principal.get(), account_id, folder_id, request.query, request.page_size, request.page_token
        )
        return pb.ListMessagesResponse(
            messages=[convert.message_to_proto(account_id, m) for m in messages], next_page_token=next_token
        )

    async def GetMessage(self, request: pb.GetMessageRequest, context: Context) -> resources_pb2.Message:
        account_id, message_id = names.parse_child(request.name, "messages")
        message = await self._mailboxes.get_message(
            current_principal.get(), account_id, message_id, convert.view_from_proto(request.view)
        )
        return convert.message_to_proto(account_id, message)

    async def GetAttachment(
        self, request: pb.GetAttachmentRequest, context: Context
    ) -> AsyncIterator[pb.AttachmentChunk]:
        account_id, message_id, attachment_id = names.parse_attachment(request.name)
        message_resource = convert.message_name(account_id, message_id)
        async for chunk in self._mailboxes.get_attachment(
            current_principal.get(), account_id, message_id, attachment_id
        ):
            yield pb.AttachmentChunk(
                attachment=convert.attachment_to_proto(message_resource, chunk.info) if chunk.info else None,
                offset=chunk.offset,
                data=chunk.data,
            )

    async def SendMessage(self, request: pb.SendMessageRequest, context: Context) -> pb.SendMessageResponse:
        account_id = names.parse_account(request.account, "account")
        result, replayed = await self._mailboxes.send_message(
            current_principal.get(), account_id, convert.outgoing_from_proto(request.message), request.request_id
        )
        return pb.SendMessageResponse(
            message=convert.message_name(account_id, result.message_id) if result.message_id else "",
            internet_message_id=result.internet_message_id,
            send_time=convert.timestamp(result.send_time),
            replayed=replayed,
            refused_recipients=result.refused_recipients,
        )

    async def WatchMailbox(self, request: pb.WatchMailboxRequest, context: Context) -> AsyncIterator[pb.MailboxEvent]:
        account_id = names.parse_account(request.account, "account")
        # Counted before any name is parsed or the account looked up: a huge list costs one len().
        if len(request.folders) > MAX_WATCHED_FOLDERS:
            raise too_many_folders()
        folder_ids = []
        for index, folder in enumerate(request.folders):
            folder_account, folder_id = names.parse_child(folder, "folders", f"folders[{index}]")
            if folder_account != account_id:
                raise names.mismatched(f"folders[{index}]", "account")
            folder_ids.append(folder_id)
        heartbeat = convert.heartbeat_seconds(request)
        async for event, token in self._mailboxes.watch(
            current_principal.get(), account_id, folder_ids, request.resume_token, heartbeat
        ):
            yield convert.event_to_proto(account_id, event, token)
