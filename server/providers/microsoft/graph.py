"""The Outlook driver: Microsoft Graph v1.0 over HTTPS with requests, an access token from the broker's token manager.

Ids: Graph ids are URL-safe base64 that may end in ``=`` padding; the broker's ids must be ``[A-Za-z0-9_-]``. A Graph
id ``core`` followed by n ``=`` becomes ``<n><core>``; anything else Graph hands out becomes ``b`` + its base64url.
Well-known folders (inbox, sentitems, ...) are named by their well-known name, which Graph takes in place of an id.
Attachment ids are a digest of Graph's (those run longer than a broker attachment id may be).

Calls run in the provider thread pool, at most MAX_CONCURRENT_REQUESTS at a time per mailbox (Outlook's documented
limit); 429 and 503 are retried after Retry-After (other 5xx with backoff, never for a send) within
``max_retry_seconds``; a 401 refreshes the token once. Every provider error is mapped into the broker's error tree
and says nothing personal. The access token is only ever sent to the configured Graph endpoint: links Graph hands
back (@odata.nextLink, @odata.deltaLink) are followed only when they point there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import random
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import requests
import urllib3.exceptions

from server.domain import deadline
from server.domain.blocking import BlockingPool
from server.domain.feeds import Upstream
from server.domain.mail import (
    AttachmentChunk,
    AttachmentInfo,
    EmailAddress,
    Folder,
    FolderRole,
    Message,
    MessagePage,
    MessageView,
    SendResult,
    check_query,
)
from server.errors import (
    BrokerError,
    CursorExpired,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OutcomeUnknown,
    PermissionDenied,
    ProviderUnavailable,
    RateLimited,
    Unauthenticated,
)
from server.providers import mime
from server.providers.base import ATTACHMENT_CHUNK_BYTES, DriverCapabilities
from server.providers.http import ThreadSessions
from server.providers.mime import BuiltMessage
from server.providers.stats import MICROSOFT, ProviderStats

if TYPE_CHECKING:
    from server.providers.microsoft.delta import AccountDelta

log = logging.getLogger("mailbroker.graph")

# Outlook allows four concurrent requests per mailbox and app (Graph throttling limits, "Outlook service limits").
MAX_CONCURRENT_REQUESTS = 4
WELL_KNOWN = {
    "inbox": FolderRole.INBOX,
    "sentitems": FolderRole.SENT,
    "drafts": FolderRole.DRAFTS,
    "deleteditems": FolderRole.TRASH,
    "junkemail": FolderRole.JUNK,
    "archive": FolderRole.ARCHIVE,
}
_CORE = re.compile(r"([A-Za-z0-9_-]+)(=*)")
_BROKER_ID = re.compile(r"[A-Za-z0-9_-]{2,512}")
_ATTACHMENT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_ENVELOPE_FIELDS = (
    "id,subject,from,toRecipients,ccRecipients,bccRecipients,replyTo,sentDateTime,receivedDateTime,"
    "internetMessageId,conversationId,isRead,isDraft,flag,parentFolderId,hasAttachments,createdDateTime"
)
# METADATA never names the body; the headers are not part of a delta (its $select takes plain properties).
METADATA_FIELDS = _ENVELOPE_FIELDS + ",internetMessageHeaders"
FULL_FIELDS = METADATA_FIELDS + ",body"
DELTA_FIELDS = _ENVELOPE_FIELDS
# contentId belongs to fileAttachment, not to the attachment base type: selected through a type cast. Without it
# (a service that refuses the cast) the list still has every base-type property.
ATTACHMENT_FIELDS = "id,name,contentType,size,isInline,microsoft.graph.fileAttachment/contentId"
ATTACHMENT_BASE_FIELDS = "id,name,contentType,size,isInline"
FILE_ATTACHMENT = "#microsoft.graph.fileAttachment"
RETRYABLE = frozenset({429, 500, 502, 503, 504})
CONNECT_RETRIES = 2
MAX_FOLDERS = 1000
DELTA_PAGE_SIZE = 50
_CURSOR_CODES = frozenset({"syncstatenotfound", "resyncrequired", "syncstateinvalid", "invaliddeltatoken"})
_INVALID_ID_CODES = frozenset({"errorinvalididmalformed", "erroritemnotfound-malformed", "errorinvalidid"})


class TokenSource(Protocol):
    async def access_token(self) -> str: ...

    def invalidate(self, token: str) -> None: ...


@dataclass(frozen=True)
class GraphSettings:
    graph_endpoint: str = "https://graph.microsoft.com/v1.0"
    ca_file: Path | None = None
    timeout_seconds: float = 30.0
    max_retry_seconds: float = 20.0
    delta_poll_seconds: float = 10.0
    stats: ProviderStats = field(default_factory=ProviderStats, compare=False)  # read by the metrics endpoint


# -- ids ------------------------------------------------------------------------------------------------------------


def encode_id(graph_id: str) -> str:
    """The broker's id (``[A-Za-z0-9_-]``) for a Graph id; :func:`decode_id` reverses it."""
    match = _CORE.fullmatch(graph_id)
    if match is not None and len(match.group(2)) <= 9:
        return f"{len(match.group(2))}{match.group(1)}"
    return "b" + base64.urlsafe_b64encode(graph_id.encode("utf-8")).rstrip(b"=").decode("ascii")


