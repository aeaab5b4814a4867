"""Opaque, URL-safe ids for IMAP folders, messages and parts.

A message id binds the folder, its UIDVALIDITY and the UID, so it stays valid across sessions and servers'
restarts, and stops resolving (NOT_FOUND) when UIDVALIDITY changes rather than naming another message.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass

from server.errors import FieldViolation, InvalidArgument

_MESSAGE = struct.Struct(">II")


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _bad(field: str, what: str) -> InvalidArgument:
    return InvalidArgument(
        f"{field} does not name an IMAP {what}",
        reason="INVALID_RESOURCE_NAME",
        field_violations=[FieldViolation(field, f"not an id this broker issued for an IMAP {what}")],
    )


def folder_id(name: str) -> str:
    return _encode(name.encode("utf-8"))


def folder_name(folder: str, field: str = "folder") -> str:
    try:
        name = _decode(folder).decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise _bad(field, "folder") from None
    if folder_id(name) != folder:  # one folder, one id: base64 decoding alone would accept variants
        raise _bad(field, "folder")
    if not _plausible_folder(name):
        raise _bad(field, "folder")
    return name


MAX_FOLDER_CHARS = 1000


def _plausible_folder(name: str) -> bool:
    """No server has a folder with control characters or a thousand-character name: refuse those here."""
    return bool(name) and len(name) <= MAX_FOLDER_CHARS and name.isprintable()


@dataclass(frozen=True)
class MessageRef:
    folder: str
    uidvalidity: int
    uid: int

    def id(self) -> str:
        return _encode(_MESSAGE.pack(self.uidvalidity, self.uid) + self.folder.encode("utf-8"))


def message_ref(message: str, field: str = "name") -> MessageRef:
    try:
        raw = _decode(message)
        uidvalidity, uid = _MESSAGE.unpack_from(raw)
        folder = raw[_MESSAGE.size :].decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError, struct.error):
        raise _bad(field, "message") from None
    if not _plausible_folder(folder) or uid == 0:
        raise _bad(field, "message")
    return MessageRef(folder, uidvalidity, uid)


def part_id(section: str) -> str:
    """IMAP body sections (``1.2``) as URL-safe ids (``1_2``)."""
    return section.replace(".", "_")


def part_section(part: str, field: str = "name") -> str:
    section = part.replace("_", ".")
    if not all(piece.isdigit() and 0 < int(piece) < 10_000 for piece in section.split(".")):
        raise _bad(field, "attachment")
    return section
