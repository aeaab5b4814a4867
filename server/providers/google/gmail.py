"""The Gmail driver: google-api-python-client (static discovery) over httplib2, with google-auth credentials holding
an access token from the broker's token manager.

Labels are folders; message ids are Gmail's; attachment ids name the MIME part (Gmail's own attachment ids change
from one fetch to the next). Calls run in the provider thread pool; 429 and 5xx are retried with backoff (and any
Retry-After) within ``max_retry_seconds``; a 401 refreshes the token once. Every provider error is mapped into the
broker's error tree and says nothing personal.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import json
import logging
import random
import re
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import google.oauth2.credentials
import google_auth_httplib2
import httplib2
from googleapiclient import discovery
from googleapiclient.errors import HttpError
from googleapiclient.http import HttpRequest, MediaIoBaseUpload

from server.domain import deadline
from server.domain.blocking import BlockingPool
from server.domain.feeds import Upstream
from server.domain.mail import (
    AttachmentChunk,
    AttachmentInfo,
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
from server.providers.mime import BuiltMessage
from server.providers.stats import GOOGLE, ProviderStats

if TYPE_CHECKING:
    from server.providers.google.history import AccountHistory

log = logging.getLogger("mailbroker.gmail")

USER = "me"
_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_PART = re.compile(r"^[0-9]{1,4}(-[0-9]{1,4}){0,15}$")
ROLES = {
    "INBOX": FolderRole.INBOX,
    "SENT": FolderRole.SENT,
    "DRAFT": FolderRole.DRAFTS,
    "TRASH": FolderRole.TRASH,
    "SPAM": FolderRole.JUNK,
    "STARRED": FolderRole.FLAGGED,
    "IMPORTANT": FolderRole.IMPORTANT,
}
# System labels that are states, not places.
NOT_FOLDERS = frozenset({"UNREAD", "CHAT"})
RETRYABLE = frozenset({429, 500, 502, 503, 504})
CONNECT_RETRIES = 2
TOKEN_REFRESHES = 2
LIST_FETCH_CONCURRENCY = 8


class TokenSource(Protocol):
    async def access_token(self) -> str: ...

    def invalidate(self, token: str) -> None: ...


@dataclass(frozen=True)
class GmailSettings:
    api_endpoint: str = "https://gmail.googleapis.com/"
    ca_file: Path | None = None
    timeout_seconds: float = 30.0
    max_retry_seconds: float = 20.0
    history_poll_seconds: float = 10.0
    stats: ProviderStats = field(default_factory=ProviderStats, compare=False)  # read by the metrics endpoint


_services: dict[str, Any] = {}
_services_lock = threading.Lock()


def _service(api_endpoint: str) -> Any:
    """The discovery-built client for ``api_endpoint``, made once per process (building parses a large document)."""
    with _services_lock:
        service = _services.get(api_endpoint)
        if service is None:
            service = discovery.build(
                "gmail",
                "v1",
                http=httplib2.Http(),  # never used: every request is executed with a per-thread, authorized Http
                static_discovery=True,
                cache_discovery=False,
                client_options={"api_endpoint": api_endpoint},
            )
            _services[api_endpoint] = service
        return service


class _HTTPSConnection(httplib2.HTTPSConnectionWithTimeout):  # type: ignore[misc]
    """httplib2's connection, except that a refused connection's socket is closed at once: httplib2 leaves it to
    the garbage collector (a ResourceWarning, and an open descriptor until then). Through a proxy: httplib2's own."""

    def connect(self) -> None:
        if self.proxy_info and self.proxy_info.isgood() and self.proxy_info.applies_to(self.host):
            super().connect()
            return
        timeout = self.timeout if isinstance(self.timeout, int | float) and self.timeout > 0 else None
        sock = socket.create_connection((self.host, self.port), timeout=timeout)  # closes its socket on failure
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