def _bad_id(field: str, what: str) -> InvalidArgument:
    return InvalidArgument(
        f"{field} does not name an Outlook {what}",
        reason="INVALID_RESOURCE_NAME",
        field_violations=[FieldViolation(field, f"not an id of an Outlook {what}")],
    )


def decode_id(value: str, field: str, what: str) -> str:
    """The Graph id behind a broker id; InvalidArgument INVALID_RESOURCE_NAME when it cannot be one."""
    if not _BROKER_ID.fullmatch(value):
        raise _bad_id(field, what)
    if value[0].isdigit():
        return value[1:] + "=" * int(value[0])
    if value[0] == "b":
        try:
            decoded = base64.urlsafe_b64decode(value[1:] + "=" * (-len(value[1:]) % 4)).decode("utf-8")
        except (binascii.Error, ValueError):
            raise _bad_id(field, what) from None
        if decoded and decoded.isprintable() and encode_id(decoded) == value:
            return decoded
    raise _bad_id(field, what)


def decode_folder(value: str, field: str = "folder") -> str:
    """The Graph id (or well-known name) of a broker folder id."""
    return value if value in WELL_KNOWN else decode_id(value, field, "folder")


def attachment_key(graph_id: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(graph_id.encode("utf-8")).digest()).decode("ascii")[:32]


# -- errors ---------------------------------------------------------------------------------------------------------


def _error_code(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else ""


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(when.tzinfo)).total_seconds())


def _map_error(response: requests.Response, not_found: str, *, sending: bool) -> BrokerError:
    status = response.status_code
    code = _error_code(response).lower()
    if status == 401:
        return Unauthenticated("the provider refused the account's credential", reason="PROVIDER_AUTH_FAILED")
    if status == 410 or code in _CURSOR_CODES:
        return CursorExpired("the provider no longer knows the sync state; resynchronise")
    if status == 429:
        return RateLimited(
            "the provider is rate limiting this account",
            reason="PROVIDER_RATE_LIMITED",
            retry_after=_retry_after(response),
        )
    if status == 403:
        return PermissionDenied("the account's grant does not allow this call", reason="SCOPE_NOT_GRANTED")
    if status == 404:
        return NotFound(not_found.replace("_", " ").lower(), reason=not_found)
    if status == 413:
        return InvalidArgument("the message is larger than the provider accepts", reason="MESSAGE_TOO_LARGE")
    if status == 400:
        return InvalidArgument(
            "the provider refused the request as invalid",
            reason="PROVIDER_REJECTED_MESSAGE" if sending else "PROVIDER_REJECTED_REQUEST",
        )
    if status >= 500 and sending:
        return OutcomeUnknown("the provider failed while sending; the message may have gone out")
    return ProviderUnavailable(
        "the provider failed",
        reason="PROVIDER_UNAVAILABLE" if status == 503 else "PROVIDER_ERROR",
        metadata={"http_status": str(status)},
        retry_after=_retry_after(response),
    )


