"""One Outlook mailbox: folders (the well-known ones and user folders), messages stored as raw RFC 5322 bytes, and
the change log that delta queries read.

Behaviour taken from the Graph mail docs: a message's ``id`` changes when it moves to another folder (its
ImmutableId does not); well-known folder names (inbox, sentitems, ...) work in place of folder ids; a delta round
returns each changed message once, removed ones as ``{"id", "@removed": {"reason"}}`` with reason ``changed`` when
the item can be restored (moved elsewhere, e.g. Deleted Items) and ``deleted`` when it is gone for good.
"""

from __future__ import annotations

import base64
import random
import re
from dataclasses import dataclass, field
from email.message import EmailMessage

from tests.emulators.microsoft import errors
from tests.emulators.microsoft.render import Attachment, attachments_of, parse

WELL_KNOWN = {
    "inbox": "Inbox",
    "drafts": "Drafts",
    "sentitems": "Sent Items",
    "deleteditems": "Deleted Items",
    "junkemail": "Junk Email",
    "archive": "Archive",
}
ROOT = "msgfolderroot"
_ID = re.compile(r"[A-Za-z0-9_=-]{16,400}")


@dataclass
class Folder:
    id: str
    display_name: str
    parent_id: str
    well_known: str | None = None
    is_hidden: bool = False


@dataclass
class Message:
    id: str
    immutable_id: str
    folder_id: str
    raw: bytes
    parsed: EmailMessage
    received: float
    created: float
    modified: float
    conversation_id: str
    change_key: str
    is_read: bool = False
    flag_status: str = "notFlagged"
    attachments: list[Attachment] = field(default_factory=list)


@dataclass(frozen=True)
class Change:
    seq: int
    folder_id: str
    message_id: str  # the id the message had in that folder
    immutable_id: str
    kind: str  # "upsert", "changed" (removed, restorable) or "deleted" (removed for good)


