"""Read an IMAP BODYSTRUCTURE (RFC 3501 §7.4.2, as parsed by imapclient) into a flat list of parts.

imapclient gives nested tuples: a multipart is ``BodyData([child, ...], subtype, params, disposition, language,
location, ...)`` (or, inside a message/rfc822 part, a plain tuple ``(child, child, ..., subtype, ...)``); a single
part is ``(type, subtype, params, id, description, encoding, octets, ...)`` with strings as ``bytes``, numbers as
``int`` and NIL as ``None``. Single parts carry type-specific fields before their extension data:

    basic            ... octets                              md5 disposition language location
    text/*           ... octets lines                        md5 disposition language location
    message/rfc822   ... octets envelope body lines          md5 disposition language location

Parts are numbered as IMAP numbers them (see :mod:`server.providers.mime`), leaves only, in document order, and are
classified into bodies and attachments with the same rule as :func:`server.providers.mime.parse_message`
(:func:`server.providers.mime.classify_part`), so both paths show a message the same way. Encapsulated messages are
attachments and are not walked into. Reading is best effort: fields of the wrong type count as missing, and nothing
here raises on a malformed structure. The nesting depth and number of parts are capped as in ``mime``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.providers.mime import (
    MAX_MULTIPART_DEPTH,
    MAX_PARTS,
    classify_part,
    clean_text,
    decode_header_text,
    decode_parameters,
)

__all__ = ["StructurePart", "parts_from_bodystructure", "text_sections"]

_ENCAPSULATED = frozenset({"message/rfc822", "message/global"})


@dataclass(frozen=True)
class StructurePart:
    """One leaf of a BODYSTRUCTURE. ``size_bytes`` is the encoded size the server reported."""

    section: str
    content_type: str  # lower case, "type/subtype"
    charset: str  # as declared, or ""
    encoding: str  # Content-Transfer-Encoding, lower case; "7bit" when missing
    size_bytes: int
    filename: str
    inline: bool
    content_id: str  # without angle brackets
    is_attachment: bool


def _text(value: object) -> str:
    """An IMAP string (bytes, possibly a literal) as text; NIL, lists and anything else as ""."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return ""


def _is_list(value: object) -> bool:
    return isinstance(value, tuple | list)


def _params(value: object) -> dict[str, str]:
    """A body-fld-param list ("name" "value" ...) as a dict, RFC 2231 decoded; NIL or junk gives {}."""
    if not isinstance(value, tuple | list):
        return {}
    items = list(value)
    pairs = [(_text(items[i]), _text(items[i + 1])) for i in range(0, len(items) - 1, 2)]
    return decode_parameters(pairs)


def _at(node: Sequence[object], index: int) -> object:
    return node[index] if 0 <= index < len(node) else None


def _split_multipart(node: Sequence[object]) -> tuple[list[object], list[object]] | None:
    """(children, fields after them) when ``node`` is a multipart, else None."""
    if not node:
        return None
    first = node[0]
    if isinstance(first, list):  # imapclient's BodyData: the children gathered in a list
        return list(first), list(node[1:])
    if isinstance(first, tuple):  # a raw multipart tuple (inside message/rfc822): leading children
        count = 0
        while count < len(node) and isinstance(node[count], tuple | list):
            count += 1
        return list(node[:count]), list(node[count:])
    return None


def _disposition(value: object) -> tuple[str, dict[str, str]]:
    """body-fld-dsp: ("attachment" ("filename" "x")) or NIL; a bare string is tolerated."""
    if isinstance(value, tuple | list):
        return _text(_at(value, 0)).strip().lower(), _params(_at(value, 1))
    return _text(value).strip().lower(), {}


def _extension_start(content_type: str, node: Sequence[object]) -> int:
    """Index of body-fld-md5 in a single part: after the type-specific fields (checked, not trusted)."""
    if content_type.startswith("text/") and isinstance(_at(node, 7), int):
        return 8
    if content_type in _ENCAPSULATED and isinstance(_at(node, 9), int) and _is_list(_at(node, 8)):
        return 10
    return 7


def _leaf(node: Sequence[object], section: str, in_related: bool) -> StructurePart:
    maintype = _text(_at(node, 0)).strip().lower()
    subtype = _text(_at(node, 1)).strip().lower()
    content_type = f"{maintype}/{subtype}" if maintype and subtype else "application/octet-stream"
    params = _params(_at(node, 2))
    extension = _extension_start(content_type, node)
    disposition, disposition_params = _disposition(_at(node, extension + 1))
    filename = disposition_params.get("filename") or params.get("name") or ""
    filename = clean_text(decode_header_text(filename)).strip()
    content_id = _text(_at(node, 3)).strip()
    if content_id.startswith("<"):
        content_id = content_id[1:]
    if content_id.endswith(">"):
        content_id = content_id[:-1]
    size = _at(node, 6)
    if isinstance(size, bytes) and size.strip().isdigit():
        size = int(size)
    is_attachment, inline = classify_part(content_type, disposition, filename, in_related)
    return StructurePart(
        section=section,
        content_type=content_type,
        charset=params.get("charset", "").strip(),
        encoding=_text(_at(node, 5)).strip().lower() or "7bit",
        size_bytes=size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else 0,
        filename=filename,
        inline=inline,
        content_id=clean_text(content_id.strip()),
        is_attachment=is_attachment,
    )


def parts_from_bodystructure(bodystructure: object) -> list[StructurePart]:
    """The leaf parts of a BODYSTRUCTURE, in document order, with IMAP section numbers; [] for junk."""
    if not isinstance(bodystructure, tuple | list) or not bodystructure:
        return []
    if _split_multipart(bodystructure) is None:
        return [_leaf(bodystructure, "1", False)]
    parts: list[StructurePart] = []
    budget = MAX_PARTS
    # (section, node, depth, inside multipart/related); children are pushed in reverse to pop in document order.
    stack: list[tuple[str, Sequence[object], int, bool]] = [("", bodystructure, 0, False)]
    while stack:
        section, node, depth, in_related = stack.pop()
        split = _split_multipart(node)
        if split is None:
            parts.append(_leaf(node, section, in_related))
            continue
        if depth >= MAX_MULTIPART_DEPTH or budget <= 0:
            continue
        children, rest = split
        children = children[:budget]
        budget -= len(children)
        related = in_related or _text(_at(rest, 0)).strip().lower() == "related"
        for number in range(len(children), 0, -1):
            child = children[number - 1]
            if isinstance(child, tuple | list) and child:  # junk keeps its number but is not a part
                stack.append((f"{section}.{number}" if section else str(number), child, depth + 1, related))
    return parts


def text_sections(parts: Sequence[StructurePart]) -> tuple[StructurePart | None, StructurePart | None]:
    """The text/plain and text/html body parts, as :func:`server.providers.mime.parse_message` chooses them."""
    text: StructurePart | None = None
    html: StructurePart | None = None
    for part in parts:
        if part.is_attachment:
            continue
        if part.content_type == "text/plain" and text is None:
            text = part
        elif part.content_type == "text/html" and html is None:
            html = part
    return text, html
