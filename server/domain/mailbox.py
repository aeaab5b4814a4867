"""Reading and sending mail for a caller: tenant and capability checks, opaque page tokens, idempotent sends.
Provider specifics stay in the drivers."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from datetime import UTC, datetime

from server.crypto.opaque import OpaqueTokens
from server.domain import paging
from server.domain.accounts import Accounts
from server.domain.blocking import BlockingPool
from server.domain.drivers import Drivers
from server.domain.feeds import FeedEnded, FeedHub, FolderListWatcher, Subscriber, Upstream, Wake
from server.domain.mail import (
    AttachmentChunk,
    EmailAddress,
    FeedEvent,
    Folder,
    Heartbeat,
    Message,
    MessageView,
    OutgoingMessage,
    SendResult,
    check_query,
)
from server.domain.models import Capability
from server.domain.principal import Principal
from server.errors import FailedPrecondition, FieldViolation, InvalidArgument, OutcomeUnknown, ResourceExhausted
from server.providers import mime
from server.store.repository import Store

FOLDERS = paging.PageLimits(default=100, maximum=1000)
MESSAGES = paging.PageLimits(default=50, maximum=500)
MAX_REQUEST_ID_CHARS = 64
MAX_WATCHED_FOLDERS = 20
FOLDER_LIST = "*folders"  # the feed key of an account's folder list (folder ids never contain "*")


def _fingerprint(message: OutgoingMessage) -> str:
    """A digest of everything that makes the message what it is, to tell a retry from a different request."""
    payload = asdict(message)
    for attachment in payload["attachments"]:
        attachment["content"] = hashlib.sha256(attachment["content"]).hexdigest()
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def too_many_folders() -> InvalidArgument:
    """A WatchMailbox request that names more than MAX_WATCHED_FOLDERS folders (the servicer counts the entries
    before it parses any of them; the feed counts distinct folders)."""
    return InvalidArgument(
        f"at most {MAX_WATCHED_FOLDERS} folders per feed",
        reason="TOO_MANY_FOLDERS",
        field_violations=[FieldViolation("folders", f"at most {MAX_WATCHED_FOLDERS}")],
    )


class Mailboxes:
    """The MailService's domain: every call resolves the caller's account and the capability it needs first."""

    def __init__(
        self,
        accounts: Accounts,
        drivers: Drivers,
        tokens: OpaqueTokens,
        store: Store,
        blocking: BlockingPool,
        feeds: FeedHub,
        *,
        message_id_domain: str,
        folder_poll_seconds: float = 30.0,
        max_watches_per_account: int = 16,
    ) -> None:
        self._folder_poll_seconds = folder_poll_seconds
        self._max_watches = max_watches_per_account
        self._watches: dict[str, int] = {}  # open WatchMailbox feeds per account
        self._feeds = feeds
        self._sends: set[asyncio.Task[SendResult]] = set()
        self._resume_tokens = tokens
        self._accounts = accounts
        self._drivers = drivers
        self._folder_pages = paging.PageTokens(tokens, "folders")
        self._message_pages = paging.PageTokens(tokens, "messages")
        self._store = store
        self._blocking = blocking
        self._message_id_domain = message_id_domain

    @property
    def open_feeds(self) -> int:
        """Open WatchMailbox feeds (read by the metrics endpoint from its own thread: one C-level sum, no iteration
        in Python that a change on the event loop could interrupt)."""
        return sum(self._watches.values())

    async def list_folders(
        self, principal: Principal, account_id: str, page_size: int, page_token: str
    ) -> tuple[list[Folder], str]:
        account = await self._accounts.require(principal, account_id, Capability.METADATA)
        size = paging.page_size(page_size, FOLDERS)
        binding = [principal.tenant, account_id]
        position = self._folder_pages.position(binding, page_token)
        start = int(position["offset"]) if position else 0
        folders = await (await self._drivers.get(account)).list_folders()
        page = folders[start : start + size]
        more = start + size < len(folders)
        return page, self._folder_pages.issue(binding, {"offset": start + size}) if more else ""

    async def list_messages(
        self,
        principal: Principal,
        account_id: str,
        folder_id: str | None,
        query: str,
        page_size: int,
        page_token: str,
    ) -> tuple[list[Message], str]:
        if query:
            check_query(query)
        account = await self._accounts.require(principal, account_id, Capability.READ if query else Capability.METADATA)
        size = paging.page_size(page_size, MESSAGES)
        binding = [principal.tenant, account_id, folder_id or "", query]
        cursor = self._message_pages.position(binding, page_token)
        driver = await self._drivers.get(account)
        page = await driver.list_messages(folder_id, query or None, size, cursor)
        next_token = self._message_pages.issue(binding, page.cursor) if page.cursor else ""
        return page.messages, next_token

    async def get_message(self, principal: Principal, account_id: str, message_id: str, view: MessageView) -> Message:
        capability = Capability.READ if view is MessageView.FULL else Capability.METADATA
        account = await self._accounts.require(principal, account_id, capability)
        return await (await self._drivers.get(account)).get_message(message_id, view)

    async def get_attachment(
        self, principal: Principal, account_id: str, message_id: str, attachment_id: str
    ) -> AsyncIterator[AttachmentChunk]:
        account = await self._accounts.require(principal, account_id, Capability.READ)
        driver = await self._drivers.get(account)
        async for chunk in driver.stream_attachment(message_id, attachment_id):
            yield chunk

    async def send_message(
        self, principal: Principal, account_id: str, message: OutgoingMessage, request_id: str
    ) -> tuple[SendResult, bool]:
        """Send once per ``request_id``; returns the result and whether it is the replay of an earlier send."""
        account = await self._accounts.require(principal, account_id, Capability.SEND)
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidArgument(
                "request_id is too long",
                reason="INVALID_REQUEST_ID",
                field_violations=[FieldViolation("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters")],
            )
        sender = EmailAddress(account.profile.email_address, message.sender_display_name)
        built = mime.build_message(message, sender, message_id_domain=self._message_id_domain)
        driver = await self._drivers.get(account)
        if not request_id:
            return await driver.send_message(built, sender.address), False

        digest = hashlib.sha256(f"{principal.tenant}\0{account_id}\0{request_id}".encode()).hexdigest()
        fingerprint = _fingerprint(message)
        record = await self._blocking.run(self._store.claim_request, account_id, digest, fingerprint)
        if record is not None:
            if record["fingerprint"] != fingerprint:
                raise InvalidArgument(
                    "request_id was already used for a different message",
                    reason="REQUEST_ID_REUSED",
                    field_violations=[FieldViolation("request_id", "already used for a different message")],
                )
            if record["state"] != "done":
                raise FailedPrecondition(
                    "a send with this request_id is in progress or its outcome is unknown",
                    reason="REQUEST_IN_PROGRESS",
                )
            stored = record["result"]
            return (
                SendResult(
                    internet_message_id=stored["internet_message_id"],
                    send_time=datetime.fromisoformat(stored["send_time"]),
                    message_id=stored["message_id"],
                    refused_recipients=tuple(stored.get("refused_recipients", ())),
                ),
                True,
            )

        async def send_and_record() -> SendResult:
            try:
                result = await driver.send_message(built, sender.address)
            except OutcomeUnknown:
                raise  # it may have gone out: the claim stays, a retry is told REQUEST_IN_PROGRESS
            except BaseException:
                # The server refused it or was never reached: a retry with the same request_id may try again.
                await self._blocking.run(self._store.release_request, account_id, digest)
                raise
            await self._blocking.run(
                self._store.complete_request,
                account_id,
                digest,
                fingerprint,
                {
                    "internet_message_id": result.internet_message_id,
                    "send_time": result.send_time.isoformat(),
                    "message_id": result.message_id,
                    "refused_recipients": list(result.refused_recipients),
                },
            )
            return result

        # Shielded: a caller that goes away mid-send must not leave the record claimed but never completed
        # (or released while the message is on its way), or a retry would send it twice.
        task = asyncio.ensure_future(send_and_record())
        self._sends.add(task)  # a strong reference, so the send outlives a cancelled caller
        task.add_done_callback(self._sends.discard)
        return await asyncio.shield(task), False

    async def watch(
        self,
        principal: Principal,
        account_id: str,
        folder_ids: list[str],
        resume_token: str,
        heartbeat_seconds: float,
    ) -> AsyncIterator[tuple[FeedEvent, str]]:
        """Events with the resume token after each; heartbeats when nothing happens. Ends with the error that
        ended the feed (erasure, a lost credential, a consumer too slow)."""
        account = await self._accounts.require(principal, account_id, Capability.METADATA)
        if self._watches.get(account_id, 0) >= self._max_watches:
            raise ResourceExhausted("too many feeds are open on this account", reason="TOO_MANY_WATCHES")
        self._watches[account_id] = self._watches.get(account_id, 0) + 1
        # One generator for the whole feed, not one wrapping another: 10,000 open feeds each keep theirs.
        try:
            driver = await self._drivers.get(account)
            folders = sorted(set(folder_ids)) or [driver.inbox_id]
            if len(folders) > MAX_WATCHED_FOLDERS:
                raise too_many_folders()
            binding = [principal.tenant, account_id, *folders]
            positions: dict[str, object] = {}
            if resume_token:
                opened = self._resume_tokens.open("resume", binding, resume_token)
                if opened is None:
                    raise InvalidArgument(
                        "resume_token is not valid for this feed",
                        reason="INVALID_RESUME_TOKEN",
                        field_violations=[FieldViolation("resume_token", "not a token of this account's feed")],
                    )
                positions = opened
            # Every upstream is made first (nothing runs until the hub starts one), so a folder id the driver refuses
            # fails the call before any feed exists.
            factories: dict[str, Callable[[], Upstream]] = {}
            for folder in folders:
                watcher = driver.folder_watcher(folder)
                factories[folder] = lambda watcher=watcher: watcher  # type: ignore[misc]
            factories[FOLDER_LIST] = lambda: FolderListWatcher(driver.list_folders, self._folder_poll_seconds)
            subscribers: dict[str, Subscriber] = {}
            # One flag for all of this stream's subscribers, set when any of them queues something: no task per queue.
            wake = Wake()
            try:
                for folder, factory in factories.items():
                    subscribers[folder] = self._feeds.subscribe(
                        account_id,
                        folder,
                        factory,
                        positions.get(folder),  # type: ignore[arg-type]
                        wake,
                    )
                factories.clear()  # their closures would live as long as the feed
                for folder, subscriber in subscribers.items():
                    start = await subscriber.start
                    positions.setdefault(folder, start)
                queues = [(folder, subscribers[folder].queue) for folder in sorted(subscribers)]
                while True:
                    # Cleared before the queues are looked at: whatever is queued after that sets it again.
                    wake.clear()
                    ready = [(folder, queue.get_nowait()) for folder, queue in queues if not queue.empty()]
                    if not ready:
                        try:
                            async with asyncio.timeout(heartbeat_seconds):  # not wait_for: no task per wait
                                await wake.wait()
                        except TimeoutError:
                            yield (
                                FeedEvent(Heartbeat(), {}, datetime.now(UTC)),
                                self._resume_tokens.seal("resume", binding, positions),
                            )
                        continue
                    for folder, item in ready:  # one item of each folder with any, in folder order, per round
                        if isinstance(item, FeedEnded):
                            raise item.error
                        if item.cursor:  # a position-less event (AccountStateChanged) leaves the token as it was
                            positions[folder] = item.cursor
                        yield item, self._resume_tokens.seal("resume", binding, positions)
            finally:
                for folder, subscriber in subscribers.items():
                    self._feeds.unsubscribe(account_id, folder, subscriber)
        finally:
            left = self._watches[account_id] - 1
            if left:
                self._watches[account_id] = left
            else:
                del self._watches[account_id]