class Mailbox:
    """Not thread-safe by itself: the emulator holds its lock around every call."""

    def __init__(self, address: str, seed: int) -> None:
        self.address = address
        self._random = random.Random(seed)
        self.folders: dict[str, Folder] = {}
        self.messages: dict[str, Message] = {}  # by current id
        self.log: list[Change] = []
        self.seq = 0
        self.sync_generation = 0  # bumped to expire every delta token so far
        self.expired_code = "syncStateNotFound"
        self._conversations: dict[str, str] = {}  # Message-ID header -> conversationId
        root = Folder(self.new_id("AQMkAD"), "Top of Information Store", "", ROOT, False)
        self.folders[root.id] = root
        for name, display in WELL_KNOWN.items():
            folder = Folder(self.new_id("AQMkAD"), display, root.id, name)
            self.folders[folder.id] = folder

    # ---- ids ----------------------------------------------------------------------------------------------------

    def new_id(self, prefix: str = "AAMkAD") -> str:
        """An opaque Exchange-like id: URL-safe base64 with its padding, so a client must escape it."""
        return prefix + base64.urlsafe_b64encode(self._random.randbytes(61)).decode("ascii")

    @staticmethod
    def check_id(value: str) -> None:
        if not _ID.fullmatch(value):
            raise errors.malformed_id()

    # ---- folders ------------------------------------------------------------------------------------------------

    @property
    def root(self) -> Folder:
        return next(f for f in self.folders.values() if f.well_known == ROOT)

    def folder(self, id_or_name: str) -> Folder:
        lowered = id_or_name.lower()
        for folder in self.folders.values():
            if folder.well_known == lowered:
                return folder
        if id_or_name in self.folders:
            return self.folders[id_or_name]
        if not _ID.fullmatch(id_or_name):
            raise errors.GraphError(400, "ErrorInvalidIdMalformed", "Id is malformed.")
        raise errors.not_found()

    def children(self, folder_id: str) -> list[Folder]:
        return [f for f in self.folders.values() if f.parent_id == folder_id]

    def create_folder(self, display_name: str, parent: str | None = None) -> Folder:
        parent_folder = self.folder(parent) if parent else self.root
        if any(f.display_name.lower() == display_name.lower() for f in self.children(parent_folder.id)):
            raise errors.GraphError(409, "ErrorFolderExists", "A folder with the specified name already exists.")
        folder = Folder(self.new_id("AAMkAD"), display_name, parent_folder.id)
        self.folders[folder.id] = folder
        return folder

    def delete_folder(self, id_or_name: str) -> None:
        folder = self.folder(id_or_name)
        if folder.well_known:
            raise errors.GraphError(403, "ErrorDeleteDistinguishedFolder", "Distinguished folders cannot be deleted.")
        for child in self.children(folder.id):
            self.delete_folder(child.id)
        for message in [m for m in self.messages.values() if m.folder_id == folder.id]:
            self._remove(message, "deleted")
        del self.folders[folder.id]

    def counts(self, folder_id: str) -> tuple[int, int]:
        inside = [m for m in self.messages.values() if m.folder_id == folder_id]
        return len(inside), sum(1 for m in inside if not m.is_read)

    # ---- messages -----------------------------------------------------------------------------------------------

    def _record(self, message: Message, kind: str, folder_id: str | None = None) -> None:
        self.seq += 1
        self.log.append(Change(self.seq, folder_id or message.folder_id, message.id, message.immutable_id, kind))

    def _conversation(self, parsed: EmailMessage) -> str:
        references = re.findall(r"<[^>]+>", f"{parsed.get('References', '')} {parsed.get('In-Reply-To', '')}")
        for reference in references:
            if reference in self._conversations:
                conversation = self._conversations[reference]
                break
        else:
            conversation = self.new_id("AAQkAD")
        own = str(parsed.get("Message-ID", "")).strip()
        if own:
            self._conversations.setdefault(own, conversation)
        return conversation

    def insert(self, raw: bytes, folder: str, when: float, *, is_read: bool = False) -> Message:
        target = self.folder(folder)
        if target.well_known == ROOT:
            raise errors.bad_request("Messages cannot be stored in the root folder.")
        parsed = parse(raw)
        message = Message(
            id=self.new_id(),
            immutable_id=self.new_id("AAkALg"),
            folder_id=target.id,
            raw=raw,
            parsed=parsed,
            received=when,
            created=when,
            modified=when,
            conversation_id=self._conversation(parsed),
            change_key=self.new_id("CQAAAB")[:28],
            is_read=is_read,
        )
        message.attachments = attachments_of(parsed, lambda: self.new_id("AAMkAD"))
        self.messages[message.id] = message
        self._record(message, "upsert")
        return message

    def get(self, message_id: str) -> Message:
        self.check_id(message_id)
        if message_id in self.messages:
            return self.messages[message_id]
        for message in self.messages.values():
            if message.immutable_id == message_id:
                return message
        raise errors.not_found()

    def touch(self, message: Message, when: float) -> None:
        message.modified = when
        message.change_key = self.new_id("CQAAAB")[:28]
        self._record(message, "upsert")

    def move(self, message_id: str, folder: str, when: float) -> Message:
        message = self.get(message_id)
        target = self.folder(folder)
        if target.id == message.folder_id:
            return message
        self._record(message, "changed")
        del self.messages[message.id]
        message.id = self.new_id()  # Outlook ids change on a move; the ImmutableId does not
        message.folder_id = target.id
        self.messages[message.id] = message
        self.touch(message, when)
        return message

    def _remove(self, message: Message, reason: str) -> None:
        self._record(message, reason)
        del self.messages[message.id]

    def delete(self, message_id: str, when: float, *, permanent: bool) -> None:
        """Delete as Outlook does: to Deleted Items (restorable), or for good (``permanent``, or already there)."""
        message = self.get(message_id)
        if permanent or self.folders[message.folder_id].well_known == "deleteditems":
            self._remove(message, "deleted")
        else:
            self.move(message.id, "deleteditems", when)

    def in_folder(self, folder_id: str) -> list[Message]:
        return [m for m in self.messages.values() if m.folder_id == folder_id]

    # ---- delta --------------------------------------------------------------------------------------------------

    def changes_since(self, folder_id: str, seq: int) -> list[Change]:
        """The last change of each message in ``folder_id`` after ``seq``, oldest first."""
        last: dict[str, Change] = {}
        for change in self.log:
            if change.seq > seq and change.folder_id == folder_id:
                last.pop(change.immutable_id, None)
                last[change.immutable_id] = change
        return list(last.values())
