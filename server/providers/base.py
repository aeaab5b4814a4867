"""The one Protocol every mail provider driver implements, and the capability record each driver declares.

A driver instance serves one account: it holds (in memory) whatever credential it needs and talks to the
provider through the provider's client library, off the event loop. It maps every provider error into the
broker's exception tree (server.errors) with the original kept as ``__cause__``, and returns domain objects
(server.domain.mail). It never logs content, addresses or credentials, and never writes content anywhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from server.domain.feeds import Upstream
from server.domain.mail import AttachmentChunk, Folder, Message, MessagePage, MessageView, SendResult
from server.providers.mime import BuiltMessage

ATTACHMENT_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class DriverCapabilities:
    """What a driver can do natively (libcloud-style flags); the domain adapts around what it cannot."""

    search: bool  # ListMessages with a query
    labels: bool  # a message may be in several folders at once (Gmail)
    partial_attachments: bool  # attachments are fetched in ranges, never whole
    keeps_sent_copy: bool  # the provider files sent mail itself (else the driver appends to Sent)
    revocable: bool  # the credential can be revoked at the provider on erasure


class MailDriver(Protocol):
    """A connected mailbox."""

    capabilities: DriverCapabilities
    inbox_id: str  # the folder a feed watches when the caller names none

    async def list_folders(self) -> list[Folder]: ...

    async def list_messages(
        self, folder_id: str | None, query: str | None, page_size: int, cursor: dict[str, object] | None
    ) -> MessagePage:
        """Newest first. ``folder_id`` None is the inbox. ``cursor`` is a previous page's ``MessagePage.cursor``."""
        ...

    async def get_message(self, message_id: str, view: MessageView) -> Message:
        """Never marks the message read."""
        ...

    def stream_attachment(self, message_id: str, attachment_id: str) -> AsyncIterator[AttachmentChunk]:
        """Decoded bytes in order, at most ATTACHMENT_CHUNK_BYTES at a time, memory bounded by one chunk."""
        ...

    async def send_message(self, built: BuiltMessage, envelope_from: str) -> SendResult:
        """Submit a message built by server.providers.mime.build_message (Bcc only in the envelope)."""
        ...

    def folder_watcher(self, folder_id: str) -> Upstream:
        """The upstream the feed hub shares between every subscriber of this folder (server.domain.feeds)."""
        ...

    async def close(self) -> None: ...
