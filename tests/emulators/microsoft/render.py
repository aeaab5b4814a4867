"""Graph's view of a stored RFC 5322 message: the ``message`` resource, its ``body`` in HTML or text, its
``internetMessageHeaders`` and its attachments (``fileAttachment``, and ``itemAttachment`` for an attached message).

Built with the standard library's email package from the raw bytes, so tests can deliver real MIME. Conventions
from the Graph v1.0 reference for ``message``: the body comes in HTML unless ``Prefer: outlook.body-content-type=
"text"``; ``bodyPreview`` is the first 255 characters of the text; ``hasAttachments`` ignores inline attachments;
``internetMessageHeaders`` is returned only when ``$select`` names it; an address without a display name is shown
with the address as its name.
"""

from __future__ import annotations

import base64
import email
import email.policy
import email.utils
import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from typing import Any

PREVIEW_LENGTH = 255


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Attachment:
    id: str
    kind: str  # "file" or "item"
    name: str
    content_type: str
    content: bytes
    is_inline: bool
    content_id: str | None


def _leaf_bytes(part: Message) -> bytes:
    if part.get_content_type() == "message/rfc822":
        inner = part.get_payload()
        if isinstance(inner, list) and inner:
            return inner[0].as_bytes(policy=email.policy.default)  # type: ignore[no-any-return]
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def attachments_of(message: EmailMessage, new_id: Callable[[], str]) -> list[Attachment]:
    """Every leaf that is not the body text: file attachments, inline images, attached messages."""
    body_parts = {id(p) for p in (message.get_body(("plain",)), message.get_body(("html",))) if p is not None}
    out = []
    for part in message.walk():
        if part.is_multipart() and part.get_content_maintype() == "multipart":
            continue
        if part is message and not part.get_filename():
            continue
        if id(part) in body_parts:
            continue
        if part.get_content_maintype() == "text" and not part.get_filename() and not part.get_content_disposition():
            continue  # an alternative text part, not an attachment
        content_id = str(part.get("Content-ID", "")).strip().strip("<>") or None
        disposition = part.get_content_disposition()
        is_inline = disposition == "inline" or (disposition is None and content_id is not None)
        kind = "item" if part.get_content_type() == "message/rfc822" else "file"
        name = part.get_filename() or ""
        if kind == "item" and not name:
            inner = part.get_payload()
            name = str(inner[0].get("Subject", "")) if isinstance(inner, list) and inner else ""
        out.append(Attachment(new_id(), kind, name, part.get_content_type(), _leaf_bytes(part), is_inline, content_id))
    return out


def recipient(name: str, address: str) -> dict[str, Any]:
    return {"emailAddress": {"name": name or address, "address": address}}


def recipients(message: EmailMessage, header: str) -> list[dict[str, Any]]:
    values = [str(v) for v in message.get_all(header, [])]
    return [recipient(name, address) for name, address in email.utils.getaddresses(values) if address]


def _text_of(part: Message | None) -> str:
    if part is None:
        return ""
    try:
        content = part.get_content()  # type: ignore[attr-defined]
    except (LookupError, ValueError):
        return ""
    return content if isinstance(content, str) else ""


def html_to_text(text: str) -> str:
    text = re.sub(r"(?is)<(script|style|head).*?</\1>", " ", text)
    text = re.sub(r"(?i)<br\s*/?>|</p>|</div>", "\n", text)
    return html.unescape(re.sub(r"<[^>]+>", "", text)).strip()


def text_to_html(text: str) -> str:
    escaped = html.escape(text).replace("\r\n", "\n").replace("\n", "<br>\r\n")
    return (
        '<html><head>\r\n<meta http-equiv="Content-Type" content="text/html; charset=utf-8">\r\n</head>\r\n'
        f'<body>\r\n<div class="PlainText">{escaped}</div>\r\n</body>\r\n</html>\r\n'
    )


def body(message: EmailMessage, content_type: str) -> dict[str, str]:
    """``{"contentType", "content"}`` in the wanted type ("html" or "text"), converting like Outlook does."""
    html_part = message.get_body(("html",))
    text_part = message.get_body(("plain",))
    if content_type == "text":
        content = _text_of(text_part) if text_part is not None else html_to_text(_text_of(html_part))
        return {"contentType": "text", "content": content}
    if html_part is not None:
        return {"contentType": "html", "content": _text_of(html_part)}
    return {"contentType": "html", "content": text_to_html(_text_of(text_part))}


def preview(message: EmailMessage) -> str:
    text = body(message, "text")["content"]
    return " ".join(text.split())[:PREVIEW_LENGTH]


def internet_headers(message: EmailMessage) -> list[dict[str, str]]:
    return [{"name": name, "value": re.sub(r"\r?\n[ \t]", " ", str(value))} for name, value in message.items()]


def sent_time(message: EmailMessage, fallback: float) -> float:
    value = message.get("Date")
    if value is None:
        return fallback
    try:
        return email.utils.parsedate_to_datetime(str(value)).timestamp()
    except (TypeError, ValueError):
        return fallback


def file_attachment(attachment: Attachment, modified: float, *, with_content: bool = True) -> dict[str, Any]:
    if attachment.kind == "item":
        return {
            "@odata.type": "#microsoft.graph.itemAttachment",
            "id": attachment.id,
            "lastModifiedDateTime": iso(modified),
            "name": attachment.name,
            "contentType": None,
            "size": len(attachment.content),
            "isInline": attachment.is_inline,
        }
    out: dict[str, Any] = {
        "@odata.type": "#microsoft.graph.fileAttachment",
        "@odata.mediaContentType": attachment.content_type,
        "id": attachment.id,
        "lastModifiedDateTime": iso(modified),
        "name": attachment.name,
        "contentType": attachment.content_type,
        "size": len(attachment.content),
        "isInline": attachment.is_inline,
        "contentId": attachment.content_id,
        "contentLocation": None,
    }
    if with_content:
        out["contentBytes"] = base64.b64encode(attachment.content).decode("ascii")
    return out
