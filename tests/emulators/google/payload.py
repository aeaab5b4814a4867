"""Gmail's view of a stored RFC 5322 message: the ``payload`` part tree, the snippet, attachments by id.

Built with the standard library's email package (``policy=email.policy.default``) from the raw bytes, so tests can
deliver real MIME. Conventions follow the Gmail reference for ``users.messages`` (MessagePart): the top part has
``partId`` "", its children "0", "1", ..., theirs "1.0", ...; a multipart part has ``body.size`` 0 and ``parts``;
a leaf with a file name is an attachment and carries ``body.attachmentId`` instead of ``body.data``; ``data`` is
base64url of the transfer-decoded bytes.
"""

from __future__ import annotations

import base64
import email
import email.policy
import html
import re
from email.message import EmailMessage, Message
from typing import Any

SNIPPET_LENGTH = 200


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url, padded or not (Google accepts both); raises ValueError on anything else."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*={0,2}", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def headers_of(part: Message) -> list[dict[str, str]]:
    """Headers in order, unfolded and with RFC 2047 words decoded, as Gmail's MessagePartHeader list gives them."""
    out = []
    for name, value in part.items():
        text = re.sub(r"\r?\n[ \t]", " ", str(value))
        out.append({"name": name, "value": text})
    return out


def _is_attachment(part: Message) -> bool:
    return bool(part.get_filename()) or part.get_content_disposition() == "attachment"


def _leaf_bytes(part: Message) -> bytes:
    if part.get_content_type() == "message/rfc822" or part.get_content_maintype() == "message":
        inner = part.get_payload()
        if isinstance(inner, list) and inner:
            return inner[0].as_bytes(policy=email.policy.default)  # type: ignore[no-any-return]
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def _child_id(parent: str, index: int) -> str:
    return str(index) if parent == "" else f"{parent}.{index}"


def part_tree(part: Message, part_id: str, attachment_id: Any) -> dict[str, Any]:
    """The MessagePart for ``part``; ``attachment_id(part_id) -> str`` names attachments."""
    node: dict[str, Any] = {
        "partId": part_id,
        "mimeType": part.get_content_type(),
        "filename": part.get_filename() or "",
        "headers": headers_of(part),
    }
    if part.is_multipart() and part.get_content_maintype() == "multipart":
        children = part.get_payload()
        assert isinstance(children, list)
        node["body"] = {"size": 0}
        node["parts"] = [part_tree(child, _child_id(part_id, i), attachment_id) for i, child in enumerate(children)]
        return node
    data = _leaf_bytes(part)
    if _is_attachment(part):
        node["body"] = {"attachmentId": attachment_id(part_id), "size": len(data)}
    elif data:
        node["body"] = {"size": len(data), "data": b64url(data)}
    else:
        node["body"] = {"size": 0}
    return node


def find_part(message: Message, part_id: str) -> Message | None:
    """The part with Gmail's ``part_id`` ("" is the whole message)."""
    part: Message = message
    if part_id == "":
        return part
    for step in part_id.split("."):
        children = part.get_payload() if part.is_multipart() else None
        if not isinstance(children, list) or not step.isdigit() or int(step) >= len(children):
            return None
        part = children[int(step)]
    return part


def attachment_bytes(message: Message, part_id: str) -> bytes | None:
    part = find_part(message, part_id)
    if part is None or (part.is_multipart() and part.get_content_maintype() == "multipart"):
        return None
    return _leaf_bytes(part) if _is_attachment(part) else None


def _first_text(message: EmailMessage) -> str:
    body = message.get_body(preferencelist=("plain", "html"))
    if body is None:
        return ""
    try:
        text = body.get_content()
    except (LookupError, ValueError):
        return ""
    if not isinstance(text, str):
        return ""
    if body.get_content_subtype() == "html":
        text = re.sub(r"(?is)<(script|style).*?</\1>", " ", text)
        text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    return text


def snippet(message: EmailMessage) -> str:
    """A short plain-text start of the body, whitespace collapsed and HTML-escaped the way Gmail's snippets are."""
    text = " ".join(_first_text(message).split())[:SNIPPET_LENGTH]
    return html.escape(text, quote=True).replace("&#x27;", "&#39;")