def _never_connected(exc: BaseException) -> bool:
    """The request never reached the provider (refused, unresolvable, connect timeout): safe to retry a send."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, urllib3.exceptions.NewConnectionError | ConnectionRefusedError):
            return True
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException) and id(reason) not in seen:
            current = reason
            continue
        args = getattr(current, "args", ())
        nested = args[0] if args and isinstance(args[0], BaseException) else None
        current = nested or current.__cause__ or current.__context__
    return False


# -- the driver -----------------------------------------------------------------------------------------------------


class GraphDriver:
    """One Outlook / Microsoft 365 mailbox."""

    capabilities = DriverCapabilities(
        search=True, labels=False, partial_attachments=False, keeps_sent_copy=True, revocable=False
    )
    inbox_id = "inbox"

    def __init__(self, tokens: TokenSource, pool: BlockingPool, settings: GraphSettings) -> None:
        self._tokens = tokens
        self._pool = pool
        self._settings = settings
        self._base = settings.graph_endpoint.rstrip("/")
        self._http = ThreadSessions(str(settings.ca_file) if settings.ca_file else True, settings.timeout_seconds)
        self._limit = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)
        self._well_known: dict[str, str] | None = None  # Graph id -> well-known name
        self._well_known_lookup: asyncio.Future[dict[str, str]] | None = None  # the one in progress
        self._delta: AccountDelta | None = None  # the account's one delta poller, made on first watch

    # -- calls -----------------------------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self._base}/{path}"

    def own_link(self, link: object) -> str | None:
        """``link`` when it points into the configured Graph endpoint (so the token may go there), else None."""
        if isinstance(link, str) and link.startswith(self._base + "/") and "#" not in link and "@" not in link[:64]:
            return link
        return None

    def _send(
        self,
        method: str,
        url: str,
        token: str,
        params: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
        data: bytes | None,
        stream: bool,
    ) -> requests.Response:
        """One HTTP request, in a worker thread."""
        all_headers = {"Authorization": f"Bearer {token}", "Accept": "application/json", **(headers or {})}
        response = self._http.session().request(
            method, url, params=params, headers=all_headers, data=data, stream=stream, allow_redirects=False
        )
        if not stream or response.status_code >= 300:
            response.content  # noqa: B018 - read it here, in the worker thread, and free the connection
        return response

    async def _request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
        not_found: str = "NOT_FOUND",
        sending: bool = False,
        invalid: BrokerError | None = None,
        stream: bool = False,
    ) -> requests.Response:
        """A successful response, after any retries (one Graph call for the metrics). With ``stream`` the caller owns
        one of the mailbox's request slots until it calls :meth:`_release` (the body is still being read)."""
        with self._settings.stats.counting(MICROSOFT):
            loop = asyncio.get_running_loop()
            give_up = loop.time() + deadline.retry_budget(self._settings.max_retry_seconds)
            attempt = 0
            refreshed = False
            while True:
                attempt += 1
                token = await self._tokens.access_token()
                await self._limit.acquire()
                keep = False
                try:
                    response = await self._pool.run(self._send, method, url, token, params, headers, data, stream)
                    keep = stream and response.status_code < 300
                except (requests.RequestException, OSError) as exc:
                    never = _never_connected(exc)
                    if sending and not never:
                        # The request may have reached Graph before the connection failed.
                        raise OutcomeUnknown("the connection to the provider failed while sending") from None
                    if attempt > CONNECT_RETRIES or loop.time() > give_up:
                        raise ProviderUnavailable(
                            "the provider cannot be reached", reason="PROVIDER_UNREACHABLE"
                        ) from None
                    self._settings.stats.retry(MICROSOFT)
                    await asyncio.sleep(0.1 * attempt)
                    continue
                finally:
                    if not keep:
                        self._limit.release()
                status = response.status_code
                if status < 300:
                    return response
                if status == 401 and not refreshed:
                    self._tokens.invalidate(token)
                    refreshed = True
                    self._settings.stats.retry(MICROSOFT)
                    continue
                if status == 400 and invalid is not None and _error_code(response).lower() in _INVALID_ID_CODES:
                    raise invalid
                error = _map_error(response, not_found, sending=sending)
                retryable = isinstance(error, RateLimited) or (status in RETRYABLE and not sending)
                if not retryable:
                    raise error
                delay = error.retry_after
                if delay is None:
                    delay = min(8.0, 0.25 * 2 ** (attempt - 1)) * (0.5 + random.random())  # noqa: S311 - jitter
                if loop.time() + delay > give_up:
                    raise error
                self._settings.stats.retry(MICROSOFT)
                await asyncio.sleep(delay)

    def _release(self) -> None:
        self._limit.release()

    async def _get(self, url: str, **kwargs: Any) -> dict[str, Any]:
        response = await self._request("GET", url, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ProviderUnavailable("the provider's response was not JSON", reason="PROVIDER_ERROR")
        return body

    async def _pages(self, url: str, params: Mapping[str, str] | None, *, not_found: str, limit: int) -> list[Any]:
        """Every item of a collection, following @odata.nextLink (up to ``limit`` items)."""
        items: list[Any] = []
        next_url: str | None = url
        next_params = params
        while next_url is not None and len(items) < limit:
            body = await self._get(next_url, params=next_params, not_found=not_found)
            items.extend(body.get("value") or [])
            next_url, next_params = self.own_link(body.get("@odata.nextLink")), None
        return items

    # -- folders ---------------------------------------------------------------------------------------------------

    async def well_known(self) -> dict[str, str]:
        """Graph id → well-known name of the mailbox's well-known folders (asked once per driver; ids do not change).

        Concurrent calls share one lookup, its answer or its error: a hundred calls on a new driver would otherwise
        each ask for every folder, through the same four requests per mailbox that Outlook allows. A lookup that
        failed is made again by the next call."""
        if self._well_known is not None:
            return self._well_known
        if self._well_known_lookup is None:
            lookup = asyncio.ensure_future(self._look_up_well_known())
            lookup.add_done_callback(self._well_known_found)
            self._well_known_lookup = lookup
        # Shielded: a caller whose deadline passes stops waiting, and the lookup goes on for the others.
        return await asyncio.shield(self._well_known_lookup)

    def _well_known_found(self, lookup: asyncio.Future[dict[str, str]]) -> None:
        self._well_known_lookup = None
        if not lookup.cancelled() and lookup.exception() is None:
            self._well_known = lookup.result()

    async def _look_up_well_known(self) -> dict[str, str]:
        async def resolve(name: str) -> tuple[str, str] | None:
            try:
                body = await self._get(self._url(f"me/mailFolders/{name}"), params={"$select": "id"})
            except NotFound:
                return None  # a mailbox without that folder (no archive)
            return (str(body.get("id", "")), name) if body.get("id") else None

        lookups = [asyncio.ensure_future(resolve(name)) for name in WELL_KNOWN]
        try:
            found = await asyncio.gather(*lookups)
        except BaseException:
            for lookup in lookups:  # one failed: the others' answers would be thrown away
                lookup.cancel()
            raise
        return dict(pair for pair in found if pair is not None)

    async def folder_key(self, graph_id: str) -> str:
        """The broker's folder id of a Graph folder id."""
        return (await self.well_known()).get(graph_id) or encode_id(graph_id)

    async def check_folder(self, folder_id: str, field: str = "folder") -> str:
        """The Graph id (or well-known name) of an existing folder; NotFound FOLDER_NOT_FOUND otherwise."""
        graph_id = decode_folder(folder_id, field)
        await self._get(
            self._url(f"me/mailFolders/{quote(graph_id, safe='')}"),
            params={"$select": "id"},
            not_found="FOLDER_NOT_FOUND",
            invalid=_bad_id(field, "folder"),
        )
        return graph_id

    async def list_folders(self) -> list[Folder]:
        well_known = await self.well_known()
        fields = {"$select": "id,displayName,parentFolderId,childFolderCount,totalItemCount,unreadItemCount"}
        found: list[dict[str, Any]] = []
        pending = [self._url("me/mailFolders")]
        while pending and len(found) < MAX_FOLDERS:
            url = pending.pop(0)
            for folder in await self._pages(url, {**fields, "$top": "100"}, not_found="FOLDER_NOT_FOUND", limit=1000):
                if not isinstance(folder, dict) or not folder.get("id"):
                    continue
                found.append(folder)
                if int(folder.get("childFolderCount") or 0) > 0:
                    pending.append(self._url(f"me/mailFolders/{quote(str(folder['id']), safe='')}/childFolders"))
        listed = {str(f["id"]) for f in found}
        folders = []
        for folder in found[:MAX_FOLDERS]:
            graph_id = str(folder["id"])
            parent = str(folder.get("parentFolderId") or "")
            name = well_known.get(graph_id)
            folders.append(
                Folder(
                    id=name or encode_id(graph_id),
                    display_name=mime.clean_text(str(folder.get("displayName") or "")),
                    role=WELL_KNOWN[name] if name else None,
                    parent_id=(well_known.get(parent) or encode_id(parent)) if parent in listed else None,
                    message_count=_int_or_none(folder.get("totalItemCount")),
                    unread_count=_int_or_none(folder.get("unreadItemCount")),
                )
            )
        return folders

    # -- messages --------------------------------------------------------------------------------------------------

    async def list_messages(
        self, folder_id: str | None, query: str | None, page_size: int, cursor: dict[str, object] | None
    ) -> MessagePage:
        graph_folder = decode_folder(folder_id) if folder_id else self.inbox_id
        if query:
            check_query(query)
        next_link = cursor.get("n") if cursor else None
        if next_link is not None:
            url = self.own_link(next_link)
            if url is None:
                raise InvalidArgument("page_token is not valid", reason="INVALID_PAGE_TOKEN")
            body = await self._get(url, not_found="FOLDER_NOT_FOUND")
        else:
            params = {"$select": METADATA_FIELDS, "$top": str(page_size)}
            if query:
                # $search takes a KQL phrase in double quotes; check_query refused quotes and backslashes. Results
                # come newest first; $orderby cannot go with $search.
                params["$search"] = f'"{query}"'
            else:
                params["$orderby"] = "receivedDateTime desc"
            body = await self._get(
                self._url(f"me/mailFolders/{quote(graph_folder, safe='')}/messages"),
                params=params,
                not_found="FOLDER_NOT_FOUND",
                invalid=_bad_id("folder", "folder"),
            )
        well_known = await self.well_known()
        messages = [
            message_from_resource(item, MessageView.METADATA, well_known)
            for item in body.get("value") or []
            if isinstance(item, dict) and item.get("id")
        ]
        link = self.own_link(body.get("@odata.nextLink"))
        return MessagePage(messages, {"n": link} if link else None)

    async def _resource(self, message_id: str, fields: str, prefer: str | None = None) -> dict[str, Any]:
        graph_id = decode_id(message_id, "name", "message")
        return await self._get(
            self._url(f"me/messages/{quote(graph_id, safe='')}"),
            params={"$select": fields},
            headers={"Prefer": prefer} if prefer else None,
            not_found="MESSAGE_NOT_FOUND",
            invalid=_bad_id("name", "message"),
        )

    async def get_message(self, message_id: str, view: MessageView) -> Message:
        well_known = await self.well_known()
        if view is MessageView.METADATA:
            return message_from_resource(await self._resource(message_id, METADATA_FIELDS), view, well_known)
        resource = await self._resource(message_id, FULL_FIELDS, 'outlook.body-content-type="html"')
        body = resource.get("body") or {}
        text_body = html_body = ""
        if str(body.get("contentType", "")).lower() == "html":
            html_body = str(body.get("content") or "")
            # The text rendering of the same body, as Outlook makes it.
            plain = await self._resource(message_id, "body", 'outlook.body-content-type="text"')
            text_body = str((plain.get("body") or {}).get("content") or "")
        else:
            text_body = str(body.get("content") or "")
        attachments: tuple[AttachmentInfo, ...] = ()
        if resource.get("hasAttachments") or html_body:  # inline images do not set hasAttachments
            attachments = tuple(info for _, info in await self._attachments(message_id))
        message = message_from_resource(resource, view, well_known)
        return _with_content(message, text_body, html_body, attachments)

    async def _attachments(self, message_id: str) -> list[tuple[str, AttachmentInfo]]:
        """(Graph attachment id, info) of the message's file attachments (item and reference attachments are not
        files the broker can stream)."""
        graph_id = decode_id(message_id, "name", "message")
        url = self._url(f"me/messages/{quote(graph_id, safe='')}/attachments")
        try:
            items = await self._pages(url, {"$select": ATTACHMENT_FIELDS}, not_found="MESSAGE_NOT_FOUND", limit=500)
        except InvalidArgument:
            items = await self._pages(
                url, {"$select": ATTACHMENT_BASE_FIELDS}, not_found="MESSAGE_NOT_FOUND", limit=500
            )
        found = []
        for item in items:
            if not isinstance(item, dict) or not item.get("id"):
                continue
            if item.get("@odata.type", FILE_ATTACHMENT) != FILE_ATTACHMENT:
                continue
            content_type, _ = mime.split_header_parameters(str(item.get("contentType") or ""))
            found.append(
                (
                    str(item["id"]),
                    AttachmentInfo(
                        id=attachment_key(str(item["id"])),
                        filename=mime.clean_text(str(item.get("name") or "")),
                        content_type=content_type.lower() or "application/octet-stream",
                        size_bytes=int(item.get("size") or 0),
                        inline=bool(item.get("isInline")),
                        content_id=mime.clean_text(str(item.get("contentId") or "").strip().strip("<>")),
                    ),
                )
            )
        return found

    async def stream_attachment(self, message_id: str, attachment_id: str) -> AsyncIterator[AttachmentChunk]:
        if not _ATTACHMENT_ID.fullmatch(attachment_id):
            raise _bad_id("name", "attachment")
        graph_message = decode_id(message_id, "name", "message")
        found = next(((g, info) for g, info in await self._attachments(message_id) if info.id == attachment_id), None)
        if found is None:
            raise NotFound("attachment not found", reason="ATTACHMENT_NOT_FOUND")
        graph_attachment, info = found
        url = self._url(
            f"me/messages/{quote(graph_message, safe='')}/attachments/{quote(graph_attachment, safe='')}/$value"
        )
        response = await self._request(
            "GET", url, headers={"Accept": "*/*"}, not_found="ATTACHMENT_NOT_FOUND", stream=True
        )
        try:
            chunks: Iterator[bytes] = response.iter_content(ATTACHMENT_CHUNK_BYTES)
            offset = 0
            first = True
            while True:
                try:
                    chunk = await self._pool.run(next, chunks, b"")
                except (requests.RequestException, OSError):
                    raise ProviderUnavailable(
                        "the connection to the provider failed", reason="PROVIDER_UNREACHABLE"
                    ) from None
                if not chunk:
                    break
                # iter_content may hand over less than asked, never more.
                yield AttachmentChunk(offset, chunk, info if first else None)
                offset += len(chunk)
                first = False
            if first:
                yield AttachmentChunk(0, b"", info)
        finally:
            response.close()
            self._release()

    # -- sending ---------------------------------------------------------------------------------------------------

    async def send_message(self, built: BuiltMessage, envelope_from: str) -> SendResult:
        # sendMail in MIME: the recipients come from the message, Bcc included; Exchange drops Bcc on delivery.
        payload = base64.b64encode(built.bcc_field + built.raw)
        await self._request(
            "POST",
            self._url("me/sendMail"),
            headers={"Content-Type": "text/plain"},
            data=payload,
            sending=True,
        )
        return SendResult(internet_message_id=built.internet_message_id, send_time=datetime.now(UTC))

    # -- delta -----------------------------------------------------------------------------------------------------

    def delta_start(self, graph_folder: str) -> tuple[str, dict[str, str]]:
        """The URL and parameters of a folder's first delta round."""
        return (
            self._url(f"me/mailFolders/{quote(graph_folder, safe='')}/messages/delta"),
            {"$select": DELTA_FIELDS},
        )

    async def delta_round(
        self, url: str, params: Mapping[str, str] | None
    ) -> tuple[list[dict[str, Any]], str, datetime | None]:
        """Every change of one delta round (all its pages), its @odata.deltaLink, and the provider's clock when
        the round ended. An expired sync state → CursorExpired; the folder gone → NotFound FOLDER_NOT_FOUND."""
        items: list[dict[str, Any]] = []
        next_url: str | None = url
        next_params = params
        prefer = {"Prefer": f"odata.maxpagesize={DELTA_PAGE_SIZE}"}
        while True:
            assert next_url is not None
            response = await self._request(
                "GET", next_url, params=next_params, headers=prefer, not_found="FOLDER_NOT_FOUND"
            )
            try:
                body = response.json()
            except ValueError:
                body = None
            if not isinstance(body, dict):
                raise ProviderUnavailable("the provider's response was not JSON", reason="PROVIDER_ERROR")
            items.extend(item for item in body.get("value") or [] if isinstance(item, dict) and item.get("id"))
            delta_link = self.own_link(body.get("@odata.deltaLink"))
            if delta_link is not None:
                return items, delta_link, _server_time(response)
            next_url, next_params = self.own_link(body.get("@odata.nextLink")), None
            if next_url is None:
                raise ProviderUnavailable("the provider's delta response had no link", reason="PROVIDER_ERROR")

    def folder_watcher(self, folder_id: str) -> Upstream:
        from server.providers.microsoft.delta import AccountDelta, FolderDelta

        decode_folder(folder_id, "folders")
        if self._delta is None:
            self._delta = AccountDelta(self, self._settings.delta_poll_seconds)
        return FolderDelta(self._delta, folder_id)

    async def close(self) -> None:
        if self._delta is not None:
            self._delta.close()
        if self._well_known_lookup is not None:
            self._well_known_lookup.cancel()
        self._http.close()


# -- conversion -----------------------------------------------------------------------------------------------------


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _server_time(response: requests.Response) -> datetime | None:
    try:
        return parsedate_to_datetime(response.headers.get("Date", ""))
    except (TypeError, ValueError):
        return None


def _address(value: object) -> EmailAddress | None:
    inner = value.get("emailAddress") if isinstance(value, dict) else None
    if not isinstance(inner, dict) or not inner.get("address"):
        return None
    address = mime.clean_text(str(inner["address"]))
    name = mime.clean_text(str(inner.get("name") or ""))
    # Exchange names an address that came without a display name by the address itself.
    return EmailAddress(address, "" if name.lower() == address.lower() else name)


def _addresses(values: object) -> tuple[EmailAddress, ...]:
    if not isinstance(values, list):
        return ()
    return tuple(a for a in (_address(v) for v in values) if a is not None)


def _headers(resource: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for header in resource.get("internetMessageHeaders") or []:
        if not isinstance(header, dict):
            continue
        name, value = str(header.get("name", "")), str(header.get("value", ""))
        if name and all(33 <= ord(c) <= 126 and c != ":" for c in name):
            pairs.append((name, re.sub(r"[\r\n\0]+", " ", value)))
    if not pairs:
        return ()
    raw = "".join(f"{n}: {v}\r\n" for n, v in pairs).encode("utf-8", "surrogateescape") + b"\r\n"
    return mime.parse_headers(raw).headers


def message_from_resource(resource: Mapping[str, Any], view: MessageView, well_known: Mapping[str, str]) -> Message:
    """A Message (no bodies, no attachments) from a Graph message resource."""
    parent = str(resource.get("parentFolderId") or "")
    flag = resource.get("flag") or {}
    return Message(
        id=encode_id(str(resource.get("id", ""))),
        view=view,
        folder_ids=((well_known.get(parent) or encode_id(parent)),) if parent else (),
        thread_id=encode_id(str(resource["conversationId"])) if resource.get("conversationId") else "",
        internet_message_id=mime.clean_text(str(resource.get("internetMessageId") or "")),
        subject=mime.clean_text(str(resource.get("subject") or "")),
        sender=_address(resource.get("from")),
        to=_addresses(resource.get("toRecipients")),
        cc=_addresses(resource.get("ccRecipients")),
        bcc=_addresses(resource.get("bccRecipients")),
        reply_to=_addresses(resource.get("replyTo")),
        send_time=_time(resource.get("sentDateTime")),
        receive_time=_time(resource.get("receivedDateTime")),
        read=bool(resource.get("isRead")),
        flagged=isinstance(flag, dict) and flag.get("flagStatus") == "flagged",
        draft=bool(resource.get("isDraft")),
        headers=_headers(resource),
    )


def _with_content(message: Message, text_body: str, html_body: str, attachments: tuple[AttachmentInfo, ...]) -> Message:
    return replace(message, text_body=text_body, html_body=html_body, attachments=attachments)