class _Http(httplib2.Http):  # type: ignore[misc]
    def request(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("connection_type") is None:  # google-auth-httplib2 passes None
            kwargs["connection_type"] = _HTTPSConnection
        return super().request(*args, **kwargs)


class _ThreadHttp:
    """One httplib2.Http per thread (it is not thread-safe), reused so its TLS connections are kept, and every one
    of them closed when the driver closes (a pool thread outlives the driver; its sockets must not)."""

    def __init__(self, ca_file: Path | None, timeout: float) -> None:
        self._ca_file = ca_file
        self._timeout = timeout
        self._local = threading.local()
        self._made: list[httplib2.Http] = []
        self._lock = threading.Lock()

    def get(self) -> httplib2.Http:
        http: httplib2.Http | None = getattr(self._local, "http", None)
        if http is None:
            http = _Http(ca_certs=str(self._ca_file) if self._ca_file else None, timeout=self._timeout)
            self._local.http = http
            with self._lock:
                self._made.append(http)
        return http

    def close(self) -> None:
        with self._lock:
            made, self._made = self._made, []
            # Threads that still hold one make a new one next time (their cached Http is closed and forgotten).
            self._local = threading.local()
        for http in made:
            http.close()


def _b64decode(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def _bad_id(field: str, what: str) -> InvalidArgument:
    return InvalidArgument(
        f"{field} does not name a Gmail {what}",
        reason="INVALID_RESOURCE_NAME",
        field_violations=[FieldViolation(field, f"not an id of a Gmail {what}")],
    )


def _check_id(value: str, field: str, what: str) -> str:
    if not _ID.match(value):
        raise _bad_id(field, what)
    return value


def _error_details(exc: HttpError) -> tuple[int, str]:
    """(HTTP status, Google's first error reason) of a failed call."""
    status = int(getattr(exc.resp, "status", 0) or 0)
    reason = ""
    try:
        body = json.loads(exc.content or b"{}")
        errors = body.get("error", {}).get("errors") or []
        if errors and isinstance(errors[0], dict):
            reason = str(errors[0].get("reason", ""))
        if not reason:
            reason = str(body.get("error", {}).get("status", ""))
    except (ValueError, AttributeError):
        pass
    return status, reason


def _retry_after(exc: HttpError) -> float | None:
    value = exc.resp.get("retry-after") if exc.resp is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _map_http_error(exc: HttpError, not_found: str, *, sending: bool) -> BrokerError:
    status, reason = _error_details(exc)
    if status == 401:
        return Unauthenticated("the provider refused the account's credential", reason="PROVIDER_AUTH_FAILED")
    if status == 429 or reason in ("rateLimitExceeded", "userRateLimitExceeded", "quotaExceeded"):
        return RateLimited("the provider is rate limiting this account", reason="PROVIDER_RATE_LIMITED")
    if status == 403:
        if reason in ("insufficientPermissions", "PERMISSION_DENIED", "forbidden"):
            return PermissionDenied("the account's grant does not allow this call", reason="SCOPE_NOT_GRANTED")
        return PermissionDenied("the provider refused the call", reason="PROVIDER_PERMISSION_DENIED")
    if status == 404:
        return NotFound(not_found.replace("_", " ").lower(), reason=not_found)
    if status == 400:
        return InvalidArgument(
            "the provider refused the request as invalid",
            reason="PROVIDER_REJECTED_MESSAGE" if sending else "PROVIDER_REJECTED_REQUEST",
        )
    if status >= 500 and sending:
        return OutcomeUnknown("the provider failed while sending; the message may have gone out")
    return ProviderUnavailable("the provider failed", reason="PROVIDER_ERROR", metadata={"http_status": str(status)})


def _connection_refused(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionRefusedError | socket.gaierror) or (
        isinstance(exc, OSError) and exc.errno in (111, 113, 101)
    )


class GmailDriver:
    """One Gmail account."""

    capabilities = DriverCapabilities(
        search=True, labels=True, partial_attachments=False, keeps_sent_copy=True, revocable=True
    )
    inbox_id = "INBOX"

    def __init__(self, tokens: TokenSource, pool: BlockingPool, settings: GmailSettings) -> None:
        self._tokens = tokens
        self._pool = pool
        self._settings = settings
        self._labels: frozenset[str] | None = None
        self._http = _ThreadHttp(settings.ca_file, settings.timeout_seconds)
        self._history: AccountHistory | None = None  # the account's one history poller, made on first watch

    # -- calls -----------------------------------------------------------------------------------------------------

    def _run(self, make: Callable[[Any], HttpRequest], token: str) -> Any:
        """One HTTP request, in a worker thread."""
        credentials = google.oauth2.credentials.Credentials(token=token)  # type: ignore[no-untyped-call]
        http = google_auth_httplib2.AuthorizedHttp(
            credentials,
            http=self._http.get(),
            refresh_status_codes=(),  # the broker's token manager refreshes, single-flight, not this thread
        )
        return make(_service(self._settings.api_endpoint)).execute(http=http, num_retries=0)

    async def _call(
        self,
        make: Callable[[Any], HttpRequest],
        *,
        not_found: str = "NOT_FOUND",
        sending: bool = False,
        invalid: BrokerError | None = None,
    ) -> Any:
        """One Gmail call, its retries included, counted for the metrics (see :meth:`_call_retrying`)."""
        with self._settings.stats.counting(GOOGLE):
            return await self._call_retrying(make, not_found=not_found, sending=sending, invalid=invalid)

    async def _call_retrying(
        self,
        make: Callable[[Any], HttpRequest],
        *,
        not_found: str = "NOT_FOUND",
        sending: bool = False,
        invalid: BrokerError | None = None,
    ) -> Any:
        """``invalid``: what a 400 means when the call names a resource by an id the caller gave (Gmail answers
        "Invalid id value" for an id it cannot parse)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + deadline.retry_budget(self._settings.max_retry_seconds)
        attempt = 0
        refreshes = 0
        while True:
            attempt += 1
            token = await self._tokens.access_token()
            try:
                return await self._pool.run(self._run, make, token)
            except HttpError as exc:
                status = int(getattr(exc.resp, "status", 0) or 0)
                if status == 401 and refreshes < TOKEN_REFRESHES:
                    # Refused: refresh and try again. Twice, because a token refreshed just before the user revoked
                    # the grant is refused too; only the next refresh then learns (invalid_grant) that it is gone.
                    self._tokens.invalidate(token)
                    refreshes += 1
                    self._settings.stats.retry(GOOGLE)
                    continue
                error = _map_http_error(exc, not_found, sending=sending)
                if status == 400 and invalid is not None:
                    raise invalid from None
                retryable = isinstance(error, RateLimited) or (status in RETRYABLE and not sending)
                if not retryable:
                    raise error from None
                asked = _retry_after(exc)
                delay = asked
                if delay is None:
                    delay = min(8.0, 0.25 * 2 ** (attempt - 1)) * (0.5 + random.random())  # noqa: S311 - jitter
                if loop.time() + delay > give_up:
                    error.retry_after = asked  # the caller learns (RetryInfo) how long Google asked to wait
                    raise error from None
                self._settings.stats.retry(GOOGLE)
                await asyncio.sleep(delay)
            except (OSError, ssl.SSLError, httplib2.HttpLib2Error, TimeoutError) as exc:
                refused = _connection_refused(exc)
                if sending and not refused:
                    # The request may have reached Gmail before the connection failed.
                    raise OutcomeUnknown("the connection to the provider failed while sending") from None
                if attempt > CONNECT_RETRIES or loop.time() > give_up:
                    raise ProviderUnavailable("the provider cannot be reached", reason="PROVIDER_UNREACHABLE") from None
                self._settings.stats.retry(GOOGLE)
                await asyncio.sleep(0.1 * attempt)

    # -- folders ---------------------------------------------------------------------------------------------------

    async def _label_list(self) -> list[dict[str, Any]]:
        response = await self._call(lambda s: s.users().labels().list(userId=USER))
        labels: list[dict[str, Any]] = response.get("labels", [])
        self._labels = frozenset(label["id"] for label in labels)
        return labels

    async def check_folder(self, folder_id: str, field: str = "folder") -> str:
        _check_id(folder_id, field, "label")
        if folder_id in NOT_FOLDERS:
            raise NotFound("folder not found", reason="FOLDER_NOT_FOUND")
        if self._labels is None or folder_id not in self._labels:
            await self._label_list()
        assert self._labels is not None
        if folder_id not in self._labels:
            raise NotFound("folder not found", reason="FOLDER_NOT_FOUND")
        return folder_id

    async def list_folders(self) -> list[Folder]:
        folders = []
        for label in await self._label_list():
            if label["id"] in NOT_FOLDERS or not _ID.match(label["id"]):
                continue
            folders.append(
                Folder(
                    id=label["id"],
                    display_name=mime.clean_text(str(label.get("name", label["id"]))),
                    role=ROLES.get(label["id"]),
                    message_count=label.get("messagesTotal"),
                    unread_count=label.get("messagesUnread"),
                )
            )
        return folders

    # -- messages --------------------------------------------------------------------------------------------------

    async def list_messages(
        self, folder_id: str | None, query: str | None, page_size: int, cursor: dict[str, object] | None
    ) -> MessagePage:
        label = await self.check_folder(folder_id) if folder_id else self.inbox_id
        if query:
            check_query(query)
        page_token = cursor.get("p") if cursor else None
        response = await self._call(
            lambda s: (
                s.users()
                .messages()
                .list(userId=USER, labelIds=[label], q=query or None, maxResults=page_size, pageToken=page_token)
            )
        )
        ids = [item["id"] for item in response.get("messages", [])]
        limit = asyncio.Semaphore(LIST_FETCH_CONCURRENCY)

        async def fetch(message_id: str) -> Message | None:
            async with limit:
                try:
                    return await self.get_message(message_id, MessageView.METADATA)
                except NotFound:
                    return None  # deleted since the listing

        messages = [m for m in await asyncio.gather(*(fetch(i) for i in ids)) if m is not None]
        next_token = response.get("nextPageToken")
        return MessagePage(messages, {"p": next_token} if next_token else None)

    async def _get(self, message_id: str, view: MessageView) -> dict[str, Any]:
        _check_id(message_id, "name", "message")
        form = "full" if view is MessageView.FULL else "metadata"
        result: dict[str, Any] = await self._call(
            lambda s: s.users().messages().get(userId=USER, id=message_id, format=form),
            not_found="MESSAGE_NOT_FOUND",
            invalid=_bad_id("name", "message"),
        )
        return result

    async def get_message(self, message_id: str, view: MessageView) -> Message:
        return message_from_resource(await self._get(message_id, view), view)

    async def stream_attachment(self, message_id: str, attachment_id: str) -> AsyncIterator[AttachmentChunk]:
        if not _PART.match(attachment_id):
            raise _bad_id("name", "attachment")
        resource = await self._get(message_id, MessageView.FULL)
        found = next(
            ((p, info) for p, info in _attachment_parts(resource.get("payload", {})) if info.id == attachment_id), None
        )
        if found is None:
            raise NotFound("attachment not found", reason="ATTACHMENT_NOT_FOUND")
        part, info = found
        body = part.get("body", {})
        if body.get("attachmentId"):
            attachment = await self._call(
                lambda s: (
                    s.users().messages().attachments().get(userId=USER, messageId=message_id, id=body["attachmentId"])
                ),
                not_found="ATTACHMENT_NOT_FOUND",
            )
            data = _b64decode(attachment.get("data", ""))
        else:
            data = _b64decode(body.get("data", ""))
        # The Gmail API has no ranged reads: the attachment arrives whole and is handed on in chunks.
        offset = 0
        first = True
        while first or offset < len(data):
            chunk = data[offset : offset + ATTACHMENT_CHUNK_BYTES]
            yield AttachmentChunk(offset, chunk, info if first else None)
            offset += len(chunk)
            first = False

    # -- sending ---------------------------------------------------------------------------------------------------

    async def send_message(self, built: BuiltMessage, envelope_from: str) -> SendResult:
        raw = built.bcc_field + built.raw  # Gmail takes the recipients from the message and drops Bcc itself

        def make(service: Any) -> HttpRequest:
            media = MediaIoBaseUpload(io.BytesIO(raw), mimetype="message/rfc822", resumable=False)
            return service.users().messages().send(userId=USER, media_body=media)

        response = await self._call(make, sending=True)
        return SendResult(
            internet_message_id=built.internet_message_id,
            send_time=datetime.now(UTC),
            message_id=str(response.get("id", "")),
        )

    # -- history ---------------------------------------------------------------------------------------------------

    async def current_history_id(self) -> int:
        profile = await self._call(lambda s: s.users().getProfile(userId=USER))
        return int(profile["historyId"])

    async def history_since(self, start: int) -> tuple[list[dict[str, Any]], int]:
        """Every history record after ``start`` (all pages) and the mailbox's current historyId.
        A ``start`` Gmail no longer keeps → NotFound HISTORY_EXPIRED."""
        records: list[dict[str, Any]] = []
        page_token: str | None = None
        latest = start
        while True:
            response = await self._call(
                functools.partial(_history_page, start=start, page_token=page_token), not_found="HISTORY_EXPIRED"
            )
            records.extend(response.get("history", []))
            latest = max(latest, int(response.get("historyId", latest)))
            page_token = response.get("nextPageToken")
            if not page_token:
                return records, latest

    def folder_watcher(self, folder_id: str) -> Upstream:
        from server.providers.google.history import AccountHistory, HistoryWatcher

        if self._history is None:
            self._history = AccountHistory(self, self._settings.history_poll_seconds)
        return HistoryWatcher(self, _check_id(folder_id, "folders", "label"), self._history)

    async def verify(self) -> None:
        await self.current_history_id()

    async def close(self) -> None:
        self._http.close()


def _history_page(service: Any, *, start: int, page_token: str | None) -> HttpRequest:
    return service.users().history().list(userId=USER, startHistoryId=str(start), pageToken=page_token, maxResults=500)


# -- conversion --------------------------------------------------------------------------------------------------


def _headers_of(part: Mapping[str, Any]) -> list[tuple[str, str]]:
    pairs = []
    for header in part.get("headers", []) or []:
        name, value = str(header.get("name", "")), str(header.get("value", ""))
        if name and all(33 <= ord(c) <= 126 and c != ":" for c in name):
            pairs.append((name, re.sub(r"[\r\n\0]+", " ", value)))
    return pairs


def _header(pairs: list[tuple[str, str]], name: str) -> str:
    lowered = name.lower()
    return next((v for n, v in pairs if n.lower() == lowered), "")


def message_from_resource(resource: Mapping[str, Any], view: MessageView) -> Message:
    payload = resource.get("payload", {}) or {}
    pairs = _headers_of(payload)
    raw_headers = "".join(f"{n}: {v}\r\n" for n, v in pairs).encode("utf-8", "surrogateescape") + b"\r\n"
    parsed = mime.parse_headers(raw_headers)
    labels = tuple(str(label) for label in resource.get("labelIds", []) or [])
    received = None
    if str(resource.get("internalDate", "")).isdigit():
        received = datetime.fromtimestamp(int(resource["internalDate"]) / 1000, UTC)
    text_body = html_body = ""
    attachments: tuple[AttachmentInfo, ...] = ()
    if view is MessageView.FULL:
        text_body, html_body = _bodies(payload)
        attachments = tuple(info for _, info in _attachment_parts(payload))
    return Message(
        id=str(resource.get("id", "")),
        view=view,
        folder_ids=tuple(label for label in labels if label not in NOT_FOLDERS),
        thread_id=str(resource.get("threadId", "")),
        internet_message_id=parsed.internet_message_id,
        subject=parsed.subject,
        sender=parsed.sender,
        to=parsed.to,
        cc=parsed.cc,
        bcc=parsed.bcc,
        reply_to=parsed.reply_to,
        send_time=parsed.send_time,
        receive_time=received,
        size_bytes=int(resource.get("sizeEstimate", 0) or 0),
        read="UNREAD" not in labels,
        flagged="STARRED" in labels,
        draft="DRAFT" in labels,
        headers=parsed.headers,
        text_body=text_body,
        html_body=html_body,
        attachments=attachments,
    )


def _leaves(part: Mapping[str, Any], in_related: bool = False) -> Iterator[tuple[Mapping[str, Any], bool]]:
    children = part.get("parts") or []
    if children:
        related = str(part.get("mimeType", "")).lower() == "multipart/related"
        for child in children:
            yield from _leaves(child, in_related or related)
    elif not str(part.get("mimeType", "")).lower().startswith("multipart/"):
        yield part, in_related


def _content_params(pairs: list[tuple[str, str]], name: str) -> tuple[str, dict[str, str]]:
    value, params = mime.split_header_parameters(_header(pairs, name))
    return value.lower(), params


def _classify(part: Mapping[str, Any], in_related: bool) -> tuple[bool, bool, str, str, str]:
    pairs = _headers_of(part)
    content_type = str(part.get("mimeType", "")).lower() or "text/plain"
    disposition, disposition_params = _content_params(pairs, "Content-Disposition")
    _, type_params = _content_params(pairs, "Content-Type")
    filename = mime.clean_text(str(part.get("filename", "")) or disposition_params.get("filename", ""))
    is_attachment, inline = mime.classify_part(content_type, disposition, filename, in_related)
    return is_attachment, inline, filename, content_type, type_params.get("charset", "")


def _bodies(payload: Mapping[str, Any]) -> tuple[str, str]:
    text = html = ""
    for part, in_related in _leaves(payload):
        is_attachment, _, _, content_type, charset = _classify(part, in_related)
        if is_attachment:
            continue
        data = (part.get("body") or {}).get("data")
        if not data:
            continue
        try:
            decoded = mime.decode_text(_b64decode(str(data)), charset or None)
        except (binascii.Error, ValueError):
            continue
        if content_type == "text/plain" and not text:
            text = decoded
        elif content_type == "text/html" and not html:
            html = decoded
    return text, html


def _attachment_parts(payload: Mapping[str, Any]) -> Iterator[tuple[Mapping[str, Any], AttachmentInfo]]:
    for part, in_related in _leaves(payload):
        is_attachment, inline, filename, content_type, _ = _classify(part, in_related)
        part_id = str(part.get("partId", ""))
        if not is_attachment or not re.fullmatch(r"[0-9]{1,4}(\.[0-9]{1,4}){0,15}", part_id):
            continue
        content_id = _header(_headers_of(part), "Content-ID").strip().strip("<>")
        yield (
            part,
            AttachmentInfo(
                id=part_id.replace(".", "-"),
                filename=filename,
                content_type=content_type,
                size_bytes=int((part.get("body") or {}).get("size", 0) or 0),
                inline=inline,
                content_id=mime.clean_text(content_id),
            ),
        )
