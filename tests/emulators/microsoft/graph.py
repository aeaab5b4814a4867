"""The Microsoft Graph v1.0 subset the broker uses, as the Graph reference pages for user, mailFolder, message,
attachment, sendMail and message: delta describe it, with OData shapes (``value``, ``@odata.context``,
``@odata.nextLink``, ``@odata.deltaLink``, ``@removed``) and Graph's error JSON.

    GET  /v1.0/me                                              User.Read
    GET  /v1.0/me/mailFolders[/{id}[/childFolders]]            Mail.ReadBasic or Mail.Read
    GET  /v1.0/me[/mailFolders/{id}]/messages                  $select $top $skip $orderby $search; @odata.nextLink
    GET  /v1.0/me/mailFolders/{id}/messages/delta              $select, Prefer: odata.maxpagesize; skip/delta tokens
    GET  /v1.0/me[/mailFolders/{id}]/messages/{id}             $select; body and bodyPreview need Mail.Read
    GET  /v1.0/me/messages/{id}/$value                         MIME (Mail.Read)
    GET  /v1.0/me/messages/{id}/attachments[/{id}[/$value]]    Mail.Read
    POST /v1.0/me/sendMail                                     JSON or base64 MIME (text/plain); Mail.Send; 202

``/users/{id or userPrincipalName}`` works for the signed-in user's own mailbox only. Folder and message ids may
also be written the OData way, ``mailFolders('id')``, as Graph's own next and delta links are.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import json
import re
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any
from urllib.parse import quote, unquote, urlencode

from tests.emulators.microsoft import errors, render
from tests.emulators.microsoft.errors import GraphError
from tests.emulators.microsoft.mailbox import Folder, Mailbox, Message
from tests.emulators.microsoft.state import GRAPH, AccessToken, MicrosoftState, SentMessage, User
from tests.emulators.microsoft.wire import Request, Response

JSON_TYPE = "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"
MESSAGE_TYPE = "microsoft.graph.message"
READ_BASIC = frozenset({GRAPH + "Mail.ReadBasic", GRAPH + "Mail.Read", GRAPH + "Mail.ReadWrite"})
READ = frozenset({GRAPH + "Mail.Read", GRAPH + "Mail.ReadWrite"})
SEND = frozenset({GRAPH + "Mail.Send"})
USER_READ = frozenset({GRAPH + "User.Read"})

# The message properties of Graph v1.0, in the order Graph returns them; the last two only when $select names them.
MESSAGE_PROPERTIES = (
    "createdDateTime", "lastModifiedDateTime", "changeKey", "categories", "receivedDateTime", "sentDateTime",
    "hasAttachments", "internetMessageId", "subject", "bodyPreview", "importance", "parentFolderId",
    "conversationId", "conversationIndex", "isDeliveryReceiptRequested", "isReadReceiptRequested", "isRead",
    "isDraft", "webLink", "inferenceClassification", "body", "sender", "from", "toRecipients", "ccRecipients",
    "bccRecipients", "replyTo", "flag", "uniqueBody", "internetMessageHeaders",
)  # fmt: skip
_SELECT_ONLY = {"uniqueBody", "internetMessageHeaders"}
# Mail.ReadBasic: "except for body, bodyPreview, uniqueBody, attachments, extensions, and any extended properties".
_NEEDS_READ = {"body", "bodyPreview", "uniqueBody"}
FOLDER_PROPERTIES = (
    "displayName", "parentFolderId", "childFolderCount", "unreadItemCount", "totalItemCount", "isHidden",
)  # fmt: skip
# The attachment base type's properties (the attachment resource). What a derived type adds (fileAttachment's
# contentId, ...) is selected through a type-cast segment, ``microsoft.graph.fileAttachment/contentId``: OData URL
# Conventions, $select ("The select item MUST be prefixed with a qualified structured type name in order to select a
# property defined on a type derived from the type of the resource segment"). Graph refuses a plain ``contentId`` with
# "Could not find a property named 'contentId' on type 'microsoft.graph.attachment'".
ATTACHMENT_TYPE = "microsoft.graph.attachment"
ATTACHMENT_PROPERTIES = ("lastModifiedDateTime", "name", "contentType", "size", "isInline")
DERIVED_ATTACHMENT_PROPERTIES = {
    "microsoft.graph.fileAttachment": ("contentId", "contentLocation", "contentBytes"),
    "microsoft.graph.itemAttachment": (),  # its item is a navigation property ($expand), not a $select
    "microsoft.graph.referenceAttachment": (),
}
_ORDERABLE = {"receiveddatetime": "receivedDateTime", "sentdatetime": "sentDateTime", "subject": "subject",
              "lastmodifieddatetime": "lastModifiedDateTime"}  # fmt: skip
MAX_TOP = 1000
DEFAULT_TOP = 10
DELTA_PAGE = 10
_SEGMENT = re.compile(r"(?P<name>[^(]+)\('(?P<key>[^']*)'\)$")


@dataclass
class Call:
    """One Graph request, authenticated."""

    state: MicrosoftState
    request: Request
    base_url: str
    token: AccessToken
    user: User
    prefer: dict[str, str]
    applied: list[str]

    @property
    def mailbox(self) -> Mailbox:
        return self.user.mailbox

    def require(self, accepted: frozenset[str], denied: GraphError | None = None) -> None:
        if not self.token.scopes & accepted:
            raise denied or errors.access_denied()

    @property
    def can_read(self) -> bool:
        return bool(self.token.scopes & READ)

    @property
    def immutable_ids(self) -> bool:
        wanted = self.prefer.get("idtype", "").strip('"').lower() == "immutableid"
        if wanted and 'IdType="ImmutableId"' not in self.applied:
            self.applied.append('IdType="ImmutableId"')
        return wanted

    def context(self, tail: str) -> str:
        return f"{self.base_url}/v1.0/$metadata#users('{quote(self.user.oid)}')/{tail}"


@dataclass
class DeltaState:
    """What a skip or delta token stands for."""

    folder_id: str
    select: tuple[str, ...] | None
    generation: int
    since: int  # the change sequence the round reports from (-1: initial round)
    upto: int  # the sequence at the round's start: the next deltaLink's "since"
    entries: list[tuple[str, str, str]]  # (kind, id in the folder, immutable id): kind upsert/changed/deleted
    offset: int


def _json(status: int, value: Any, call: Call | None = None, headers: dict[str, str] | None = None) -> Response:
    merged = {"Content-Type": JSON_TYPE, "OData-Version": "4.0", **(headers or {})}
    if call is not None and call.applied:
        merged["Preference-Applied"] = ", ".join(call.applied)
    return Response(status, json.dumps(value, indent=2).encode("utf-8"), merged, value)


def _prefer(request: Request) -> dict[str, str]:
    out = {}
    for item in (request.header("prefer") or "").split(","):
        key, _, value = item.strip().partition("=")
        if key:
            out[key.strip().lower()] = value.strip()
    return out


def _segments(path: str) -> list[str]:
    out: list[str] = []
    for raw in path.strip("/").split("/"):
        segment = unquote(raw)
        match = _SEGMENT.fullmatch(segment)
        if match:
            out += [match["name"], match["key"]]
        else:
            out.append(segment)
    return out


# The names _route gives the endpoints it serves (counted as graph.<name>; a test can fault one by name).
ENDPOINTS = frozenset(
    {
        "user.get",
        "user.sendMail",
        "mailFolder.list",
        "mailFolder.get",
        "mailFolder.childFolders",
        "message.list",
        "message.delta",
        "message.get",
        "message.mime",
        "attachment.list",
        "attachment.get",
        "attachment.value",
    }
)


# ---- entry point ------------------------------------------------------------------------------------------------


def dispatch(state: MicrosoftState, request: Request, base_url: str) -> Response:
    request_id = str(uuid.uuid4())
    client_request_id = request.header("client-request-id") or request_id
    ids = {"request-id": request_id, "client-request-id": client_request_id}
    name = "unrouted"
    key: tuple[str, str] | None = None
    try:
        with state.lock:
            call = _authenticate(state, request, base_url)
            name, handler = _route(call)
            state.counters[f"graph.{name}"] += 1
            _take_throttle(state, call.user.email, name)
        key = (call.token.grant.client_id, call.user.email)
        with state.flight:
            if state.in_flight[key] >= state.policy.mailbox_concurrency:
                key = None
                status, code, message = errors.MAILBOX_CONCURRENCY
                raise GraphError(status, code, message, {"Retry-After": str(state.policy.concurrency_retry_after)})
            state.in_flight[key] += 1
            state.flight.notify_all()
            gate = state.gate
        if gate is not None:
            gate.wait(timeout=30)
        with state.lock:
            response = handler()
    except GraphError as exc:
        with state.lock:
            state.counters[f"graph.error.{exc.status}"] += 1
            state.counters[f"graph.error.{exc.code}"] += 1
            if exc.status in (429, 503, 504):
                state.counters["graph.throttled"] += 1
        if exc.html is not None:
            response = Response(
                exc.status, exc.html.encode(), {"Content-Type": "text/html; charset=utf-8", **exc.headers}
            )
        else:
            response = _json(exc.status, exc.body(request_id, client_request_id), headers=exc.headers)
    finally:
        if key is not None:
            with state.flight:
                state.in_flight[key] -= 1
                state.flight.notify_all()
    response.headers.update(ids)
    return response


def _authenticate(state: MicrosoftState, request: Request, base_url: str) -> Call:
    scheme, _, value = (request.header("authorization") or "").partition(" ")
    if not value:
        raise errors.invalid_token("Access token is empty.")
    if scheme.lower() != "bearer":
        raise errors.invalid_token("Access token validation failure. Invalid audience.")
    record = state.access_token(value)
    if record is None:
        if value in state.access_tokens:
            raise errors.invalid_token("Lifetime validation failed, the token is expired.")
        raise errors.invalid_token("IDX14100: JWT is not well formed, there are no dots (.).")
    return Call(state, request, base_url, record, state.users[record.grant.user], _prefer(request), [])


def _take_throttle(state: MicrosoftState, user: str, endpoint: str) -> None:
    for index, throttle in enumerate(state.throttles):
        if throttle.user is not None and throttle.user != user:
            continue
        if throttle.endpoints and endpoint not in throttle.endpoints:
            continue
        throttle.remaining -= 1
        if throttle.remaining <= 0:
            state.throttles.pop(index)
        headers = {"Retry-After": str(throttle.retry_after)} if throttle.retry_after is not None else {}
        raise GraphError(throttle.status, throttle.code, throttle.message, headers, throttle.details, throttle.html)


def _route(call: Call) -> tuple[str, Callable[[], Response]]:
    request = call.request
    parts = _segments(request.path)
    if not parts or parts[0] != "v1.0":
        raise errors.bad_request("Invalid version.")
    parts = parts[1:]
    if parts[:1] == ["me"]:
        parts = parts[1:]
    elif len(parts) >= 2 and parts[0].lower() == "users":
        if parts[1].lower() not in (call.user.oid, call.user.email.lower()):
            raise errors.access_denied()
        parts = parts[2:]
    else:
        raise errors.bad_request(f"Resource not found for the segment '{parts[0] if parts else ''}'.")
    lowered = [p.lower() for p in parts]
    method = request.method

    def only(allowed: str, name: str, handler: Callable[[], Response]) -> tuple[str, Callable[[], Response]]:
        if method != allowed:
            raise GraphError(405, "Request_BadRequest", "Specified HTTP method is not allowed for the request target.")
        return name, handler

    if not parts:
        return only("GET", "user.get", lambda: _me(call))
    if lowered == ["sendmail"]:
        return only("POST", "user.sendMail", lambda: _send_mail(call))
    folder: str | None = None
    rest = lowered
    if lowered[0] == "mailfolders":
        if len(parts) == 1:
            return only("GET", "mailFolder.list", lambda: _folders(call, None))
        folder = parts[1]
        rest = lowered[2:]
        if not rest:
            return only("GET", "mailFolder.get", lambda: _folder(call, parts[1]))
        if rest == ["childfolders"]:
            return only("GET", "mailFolder.childFolders", lambda: _folders(call, parts[1]))
        if rest[0] != "messages":
            raise errors.bad_request(f"Resource not found for the segment '{parts[2]}'.")
        parts = parts[2:]
    if rest[0] != "messages":
        raise errors.bad_request(f"Resource not found for the segment '{parts[0]}'.")
    tail, tail_lower = parts[1:], rest[1:]
    if not tail:
        return only("GET", "message.list", lambda: _list_messages(call, folder))
    if tail_lower[0] in ("delta", "delta()", "microsoft.graph.delta", "microsoft.graph.delta()"):
        if folder is None or len(tail) > 1:
            raise errors.bad_request("Delta is supported per folder: /me/mailFolders/{id}/messages/delta.")
        return only("GET", "message.delta", lambda: _delta(call, folder))
    message_id = tail[0]
    if len(tail) == 1:
        return only("GET", "message.get", lambda: _get_message(call, folder, message_id))
    if tail_lower[1:] == ["$value"]:
        return only("GET", "message.mime", lambda: _message_mime(call, folder, message_id))
    if tail_lower[1] == "attachments":
        if len(tail) == 2:
            return only("GET", "attachment.list", lambda: _attachments(call, folder, message_id, None, False))
        if len(tail) == 3:
            return only("GET", "attachment.get", lambda: _attachments(call, folder, message_id, tail[2], False))
        if len(tail) == 4 and tail_lower[3] == "$value":
            return only("GET", "attachment.value", lambda: _attachments(call, folder, message_id, tail[2], True))
    raise errors.bad_request(f"Resource not found for the segment '{tail[-1]}'.")


# ---- query options ----------------------------------------------------------------------------------------------


def _options(call: Call, allowed: set[str]) -> dict[str, str]:
    out = {}
    for name, values in call.request.query.items():
        if not name.startswith("$"):
            continue
        lowered = name.lower()
        if lowered not in allowed:
            if lowered in ("$filter", "$search", "$expand", "$count", "$format"):
                raise errors.not_implemented(f"query option {name}")
            raise errors.bad_request(f"Query option '{name.lstrip('$')}' is not allowed.")
        if len(values) != 1:
            raise errors.bad_request(f"Query option '{name}' was specified more than once.")
        out[lowered] = values[0]
    return out


def _select(text: str | None, known: tuple[str, ...], type_name: str) -> tuple[str, ...] | None:
    if text is None:
        return None
    by_lower = {p.lower(): p for p in known}
    chosen: list[str] = []
    for item in text.split(","):
        name = item.strip()
        if name.lower() == "id":
            continue
        if name.lower() not in by_lower:
            raise errors.unknown_property(name, type_name)
        canonical = by_lower[name.lower()]
        if canonical not in chosen:
            chosen.append(canonical)
    return tuple(chosen)


def _attachment_select(text: str | None) -> dict[str, tuple[str, ...]] | None:
    """The properties an attachment $select names, by the type they belong to (``ATTACHMENT_TYPE`` for the base
    type's, a derived type's through its type cast)."""
    if text is None:
        return None
    known = {ATTACHMENT_TYPE: ATTACHMENT_PROPERTIES, **DERIVED_ATTACHMENT_PROPERTIES}
    types = {name.lower(): name for name in known}
    chosen: dict[str, list[str]] = {}
    for item in text.split(","):
        cast, slash, name = item.strip().rpartition("/")
        type_name = ATTACHMENT_TYPE
        if slash:
            if cast.lower() not in types:
                raise errors.bad_request(
                    f"The type '{cast}' is not derived from '{ATTACHMENT_TYPE}'.", "RequestBroker--ParseUri"
                )
            type_name = types[cast.lower()]
        if name.lower() == "id":
            continue
        # A derived type has the base type's properties too.
        by_lower = {p.lower(): p for p in (*ATTACHMENT_PROPERTIES, *known[type_name])}
        if name.lower() not in by_lower:
            raise errors.unknown_property(name, type_name)
        canonical = by_lower[name.lower()]
        owner = ATTACHMENT_TYPE if canonical in ATTACHMENT_PROPERTIES else type_name
        if canonical not in chosen.setdefault(owner, []):
            chosen[owner].append(canonical)
    return {owner: tuple(names) for owner, names in chosen.items()}


def _int_option(options: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    if name not in options:
        return default
    value = options[name]
    if not value.isdigit() or not low <= int(value) <= high:
        raise errors.bad_request(f"Invalid value '{value}' for query option '{name}'.", "ErrorInvalidUrlQuery")
    return int(value)


# ---- user and folders -------------------------------------------------------------------------------------------


def _me(call: Call) -> Response:
    call.require(
        USER_READ,
        GraphError(403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation."),
    )
    user = call.user
    given, _, surname = user.display_name.partition(" ")
    body = {
        "@odata.context": f"{call.base_url}/v1.0/$metadata#users/$entity",
        "businessPhones": [],
        "displayName": user.display_name,
        "givenName": given,
        "jobTitle": None,
        "mail": user.email,
        "mobilePhone": None,
        "officeLocation": None,
        "preferredLanguage": None,
        "surname": surname or None,
        "userPrincipalName": user.email,
        "id": user.oid,
    }
    return _json(200, body, call)


def _folder_resource(mailbox: Mailbox, folder: Folder, select: tuple[str, ...] | None) -> dict[str, Any]:
    total, unread = mailbox.counts(folder.id)
    full = {
        "displayName": folder.display_name,
        "parentFolderId": folder.parent_id,
        "childFolderCount": len(mailbox.children(folder.id)),
        "unreadItemCount": unread,
        "totalItemCount": total,
        "isHidden": folder.is_hidden,
    }
    return {"id": folder.id, **{k: v for k, v in full.items() if select is None or k in select}}


def _folders(call: Call, parent: str | None) -> Response:
    call.require(READ_BASIC)
    options = _options(call, {"$select", "$top", "$skip"})
    select = _select(options.get("$select"), FOLDER_PROPERTIES, "microsoft.graph.mailFolder")
    top = _int_option(options, "$top", DEFAULT_TOP, 1, MAX_TOP)
    skip = _int_option(options, "$skip", 0, 0, 10**9)
    mailbox = call.mailbox
    parent_folder = mailbox.folder(parent) if parent is not None else mailbox.root
    children = [f for f in mailbox.children(parent_folder.id) if not f.is_hidden]
    page = children[skip : skip + top]
    tail = "mailFolders" if parent is None else f"mailFolders('{parent_folder.id}')/childFolders"
    body: dict[str, Any] = {"@odata.context": call.context(tail)}
    body["value"] = [_folder_resource(mailbox, f, select) for f in page]
    if skip + top < len(children):
        body["@odata.nextLink"] = _link(call, {**options, "$skip": str(skip + top)})
    return _json(200, body, call)


def _folder(call: Call, folder_id: str) -> Response:
    call.require(READ_BASIC)
    options = _options(call, {"$select"})
    select = _select(options.get("$select"), FOLDER_PROPERTIES, "microsoft.graph.mailFolder")
    folder = call.mailbox.folder(folder_id)
    body = {"@odata.context": call.context("mailFolders/$entity"), **_folder_resource(call.mailbox, folder, select)}
    return _json(200, body, call)


def _link(call: Call, options: dict[str, str], path: str | None = None) -> str:
    return f"{call.base_url}{path or call.request.path}?{urlencode(options, safe='$,')}"


# ---- messages ---------------------------------------------------------------------------------------------------


def _check_select_scopes(call: Call, select: tuple[str, ...] | None) -> None:
    if select is not None and not call.can_read and set(select) & _NEEDS_READ:
        raise errors.access_denied()


def message_resource(call: Call, message: Message, select: tuple[str, ...] | None) -> dict[str, Any]:
    parsed = message.parsed
    mailbox = call.mailbox
    wanted = [p for p in MESSAGE_PROPERTIES if (p in select if select is not None else p not in _SELECT_ONLY)]
    if not call.can_read:
        wanted = [p for p in wanted if p not in _NEEDS_READ]
    content_type = "text" if call.prefer.get("outlook.body-content-type", "").strip('"') == "text" else "html"
    if "body" in wanted and content_type == "text":
        applied = 'outlook.body-content-type="text"'
        if applied not in call.applied:
            call.applied.append(applied)
    sender = render.recipients(parsed, "Sender") or render.recipients(parsed, "From")
    from_ = render.recipients(parsed, "From")
    folder = mailbox.folders[message.folder_id]
    message_id = message.immutable_id if call.immutable_ids else message.id
    values: dict[str, Callable[[], Any]] = {
        "createdDateTime": lambda: render.iso(message.created),
        "lastModifiedDateTime": lambda: render.iso(message.modified),
        "changeKey": lambda: message.change_key,
        "categories": lambda: [],
        "receivedDateTime": lambda: render.iso(message.received),
        "sentDateTime": lambda: render.iso(render.sent_time(parsed, message.received)),
        "hasAttachments": lambda: any(not a.is_inline for a in message.attachments),
        "internetMessageId": lambda: str(parsed.get("Message-ID", "")).strip() or None,
        "subject": lambda: str(parsed.get("Subject", "")),
        "bodyPreview": lambda: render.preview(parsed),
        "importance": lambda: "normal",
        "parentFolderId": lambda: folder.id,
        "conversationId": lambda: message.conversation_id,
        "conversationIndex": lambda: base64.b64encode(message.conversation_id.encode()[:22]).decode(),
        "isDeliveryReceiptRequested": lambda: False,
        "isReadReceiptRequested": lambda: "Disposition-Notification-To" in parsed,
        "isRead": lambda: message.is_read,
        "isDraft": lambda: folder.well_known == "drafts",
        "webLink": lambda: (
            f"https://outlook.office365.com/owa/?ItemID={quote(message.id, safe='')}"
            "&exvsurl=1&viewmodel=ReadMessageItem"
        ),
        "inferenceClassification": lambda: "focused",
        "body": lambda: render.body(parsed, content_type),
        "uniqueBody": lambda: render.body(parsed, content_type),
        "sender": lambda: sender[0] if sender else None,
        "from": lambda: from_[0] if from_ else None,
        "toRecipients": lambda: render.recipients(parsed, "To"),
        "ccRecipients": lambda: render.recipients(parsed, "Cc"),
        "bccRecipients": lambda: render.recipients(parsed, "Bcc"),
        "replyTo": lambda: render.recipients(parsed, "Reply-To"),
        "flag": lambda: {"flagStatus": message.flag_status},
        "internetMessageHeaders": lambda: render.internet_headers(parsed),
    }
    out: dict[str, Any] = {"@odata.etag": f'W/"{message.change_key}"', "id": message_id}
    for name in wanted:
        out[name] = values[name]()
    return out


def _sort_key(message: Message, field: str) -> Any:
    if field == "receivedDateTime":
        return message.received
    if field == "sentDateTime":
        return render.sent_time(message.parsed, message.received)
    if field == "lastModifiedDateTime":
        return message.modified
    return str(message.parsed.get("Subject", "")).lower()


def _order(text: str | None) -> tuple[str, bool]:
    if text is None:
        return "receivedDateTime", True
    words = text.split()
    if not 1 <= len(words) <= 2 or words[0].lower() not in _ORDERABLE:
        if words and "," in text:
            raise errors.not_implemented("$orderby on more than one property")
        raise errors.unknown_property(words[0] if words else text, MESSAGE_TYPE)
    direction = words[1].lower() if len(words) == 2 else "asc"
    if direction not in ("asc", "desc"):
        raise errors.bad_request(f"Invalid $orderby direction '{words[1]}'.", "ErrorInvalidUrlQuery")
    return _ORDERABLE[words[0].lower()], direction == "desc"


# ---- $search ------------------------------------------------------------------------------------------------------
# The "Use the $search query parameter" page, messages: a value without a property searches the default properties
# from, subject and body; KQL property names restrict it (the subset below); results are sorted by the date and time
# the message was sent, newest first, at most 1,000 of them. Graph refuses $orderby with $search (SearchWithOrderBy).
# Mail.ReadBasic "does not include permissions to search messages" (Graph permissions reference).
# Terms follow OData's search expressions (URL Conventions, $search): a phrase in double quotes (the next double
# quote ends it; no escapes are emulated) or a bare word; terms side by side must all match. A phrase may start
# with a property name, as Graph's examples do ($search="subject:has"). AND, OR, NOT, groups, single-quoted
# expressions and the other KQL properties are not emulated (501).

SEARCH_LIMIT = 1000
_SEARCH_DEFAULT = ("from", "subject", "body")
_SEARCH_PROPERTIES = {
    "from": ("from",),
    "subject": ("subject",),
    "body": ("body",),
    "to": ("to",),
    "cc": ("cc",),
    "bcc": ("bcc",),
    "participants": ("from", "to", "cc", "bcc"),
    "recipients": ("to", "cc", "bcc"),
}
_KQL_OTHER = {"attachment", "hasattachment", "hasattachments", "importance", "kind", "received", "sent", "size"}
_KQL_PROPERTY = re.compile(r"(?P<name>[A-Za-z]+):(?P<value>.*)", re.DOTALL)
_WORD = re.compile(r"\w+")


def _search_syntax(message: str) -> GraphError:
    return errors.bad_request(f"Syntax error: {message} in the $search query.", "BadRequest")


def _search_terms(text: str) -> list[str]:
    """The terms of a $search value: quoted phrases (without their quotes) and bare words."""
    terms: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char.isspace():
            index += 1
            continue
        if char == '"':
            phrase: list[str] = []
            index += 1
            while True:
                if index >= len(text):
                    raise _search_syntax("a phrase is not closed")
                char = text[index]
                index += 1
                if char == '"':
                    break
                phrase.append(char)
            if index < len(text) and not text[index].isspace():
                raise _search_syntax("a phrase runs into what follows it")
            terms.append("".join(phrase))
            continue
        end = index
        while end < len(text) and not text[end].isspace():
            end += 1
        word = text[index:end]
        index = end
        if '"' in word:
            raise _search_syntax("a word holds a double quote")
        if word in ("AND", "OR", "NOT") or "(" in word or ")" in word:
            raise errors.not_implemented("$search with AND, OR, NOT or groups")
        terms.append(word)
    if not terms or not all(t.strip() for t in terms):
        raise _search_syntax("nothing to search for")
    return terms


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def _search_field(message: Message, name: str) -> str:
    parsed = message.parsed
    if name == "subject":
        return str(parsed.get("Subject", ""))
    if name == "body":
        return str(render.body(parsed, "text")["content"])
    header = {"from": "From", "to": "To", "cc": "Cc", "bcc": "Bcc"}[name]
    people = render.recipients(parsed, header)
    return " ".join(f"{p['emailAddress']['name']} {p['emailAddress']['address']}" for p in people)


def _term_matches(message: Message, term: str) -> bool:
    fields: tuple[str, ...] = _SEARCH_DEFAULT
    restricted = _KQL_PROPERTY.fullmatch(term)
    if restricted is not None:
        name = restricted["name"].lower()
        if name in _SEARCH_PROPERTIES:
            fields, term = _SEARCH_PROPERTIES[name], restricted["value"]
        elif name in _KQL_OTHER:
            raise errors.not_implemented(f"$search on the KQL property {name}")
    prefix = term.rstrip().endswith("*")  # KQL: a trailing * matches words that start with the term
    wanted = _tokens(term)
    if not wanted:
        return False
    for field in fields:
        have = _tokens(_search_field(message, field))
        for start in range(len(have) - len(wanted) + 1):
            window = have[start : start + len(wanted)]
            if window[:-1] == wanted[:-1] and (
                window[-1].startswith(wanted[-1]) if prefix else window[-1] == wanted[-1]
            ):
                return True
    return False


def _search(call: Call, messages: list[Message], text: str) -> list[Message]:
    call.require(READ)
    terms = _search_terms(text)
    found = [m for m in messages if all(_term_matches(m, t) for t in terms)]
    newest_first = sorted(
        enumerate(found),
        key=lambda pair: (render.sent_time(pair[1].parsed, pair[1].received), pair[1].received, pair[0]),
        reverse=True,
    )
    return [m for _, m in newest_first][:SEARCH_LIMIT]


def _list_messages(call: Call, folder_id: str | None) -> Response:
    call.require(READ_BASIC)
    options = _options(call, {"$select", "$top", "$skip", "$orderby", "$search"})
    if "$search" in options and "$orderby" in options:
        raise GraphError(400, "SearchWithOrderBy", "The query parameter '$orderBy' is not supported with '$search'.")
    select = _select(options.get("$select"), MESSAGE_PROPERTIES, MESSAGE_TYPE)
    _check_select_scopes(call, select)
    top = _int_option(options, "$top", DEFAULT_TOP, 1, MAX_TOP)
    skip = _int_option(options, "$skip", 0, 0, 10**9)
    field, descending = _order(options.get("$orderby"))
    mailbox = call.mailbox
    if folder_id is not None:
        folder = mailbox.folder(folder_id)
        messages = mailbox.in_folder(folder.id)
        tail = f"mailFolders('{folder.id}')/messages"
    else:
        messages = list(mailbox.messages.values())
        tail = "messages"
    if "$search" in options:
        ordered = _search(call, messages, options["$search"])
    else:
        ordered = sorted(messages, key=lambda m: (_sort_key(m, field), m.created), reverse=descending)
    page = ordered[skip : skip + top]
    if select is not None:
        tail += f"({','.join(select)})"
    body: dict[str, Any] = {"@odata.context": call.context(tail)}
    body["value"] = [message_resource(call, m, select) for m in page]
    if skip + top < len(ordered):
        body["@odata.nextLink"] = _link(call, {**options, "$top": str(top), "$skip": str(skip + top)})
    return _json(200, body, call)


def _message_in(call: Call, folder_id: str | None, message_id: str) -> Message:
    message = call.mailbox.get(message_id)
    if folder_id is not None and call.mailbox.folder(folder_id).id != message.folder_id:
        raise errors.not_found()
    return message


def _get_message(call: Call, folder_id: str | None, message_id: str) -> Response:
    call.require(READ_BASIC)
    options = _options(call, {"$select"})
    select = _select(options.get("$select"), MESSAGE_PROPERTIES, MESSAGE_TYPE)
    _check_select_scopes(call, select)
    message = _message_in(call, folder_id, message_id)
    body = {"@odata.context": call.context("messages/$entity"), **message_resource(call, message, select)}
    return _json(200, body, call)


def _message_mime(call: Call, folder_id: str | None, message_id: str) -> Response:
    call.require(READ)
    message = _message_in(call, folder_id, message_id)
    return Response(200, message.raw, {"Content-Type": "text/plain"})


def _attachments(call: Call, folder_id: str | None, message_id: str, attachment_id: str | None, raw: bool) -> Response:
    call.require(READ)
    options = _options(call, set() if raw else {"$select"})
    select = _attachment_select(options.get("$select"))
    message = _message_in(call, folder_id, message_id)

    def shape(resource: dict[str, Any]) -> dict[str, Any]:
        if select is None:
            return resource
        own_type = str(resource.get("@odata.type", "")).lstrip("#")
        keep = {"@odata.type", "@odata.mediaContentType", "id", *select.get(ATTACHMENT_TYPE, ())}
        keep.update(select.get(own_type, ()))  # a cast selects from the attachments of that type only
        return {k: v for k, v in resource.items() if k in keep}

    if attachment_id is None:
        body = {
            "@odata.context": call.context(f"messages('{message.id}')/attachments"),
            "value": [shape(render.file_attachment(a, message.modified)) for a in message.attachments],
        }
        return _json(200, body, call)
    Mailbox.check_id(attachment_id)
    found = next((a for a in message.attachments if a.id == attachment_id), None)
    if found is None:
        raise errors.not_found()
    if raw:
        content_type = "message/rfc822" if found.kind == "item" else found.content_type
        return Response(200, found.content, {"Content-Type": content_type})
    body = {
        "@odata.context": call.context(f"messages('{message.id}')/attachments/$entity"),
        **shape(render.file_attachment(found, message.modified)),
    }
    return _json(200, body, call)


# ---- delta ------------------------------------------------------------------------------------------------------


def _delta(call: Call, folder_id: str) -> Response:
    call.require(READ_BASIC)
    mailbox = call.mailbox
    folder = mailbox.folder(folder_id)
    tokens: dict[str, DeltaState] = call.state.delta_tokens
    options = _options(call, {"$select", "$skiptoken", "$deltatoken"})
    token = options.get("$skiptoken") or options.get("$deltatoken")
    path = f"/v1.0/me/mailFolders('{quote(folder.id, safe='')}')/messages/delta"
    if token is not None:
        delta = tokens.get(token)
        if delta is None or delta.folder_id != folder.id or delta.generation != mailbox.sync_generation:
            fresh = {"$select": ",".join(delta.select)} if delta is not None and delta.select else {}
            location = f"{call.base_url}{path}" + (f"?{urlencode(fresh, safe='$,')}" if fresh else "")
            message = (
                "The sync state generation is not found. The delta token is expired and data must be synchronized "
                "again."
                if mailbox.expired_code == "syncStateNotFound"
                else "A full resync is required."
            )
            raise GraphError(410, mailbox.expired_code, message, {"Location": location})
        if "$skiptoken" in options:
            del tokens[token]  # a skip token is for one page
        if delta.offset == 0 and "$deltatoken" in options:
            changes = mailbox.changes_since(folder.id, delta.since)
            delta = DeltaState(
                folder.id, delta.select, mailbox.sync_generation, delta.since, mailbox.seq,
                [(c.kind, c.message_id, c.immutable_id) for c in changes], 0,
            )  # fmt: skip
    else:
        select = _select(options.get("$select"), MESSAGE_PROPERTIES, MESSAGE_TYPE)
        entries = [
            ("upsert", m.id, m.immutable_id)
            for m in sorted(mailbox.in_folder(folder.id), key=lambda m: m.received, reverse=True)
        ]
        delta = DeltaState(folder.id, select, mailbox.sync_generation, -1, mailbox.seq, entries, 0)
    _check_select_scopes(call, delta.select)
    page_size = DELTA_PAGE
    wanted = call.prefer.get("odata.maxpagesize")
    if wanted is not None and wanted.isdigit() and int(wanted) > 0:
        page_size = int(wanted)
        call.applied.append(f"odata.maxpagesize={page_size}")
    page = delta.entries[delta.offset : delta.offset + page_size]
    value = []
    by_immutable = {m.immutable_id: m for m in mailbox.in_folder(folder.id)}
    for kind, message_id, immutable_id in page:
        if kind == "upsert":
            message = by_immutable.get(immutable_id)
            if message is None:
                continue  # gone since the round began: the next round reports it
            value.append({"@odata.type": "#microsoft.graph.message", **message_resource(call, message, delta.select)})
        else:
            shown = immutable_id if call.immutable_ids else message_id
            value.append({"@odata.type": "#microsoft.graph.message", "id": shown, "@removed": {"reason": kind}})
    body: dict[str, Any] = {"@odata.context": f"{call.base_url}/v1.0/$metadata#Collection(message)", "value": value}
    new_token = secrets.token_urlsafe(24)
    if delta.offset + page_size < len(delta.entries):
        tokens[new_token] = DeltaState(
            delta.folder_id, delta.select, delta.generation, delta.since, delta.upto, delta.entries,
            delta.offset + page_size,
        )  # fmt: skip
        body["@odata.nextLink"] = f"{call.base_url}{path}?$skiptoken={new_token}"
    else:
        tokens[new_token] = DeltaState(delta.folder_id, delta.select, delta.generation, delta.upto, delta.upto, [], 0)
        body["@odata.deltaLink"] = f"{call.base_url}{path}?$deltatoken={new_token}"
    return _json(200, body, call)


# ---- sendMail ---------------------------------------------------------------------------------------------------

_MESSAGE_FIELDS = {
    "subject", "body", "toRecipients", "ccRecipients", "bccRecipients", "replyTo", "attachments",
    "internetMessageHeaders", "importance", "from", "sender", "isReadReceiptRequested", "isDeliveryReceiptRequested",
}  # fmt: skip


def _send_mail(call: Call) -> Response:
    call.require(SEND)
    content_type = (call.request.header("content-type") or "").split(";")[0].strip().lower()
    if content_type == "text/plain":
        message, recipients, save = _mime_message(call), None, True
        kind = "mime"
    elif content_type == "application/json":
        message, save = _json_message(call)
        recipients = None
        kind = "json"
    else:
        raise GraphError(415, "UnsupportedMediaType", "The content type is not supported: use application/json or "
                         "text/plain (base64 MIME).")  # fmt: skip
    addresses = [
        address
        for _, address in email.utils.getaddresses(
            [str(v) for h in ("To", "Cc", "Bcc") for v in message.get_all(h, [])]
        )
        if address
    ]
    recipients = tuple(dict.fromkeys(addresses))
    if not recipients:
        raise GraphError(400, "ErrorInvalidRecipients", "At least one recipient isn't valid., A message can't be sent "
                         "because it contains no recipients.")  # fmt: skip
    for _, address in email.utils.getaddresses([str(v) for v in message.get_all("From", [])]):
        if address.lower() != call.user.email.lower():
            raise GraphError(403, "ErrorSendAsDenied", "The user account which was used to submit this request does "
                             "not have the right to send mail on behalf of the specified sending account.")  # fmt: skip
    if "From" not in message:
        message["From"] = email.utils.formataddr((call.user.display_name, call.user.email))
    if "Date" not in message:
        message["Date"] = email.utils.formatdate(call.state.clock.now())
    if "Message-ID" not in message:
        message["Message-ID"] = f"<{secrets.token_hex(16)}@emulator.prod.outlook.com>"
    stored = message.as_bytes()
    del message["Bcc"]
    transmitted = message.as_bytes()
    state = call.state
    now = state.clock.now()
    if save:
        call.mailbox.insert(stored, "sentitems", now, is_read=True)
    for address in recipients:
        recipient = state.users.get(address.lower()) or state.users.get(address)
        if recipient is not None:
            recipient.mailbox.insert(transmitted, "inbox", now)
    state.sent.append(SentMessage(call.user.email, transmitted, recipients, save, kind))
    state.counters["graph.sent"] += 1
    return Response(202, b"", {"Content-Length": "0"})


def _mime_message(call: Call) -> EmailMessage:
    text = call.request.body.decode("ascii", "replace").strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise GraphError(
            400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content."
        ) from None
    if not raw.strip():
        raise GraphError(400, "ErrorMimeContentInvalid", "The MIME content is invalid.")
    message = render.parse(raw)
    if not message.keys():
        raise GraphError(400, "ErrorMimeContentInvalid", "The MIME content is invalid.")
    return message


def _addresses(field: str, value: Any) -> list[str]:
    if not isinstance(value, list):
        raise errors.bad_request(f"Invalid value for '{field}'.", "RequestBodyRead")
    out = []
    for item in value:
        address = (item or {}).get("emailAddress", {}) if isinstance(item, dict) else {}
        if not isinstance(address, dict) or not address.get("address"):
            raise GraphError(400, "ErrorInvalidRecipients", "At least one recipient isn't valid.")
        out.append(email.utils.formataddr((str(address.get("name") or ""), str(address["address"]))))
    return out


def _clean(value: str) -> str:
    # Header values travel in JSON: Exchange folds line breaks away rather than letting them start a header.
    return re.sub(r"[\r\n]+", " ", value)


def _json_message(call: Call) -> tuple[EmailMessage, bool]:
    try:
        payload = json.loads(call.request.body or b"null")
    except ValueError:
        raise errors.bad_request("Unable to read JSON request payload.", "RequestBodyRead") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("message"), dict):
        raise errors.bad_request("Empty Payload. JSON content expected.", "ErrorInvalidParameter")
    for name in payload:
        if name not in ("message", "saveToSentItems"):
            raise errors.bad_request(f"The property '{name}' does not exist on type 'microsoft.graph.sendMail'.",
                                     "RequestBodyRead")  # fmt: skip
    save = payload.get("saveToSentItems", True)
    if not isinstance(save, bool):
        raise errors.bad_request("Invalid value for 'saveToSentItems'.", "RequestBodyRead")
    fields = payload["message"]
    for name in fields:
        if name not in _MESSAGE_FIELDS:
            raise errors.bad_request(
                f"The property '{name}' does not exist on type 'microsoft.graph.message'. Make sure to only use "
                "property names that are defined by the type or mark the type as open type.",
                "RequestBodyRead",
            )
    message = EmailMessage()
    if "from" in fields:
        message["From"] = _addresses("from", [fields["from"]])[0]
    for field, header in (("toRecipients", "To"), ("ccRecipients", "Cc"), ("bccRecipients", "Bcc"),
                          ("replyTo", "Reply-To")):  # fmt: skip
        if fields.get(field):
            message[header] = ", ".join(_addresses(field, fields[field]))
    message["Subject"] = _clean(str(fields.get("subject") or ""))
    for header in fields.get("internetMessageHeaders") or []:
        name = str((header or {}).get("name", ""))
        if not name.lower().startswith("x-"):
            raise errors.bad_request(
                f"The internet message header name '{name}' should start with 'x-' or 'X-'.",
                "InvalidInternetMessageHeader",
            )
        message[name] = _clean(str(header.get("value", "")))
    body = fields.get("body") or {}
    content = str(body.get("content") or "")
    kind = str(body.get("contentType") or "text").lower()
    if kind not in ("text", "html"):
        raise errors.bad_request(f"Invalid body contentType '{kind}'.", "RequestBodyRead")
    message.set_content(content, subtype="html" if kind == "html" else "plain")
    for attachment in fields.get("attachments") or []:
        if attachment.get("@odata.type") != "#microsoft.graph.fileAttachment":
            raise errors.not_implemented("attachments other than #microsoft.graph.fileAttachment")
        try:
            data = base64.b64decode(str(attachment.get("contentBytes", "")), validate=True)
        except (binascii.Error, ValueError):
            raise errors.bad_request("Invalid contentBytes (base64 expected).", "RequestBodyRead") from None
        maintype, _, subtype = str(attachment.get("contentType") or "application/octet-stream").partition("/")
        message.add_attachment(
            data,
            maintype=maintype,
            subtype=subtype or "octet-stream",
            filename=str(attachment.get("name") or "attachment"),
            disposition="inline" if attachment.get("isInline") else "attachment",
            cid=f"<{attachment['contentId']}>" if attachment.get("contentId") else None,
        )
    return message, save
