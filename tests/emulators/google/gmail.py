"""The Gmail REST subset, routed by the discovery document google-api-python-client builds its URLs from.

Implemented: users.getProfile, users.labels.list, users.messages.list/get/send (JSON, uploadType=media and
uploadType=multipart), users.messages.attachments.get, users.history.list. Any other method of the document is
answered 501 (not implemented here), never with a made-up success.

Access control follows the reference: a Bearer access token (401 otherwise), one of the method's documented scopes
(403 insufficientPermissions otherwise), and the gmail.metadata restrictions — no ``q`` and no format=full/raw when
the token carries gmail.metadata, even beside a broader scope.
"""

from __future__ import annotations

import base64
import email.utils
import json
import re
import secrets
from collections.abc import Callable
from typing import Any

from tests.emulators.google import errors, fields, payload
from tests.emulators.google.discovery import Method, gmail_methods
from tests.emulators.google.errors import ApiError
from tests.emulators.google.mailbox import HISTORY_TYPES, Mailbox, StoredMessage, new_message_id_header, search_filter
from tests.emulators.google.state import AccessToken, GoogleState, SentMessage, User
from tests.emulators.google.wire import Request, Response

METADATA_SCOPE = "https://www.googleapis.com/auth/gmail.metadata"
MAX_PAGE = 500
MAX_UPLOAD = 36_700_160  # mediaUpload.maxSize of messages.send in the discovery document
# Query parameters every Google API takes ("system parameters").
_SYSTEM_PARAMETERS = {"alt", "key", "prettyPrint", "quotaUser", "$.xgafv", "callback", "upload_protocol", "uploadType"}


def dispatch(state: GoogleState, request: Request) -> Response:
    try:
        method, path_params, upload = _route(request)
        with state.lock:
            state.counters[method.id] += 1
            token = _authenticate(state, request)
            _apply_throttle(state, token)
            _apply_fault(state, token, method.id)
            _check_scopes(method, token)
            user = _resolve_user(state, token, path_params["userId"])
            params = _query_params(method, request)
            handler = _HANDLERS.get(method.id)
            if handler is None:
                raise errors.not_implemented(f"method {method.id}")
            selection = _fields(request, method)
            body = handler(state, _Call(request, user, token, params, path_params, upload))
            state.gmail_responses.append((method.id, method.response, body))
        return Response.json(200, fields.apply(body, selection))
    except ApiError as exc:
        with state.lock:
            state.counters[f"gmail.error.{exc.code}"] += 1
        if exc.html is not None:
            return Response(exc.code, exc.html.encode(), {"Content-Type": "text/html; charset=UTF-8", **exc.headers})
        return Response.json(exc.code, exc.body(), exc.headers)


class _Call:
    def __init__(
        self,
        request: Request,
        user: User,
        token: AccessToken,
        params: dict[str, Any],
        path: dict[str, str],
        upload: str | None,
    ) -> None:
        self.request = request
        self.user = user
        self.mailbox: Mailbox = user.mailbox
        self.token = token
        self.params = params
        self.path = path
        self.upload = upload


def _route(request: Request) -> tuple[Method, dict[str, str], str | None]:
    for method in gmail_methods():
        if method.http_method != request.method:
            continue
        match = method.pattern.fullmatch(request.path)
        if match:
            return method, match.groupdict(), None
        if method.upload_path is not None and (match := method.upload_path.fullmatch(request.path)):
            upload_type = request.one("uploadType")
            if upload_type not in ("media", "multipart"):
                raise errors.not_implemented(f"uploadType={upload_type}")
            return method, match.groupdict(), upload_type
    if request.path.startswith("/resumable/upload/"):
        raise errors.not_implemented("resumable uploads")
    raise errors.not_found()


