"""Mail domain types: what a provider driver returns and accepts (no grpc, no provider library types)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from server.domain.models import AccountState
from server.errors import FieldViolation, InvalidArgument

MAX_QUERY_CHARS = 512
QUERY_FORBIDDEN = frozenset('{}()"\\')


def check_query(query: str) -> None:
    """Refuse a search query that is too long or could escape into the provider's own syntax (an IMAP SEARCH
    atom, Gmail ``q``, Graph ``$search``): characters that open a literal, a group or a quoted string, or any
    control character. The domain checks it for callers; drivers check it again for themselves."""
    problem = ""
    if len(query) > MAX_QUERY_CHARS:
        problem = f"at most {MAX_QUERY_CHARS} characters"
    elif any(c in query for c in QUERY_FORBIDDEN) or not query.isprintable():
        problem = "printable characters, none of " + " ".join(sorted(QUERY_FORBIDDEN))
    if problem:
        raise InvalidArgument(
            f"query must have {problem}", reason="INVALID_QUERY", field_violations=[FieldViolation("query", problem)]
        )


class FolderRole(enum.Enum):
    INBOX = "inbox"
    SENT = "sent"
    DRAFTS = "drafts"
    TRASH = "trash"
    JUNK = "junk"
    ARCHIVE = "archive"
    ALL = "all"
    FLAGGED = "flagged"
    IMPORTANT = "important"


class MessageView(enum.Enum):
    METADATA = "metadata"
    FULL = "full"


@dataclass(frozen=True)
class Folder:
    """A folder. ``id`` is the driver's opaque, URL-safe, stable id (``[A-Za-z0-9_-]``)."""

    id: str
    display_name: str
    role: FolderRole | None = None
    parent_id: str | None = None
    message_count: int | None = None
    unread_count: int | None = None


@dataclass(frozen=True)
class EmailAddress:
    address: str
    display_name: str = ""


@dataclass(frozen=True)
class AttachmentInfo:
    """An attachment or inline part. ``id`` is opaque and URL-safe; the driver can stream the part from it."""

    id: str
    filename: str
    content_type: str
    size_bytes: int
    inline: bool = False
    content_id: str = ""


@dataclass(frozen=True)
class Message:
    """A message as read from the provider. Bodies and attachments are filled only in the FULL view."""

    id: str
    view: MessageView
    folder_ids: tuple[str, ...] = ()
    thread_id: str = ""
    internet_message_id: str = ""
    subject: str = ""
    sender: EmailAddress | None = None
    to: tuple[EmailAddress, ...] = ()
    cc: tuple[EmailAddress, ...] = ()
    bcc: tuple[EmailAddress, ...] = ()
    reply_to: tuple[EmailAddress, ...] = ()
    send_time: datetime | None = None
    receive_time: datetime | None = None
    size_bytes: int = 0
    read: bool = False
    flagged: bool = False
    answered: bool = False
    draft: bool = False
    keywords: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    text_body: str = ""
    html_body: str = ""
    attachments: tuple[AttachmentInfo, ...] = ()


@dataclass(frozen=True)
class OutgoingAttachment:
    filename: str
    content: bytes
    content_type: str = ""
    inline: bool = False
    content_id: str = ""


@dataclass(frozen=True)
class OutgoingMessage:
    """A message to send; From is always the account's own address."""

    to: tuple[EmailAddress, ...] = ()
    cc: tuple[EmailAddress, ...] = ()
    bcc: tuple[EmailAddress, ...] = ()
    reply_to: tuple[EmailAddress, ...] = ()
    subject: str = ""
    text_body: str = ""
    html_body: str = ""
    attachments: tuple[OutgoingAttachment, ...] = ()
    in_reply_to: str = ""
    references: tuple[str, ...] = ()
    sender_display_name: str = ""

    @property
    def recipients(self) -> tuple[EmailAddress, ...]:
        return self.to + self.cc + self.bcc


@dataclass(frozen=True)
class SendResult:
    internet_message_id: str
    send_time: datetime
    message_id: str = ""  # the sent copy, when the driver can name it
    # Envelope recipients the server refused while accepting the others (SMTP): the message did not reach them.
    refused_recipients: tuple[str, ...] = ()


@dataclass(frozen=True)
class MessagePage:
    """One page of a listing. ``cursor`` is the driver's position for the next page (None on the last page); the
    domain seals it into an opaque page token, so drivers may put anything JSON-serialisable in it."""

    messages: list[Message]
    cursor: dict[str, object] | None = None


@dataclass(frozen=True)
class AttachmentChunk:
    offset: int
    data: bytes
    info: AttachmentInfo | None = None  # on the first chunk only


# Change feed events. Each carries the driver's cursor after the event; the domain seals it into a resume token.


class ResyncReason(enum.Enum):
    CURSOR_EXPIRED = "cursor_expired"
    UIDVALIDITY_CHANGED = "uidvalidity_changed"
    GAP = "gap"


@dataclass(frozen=True)
class MessageAdded:
    message: Message


@dataclass(frozen=True)
class MessageDeleted:
    message_id: str


@dataclass(frozen=True)
class MessageUpdated:
    message: Message


@dataclass(frozen=True)
class FolderAdded:
    folder: Folder


@dataclass(frozen=True)
class FolderDeleted:
    folder_id: str


@dataclass(frozen=True)
class ResyncRequired:
    reason: ResyncReason
    folder_id: str = ""


@dataclass(frozen=True)
class Heartbeat:
    pass


@dataclass(frozen=True)
class AccountStateChanged:
    """The account's state changed (its grant was refused): the feed ends after this event."""

    state: AccountState
    reason: str


Change = (
    MessageAdded
    | MessageDeleted
    | MessageUpdated
    | FolderAdded
    | FolderDeleted
    | ResyncRequired
    | AccountStateChanged
    | Heartbeat
)


@dataclass(frozen=True)
class FeedEvent:
    change: Change
    cursor: dict[str, object] = field(default_factory=dict)  # empty: the event moves no position
    observe_time: datetime | None = None