def _authenticate(state: GoogleState, request: Request) -> AccessToken:
    scheme, _, value = (request.header("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not value:
        raise errors.unauthenticated("CREDENTIALS_MISSING")
    token = state.access_token(value.strip())
    if token is None:
        raise errors.unauthenticated("ACCESS_TOKEN_EXPIRED")
    return token


def _apply_throttle(state: GoogleState, token: AccessToken) -> None:
    for throttle in state.throttles:
        if throttle.user is None or throttle.user == token.grant.user:
            throttle.remaining -= 1
            if throttle.remaining <= 0:
                state.throttles.remove(throttle)
            state.counters["gmail.throttled"] += 1
            raise errors.fault(throttle.status, throttle.reason, throttle.retry_after)


def _apply_fault(state: GoogleState, token: AccessToken, method_id: str) -> None:
    for fault in state.api_faults:
        if (fault.user is None or fault.user == token.grant.user) and (not fault.methods or method_id in fault.methods):
            fault.remaining -= 1
            if fault.remaining <= 0:
                state.api_faults.remove(fault)
            state.counters["gmail.fault"] += 1
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            raise ApiError(
                fault.status,
                fault.message,
                reason=fault.reason,
                domain=fault.domain,
                error_info=fault.error_info,
                headers=headers,
                html=fault.html,
            )


def _check_scopes(method: Method, token: AccessToken) -> None:
    if not token.scopes & set(method.scopes):
        raise errors.insufficient_scopes(method.id, list(method.scopes))


def _resolve_user(state: GoogleState, token: AccessToken, user_id: str) -> User:
    owner = state.users[token.grant.user]
    if user_id == "me" or user_id.lower() == owner.email.lower():
        return owner
    # Google's message names the address; this one does not, so it cannot end up in a test failure message.
    raise errors.forbidden("Delegation denied for the requested user")


def _fields(request: Request, method: Method) -> fields.Selection | None:
    values = request.query.get("fields")
    if not values:
        return None
    selection = fields.parse(",".join(values))
    fields.check(selection, {"$ref": method.response} if method.response else {})
    return selection


def _query_params(method: Method, request: Request) -> dict[str, Any]:
    """Type-check the query against the method's documented parameters; refuse unknown names as Google does."""
    out: dict[str, Any] = {}
    for name, values in request.query.items():
        if name in _SYSTEM_PARAMETERS:
            if name == "alt" and values != ["json"]:
                raise errors.bad_request("Only alt=json is served by these methods.", location="alt")
            continue
        if name == "fields":
            continue  # see _fields
        spec = method.parameters.get(name)
        if spec is None or spec.get("location") != "query":
            raise errors.invalid_argument(
                f'Invalid JSON payload received. Unknown name "{name}": Cannot bind query parameter. '
                f"Field '{name}' could not be found in request message."
            )
        if len(values) > 1 and not spec.get("repeated"):
            raise errors.invalid_argument(f"Parameter {name} given more than once.", location=name)
        converted = [_convert(name, value, spec) for value in values]
        out[name] = converted if spec.get("repeated") else converted[0]
    return out


def _convert(name: str, value: str, spec: dict[str, Any]) -> Any:
    kind = spec.get("type")
    if kind == "boolean":
        if value not in ("true", "false"):
            raise errors.invalid_argument(f"Invalid value at '{name}' (TYPE_BOOL), \"{value}\"", location=name)
        return value == "true"
    if kind == "integer":
        if not re.fullmatch(r"[0-9]{1,10}", value) or int(value) >= 2**32:
            raise errors.invalid_argument(f"Invalid value at '{name}' (TYPE_UINT32), \"{value}\"", location=name)
        return int(value)
    if spec.get("format") == "uint64" and not re.fullmatch(r"[0-9]{1,20}", value):
        raise errors.invalid_argument(f"Invalid value at '{name}' (TYPE_UINT64), \"{value}\"", location=name)
    if "enum" in spec and value not in spec["enum"]:
        raise errors.invalid_argument(f"Invalid value at '{name}', \"{value}\"", location=name)
    return value


def _page_size(call: _Call) -> int:
    size = call.params.get("maxResults", 100)
    if size > MAX_PAGE:
        raise errors.invalid_argument(f"maxResults may be at most {MAX_PAGE}", location="maxResults")
    return size or 100


def _paginate(state: GoogleState, call: _Call, items: list[Any], kind: str) -> tuple[list[Any], str | None]:
    """Slice ``items`` by the page token; tokens are opaque, bound to the user and to the rest of the query."""
    fingerprint = (
        kind,
        call.user.email,
        tuple(sorted((k, str(v)) for k, v in call.params.items() if k not in ("pageToken", "maxResults"))),
    )
    offset = 0
    if "pageToken" in call.params:
        saved = state.page_tokens.get(call.params["pageToken"])
        if saved is None or saved[0] != fingerprint:
            raise errors.invalid_argument("Invalid pageToken", location="pageToken")
        offset = saved[1]
    size = _page_size(call)
    page = items[offset : offset + size]
    next_token = None
    if offset + size < len(items):
        next_token = f"{secrets.randbelow(10**19):019d}"
        state.page_tokens[next_token] = (fingerprint, offset + size)
    return page, next_token


# ---- handlers ---------------------------------------------------------------------------------------------------


def _get_profile(state: GoogleState, call: _Call) -> dict[str, Any]:
    return {
        "emailAddress": call.user.email,
        "messagesTotal": len(call.mailbox.messages),
        "threadsTotal": call.mailbox.thread_count(),
        "historyId": str(call.mailbox.history_id),
    }


def _list_labels(state: GoogleState, call: _Call) -> dict[str, Any]:
    return {"labels": call.mailbox.labels()}


def _list_messages(state: GoogleState, call: _Call) -> dict[str, Any]:
    label_ids: list[str] = call.params.get("labelIds", [])
    query: str | None = call.params.get("q")
    if query is not None and METADATA_SCOPE in call.token.scopes:
        raise errors.forbidden("Metadata scope does not support 'q' parameter")
    call.mailbox.check_labels(label_ids)
    matches, reaches_spam_trash = search_filter(query or "", call.mailbox)
    include_spam_trash = call.params.get("includeSpamTrash", False) or reaches_spam_trash
    selected = [
        m
        for m in call.mailbox.newest_first()
        if all(label in m.label_ids for label in label_ids)
        and (include_spam_trash or set(label_ids) & {"SPAM", "TRASH"} or not {"SPAM", "TRASH"} & set(m.label_ids))
        and matches(m)
    ]
    page, next_token = _paginate(state, call, selected, "messages")
    body: dict[str, Any] = {}
    if page:
        body["messages"] = [m.ref() for m in page]
    if next_token:
        body["nextPageToken"] = next_token
    body["resultSizeEstimate"] = len(selected)
    return body


def _attachment_id(message: StoredMessage, part_id: str) -> str:
    return "ANGjdJ" + base64.urlsafe_b64encode(f"{message.id}:{part_id}".encode()).decode().rstrip("=")


def _get_message(state: GoogleState, call: _Call) -> dict[str, Any]:
    stored = call.mailbox.get(call.path["id"])
    fmt = call.params.get("format", "full")
    if fmt in ("full", "raw") and METADATA_SCOPE in call.token.scopes:
        raise errors.forbidden(f"Metadata scope doesn't allow format {fmt.upper()}")
    return message_resource(stored, fmt, call.params.get("metadataHeaders"), METADATA_SCOPE not in call.token.scopes)


def message_resource(
    stored: StoredMessage, fmt: str, metadata_headers: list[str] | None = None, with_snippet: bool = True
) -> dict[str, Any]:
    body: dict[str, Any] = {"id": stored.id, "threadId": stored.thread_id}
    if stored.label_ids:
        body["labelIds"] = list(stored.label_ids)
    if with_snippet:  # left out under gmail.metadata, which grants no body content
        body["snippet"] = payload.snippet(stored.parsed)
    body["sizeEstimate"] = len(stored.raw)
    body["historyId"] = str(stored.history_id)
    body["internalDate"] = str(stored.internal_date_ms)
    if fmt == "metadata":
        headers = payload.headers_of(stored.parsed)
        if metadata_headers:
            wanted = {name.lower() for name in metadata_headers}
            headers = [h for h in headers if h["name"].lower() in wanted]
        body["payload"] = {"mimeType": stored.parsed.get_content_type(), "headers": headers}
    elif fmt == "full":
        body["payload"] = payload.part_tree(stored.parsed, "", lambda part_id: _attachment_id(stored, part_id))
    elif fmt == "raw":
        body["raw"] = payload.b64url(stored.raw)
    return body


def _get_attachment(state: GoogleState, call: _Call) -> dict[str, Any]:
    stored = call.mailbox.get(call.path["messageId"])
    attachment_id = call.path["id"]
    try:
        encoded = attachment_id.removeprefix("ANGjdJ")
        message_id, _, part_id = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode().partition(":")
    except ValueError:
        raise errors.invalid_argument("Invalid attachment token") from None
    data = payload.attachment_bytes(stored.parsed, part_id) if message_id == stored.id else None
    if data is None:
        raise errors.invalid_argument("Invalid attachment token")
    return {"size": len(data), "data": payload.b64url(data)}


def _list_history(state: GoogleState, call: _Call) -> dict[str, Any]:
    mailbox = call.mailbox
    start_text = call.params.get("startHistoryId")
    if start_text is None:
        raise errors.invalid_argument("startHistoryId is required", location="startHistoryId")
    start = int(start_text)
    if start < mailbox.oldest_valid_start:
        raise errors.not_found()
    types = set(call.params.get("historyTypes") or HISTORY_TYPES)
    label = call.params.get("labelId")
    if label is not None:
        mailbox.check_labels([label])
    grouped: dict[int, dict[str, Any]] = {}
    for record in mailbox.history:
        if record.id <= start or record.kind not in types:
            continue
        if label is not None and label not in record.label_snapshot and label not in record.labels:
            continue
        entry = grouped.setdefault(record.id, {"id": str(record.id), "messages": []})
        ref = {"id": record.message["id"], "threadId": record.message["threadId"]}
        if ref not in entry["messages"]:
            entry["messages"].append(ref)
        key = {"messageAdded": "messagesAdded", "messageDeleted": "messagesDeleted"}.get(record.kind)
        if key:
            entry.setdefault(key, []).append({"message": dict(record.message)})
        else:
            key = "labelsAdded" if record.kind == "labelAdded" else "labelsRemoved"
            entry.setdefault(key, []).append({"message": dict(record.message), "labelIds": list(record.labels)})
    page, next_token = _paginate(state, call, list(grouped.values()), "history")
    body: dict[str, Any] = {}
    if page:
        body["history"] = page
    if next_token:
        body["nextPageToken"] = next_token
    body["historyId"] = str(mailbox.history_id)
    return body


def _send(state: GoogleState, call: _Call) -> dict[str, Any]:
    request = call.request
    if len(request.body) > MAX_UPLOAD:
        raise ApiError(413, "Request Entity Too Large", reason="uploadTooLarge")
    content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
    metadata: dict[str, Any] = {}
    if call.upload == "media":
        if not content_type.startswith("message/"):
            raise errors.bad_request(f"Media type '{content_type}' is not supported. Valid media types: [message/*]")
        raw = request.body
    elif call.upload == "multipart":
        metadata, raw = _multipart(request)
    else:
        if content_type != "application/json":
            raise errors.bad_request("Expected a JSON body (or use the upload endpoint).")
        metadata = _json_body(request.body)
        if "raw" not in metadata:
            raise errors.invalid_argument(
                "'raw' RFC822 payload message string or uploading message via /upload/* URL required"
            )
        try:
            raw = payload.b64url_decode(metadata["raw"])
        except (ValueError, TypeError):
            raise errors.invalid_argument("Invalid value for ByteString: raw") from None
    return _deliver_sent(state, call, raw, metadata.get("threadId"))


_MESSAGE_FIELDS = {
    "id",
    "threadId",
    "labelIds",
    "snippet",
    "historyId",
    "internalDate",
    "payload",
    "sizeEstimate",
    "raw",
    "classificationLabelValues",
}


def _json_body(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data or b"{}")
    except ValueError:
        raise errors.invalid_argument("Invalid JSON payload received.") from None
    if not isinstance(value, dict):
        raise errors.invalid_argument("Invalid JSON payload received. Expected an object.")
    for name in value:
        if name not in _MESSAGE_FIELDS:
            raise errors.invalid_argument(f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.')
    return value


def _multipart(request: Request) -> tuple[dict[str, Any], bytes]:
    content_type = request.header("content-type") or ""
    if not content_type.lower().startswith("multipart/related"):
        raise errors.bad_request("uploadType=multipart needs a multipart/related body")
    container = payload.parse(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + request.body)
    parts = container.get_payload()
    if not isinstance(parts, list) or len(parts) != 2:
        raise errors.bad_request("A multipart upload has exactly two parts: metadata and media")
    meta_part, media_part = parts
    if meta_part.get_content_type() != "application/json":
        raise errors.bad_request("The first part of a multipart upload must be application/json")
    if media_part.get_content_maintype() != "message":
        raise errors.bad_request(
            f"Media type '{media_part.get_content_type()}' is not supported. Valid media types: [message/*]"
        )
    metadata = _json_body(meta_part.get_payload(decode=True) or b"{}")
    # The media part's bytes exactly as sent, without the part headers and without re-serialising the message.
    raw_media = _raw_second_part(request.body, container.get_boundary() or "")
    return metadata, raw_media


def _raw_second_part(body: bytes, boundary: str) -> bytes:
    delimiter = b"--" + boundary.encode()
    sections = body.split(delimiter)
    if len(sections) < 4:
        raise errors.bad_request("Malformed multipart body")
    section = sections[2]
    section = section[2:] if section.startswith(b"\r\n") else section.lstrip(b"\n")
    _, sep, content = section.partition(b"\r\n\r\n")
    if not sep:
        _, _, content = section.partition(b"\n\n")
    return content[:-2] if content.endswith(b"\r\n") else content.removesuffix(b"\n")


def _deliver_sent(state: GoogleState, call: _Call, raw: bytes, thread_id: str | None) -> dict[str, Any]:
    headers, body = _split_headers(raw)
    parsed = payload.parse(raw)
    recipients = [
        address
        for _, address in email.utils.getaddresses([str(v) for n in ("To", "Cc", "Bcc") for v in parsed.get_all(n, [])])
        if address
    ]
    if not recipients:
        raise errors.invalid_argument("Recipient address required")
    if thread_id is not None and thread_id not in {m.thread_id for m in call.mailbox.messages.values()}:
        raise errors.not_found()
    # Gmail drops Bcc from what it stores and sends, and fills in From, Date and Message-ID when they are missing.
    headers = [(name, line) for name, line in headers if name.lower() != "bcc"]
    names = {name.lower() for name, _ in headers}
    extra = []
    if "from" not in names:
        extra.append(f"From: {call.user.email}\r\n".encode())
    if "date" not in names:
        extra.append(f"Date: {email.utils.formatdate(state.clock.now())}\r\n".encode())
    if "message-id" not in names:
        extra.append(f"Message-ID: {new_message_id_header()}\r\n".encode())
    stored_raw = b"".join(extra) + b"".join(line for _, line in headers) + body
    labels = ["SENT"]
    if call.user.email.lower() in {r.lower() for r in recipients}:
        labels += ["INBOX", "UNREAD"]
    stored = call.mailbox.insert(stored_raw, labels, int(state.clock.now() * 1000), thread_id=thread_id)
    state.sent.append(SentMessage(call.user.email, stored.id, stored_raw, tuple(recipients)))
    state.counters["gmail.sent"] += 1
    return {"id": stored.id, "threadId": stored.thread_id, "labelIds": list(stored.label_ids)}


def _split_headers(raw: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """Header fields (name, raw bytes including folded lines) and the rest (blank line and body), untouched."""
    headers: list[tuple[str, bytes]] = []
    lines = raw.splitlines(keepends=True)
    index = 0
    while index < len(lines) and lines[index].strip():
        line = lines[index]
        if line[:1] in (b" ", b"\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + line)
        else:
            headers.append((line.split(b":", 1)[0].decode("ascii", "replace").strip(), line))
        index += 1
    return headers, b"".join(lines[index:])


_HANDLERS: dict[str, Callable[[GoogleState, _Call], dict[str, Any]]] = {
    "gmail.users.getProfile": _get_profile,
    "gmail.users.labels.list": _list_labels,
    "gmail.users.messages.list": _list_messages,
    "gmail.users.messages.get": _get_message,
    "gmail.users.messages.attachments.get": _get_attachment,
    "gmail.users.messages.send": _send,
    "gmail.users.history.list": _list_history,
}
