"""One Gmail mailbox: messages as raw RFC 5322 bytes, labels, and the history log ``history.list`` reads.

History ids grow with gaps, as the Gmail reference warns ("increase chronologically but are not contiguous"), so a
client that does arithmetic on them is caught. Records older than the retention point are gone: a start id before it
is answered with 404, the signal for a full sync.
"""

from __future__ import annotations

import email.utils
import random
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

from tests.emulators.google import errors, payload

SYSTEM_LABELS = (
    "CHAT",
    "SENT",
    "INBOX",
    "IMPORTANT",
    "TRASH",
    "DRAFT",
    "SPAM",
    "CATEGORY_FORUMS",
    "CATEGORY_UPDATES",
    "CATEGORY_PERSONAL",
    "CATEGORY_PROMOTIONS",
    "CATEGORY_SOCIAL",
    "STARRED",
    "UNREAD",
)
# System labels that labels.list shows with list visibility settings (the rest carry only id, name and type).
_VISIBLE_SYSTEM = {"INBOX", "SENT", "DRAFT", "TRASH", "SPAM", "STARRED", "UNREAD", "IMPORTANT"}
HISTORY_TYPES = ("messageAdded", "messageDeleted", "labelAdded", "labelRemoved")


@dataclass
class StoredMessage:
    id: str
    thread_id: str
    raw: bytes
    label_ids: list[str]
    internal_date_ms: int
    history_id: int
    parsed: EmailMessage = field(repr=False)
    sequence: int = 0  # insertion order, to order messages with the same internalDate

    def ref(self) -> dict[str, Any]:
        return {"id": self.id, "threadId": self.thread_id}

    def ref_with_labels(self, labels: list[str] | None = None) -> dict[str, Any]:
        out = self.ref()
        labels = self.label_ids if labels is None else labels
        if labels:
            out["labelIds"] = list(labels)
        return out


@dataclass(frozen=True)
class HistoryRecord:
    id: int
    kind: str  # one of HISTORY_TYPES
    message: dict[str, Any]  # {id, threadId, labelIds?} as of the change
    labels: tuple[str, ...] = ()  # the labels added or removed
    label_snapshot: tuple[str, ...] = ()  # the message's labels at the change, for the labelId filter


class Mailbox:
    """Not thread-safe by itself: the emulator holds its lock around every call."""

    def __init__(self, email_address: str, seed: int) -> None:
        self.email_address = email_address
        self._random = random.Random(seed)
        self.messages: dict[str, StoredMessage] = {}
        self.user_labels: dict[str, str] = {}  # id -> name
        self.history: list[HistoryRecord] = []
        self.history_id = 1000 + self._random.randint(0, 5000)
        self.oldest_valid_start = self.history_id
        self._sequence = 0  # insertion order, to order messages with the same internalDate

    # ---- changes -------------------------------------------------------------------------------------------------

    def _next_history_id(self) -> int:
        self.history_id += self._random.randint(1, 97)
        return self.history_id

    def _new_message_id(self) -> str:
        while True:
            candidate = f"{self._random.getrandbits(64):016x}"
            if candidate not in self.messages and candidate[0] != "0":
                return candidate

    def add_label(self, name: str) -> str:
        label_id = f"Label_{len(self.user_labels) + 1}"
        self.user_labels[label_id] = name
        return label_id

    def all_label_ids(self) -> set[str]:
        return set(SYSTEM_LABELS) | set(self.user_labels)

    def check_labels(self, label_ids: list[str]) -> None:
        unknown = [label for label in label_ids if label not in self.all_label_ids()]
        if unknown:
            raise errors.invalid_argument(f"Invalid label: {unknown[0]}")

    def _thread_for(self, parsed: EmailMessage) -> str | None:
        wanted = set(re.findall(r"<[^>]+>", f"{parsed.get('In-Reply-To', '')} {parsed.get('References', '')}"))
        if not wanted:
            return None
        for stored in self.messages.values():
            if str(stored.parsed.get("Message-ID", "")).strip() in wanted:
                return stored.thread_id
        return None

    def insert(
        self, raw: bytes, label_ids: list[str], internal_date_ms: int, thread_id: str | None = None
    ) -> StoredMessage:
        self.check_labels(label_ids)
        parsed = payload.parse(raw)
        message_id = self._new_message_id()
        history_id = self._next_history_id()
        stored = StoredMessage(
            id=message_id,
            thread_id=thread_id or self._thread_for(parsed) or message_id,
            raw=raw,
            label_ids=list(dict.fromkeys(label_ids)),
            internal_date_ms=internal_date_ms,
            history_id=history_id,
            parsed=parsed,
        )
        self._sequence += 1
        stored.sequence = self._sequence
        self.messages[message_id] = stored
        self.history.append(
            HistoryRecord(history_id, "messageAdded", stored.ref_with_labels(), (), tuple(stored.label_ids))
        )
        return stored

    def modify(self, message_id: str, add: list[str], remove: list[str]) -> int:
        stored = self.get(message_id)
        self.check_labels(add + remove)
        added = [label for label in dict.fromkeys(add) if label not in stored.label_ids]
        removed = [label for label in dict.fromkeys(remove) if label in stored.label_ids and label not in added]
        if not added and not removed:
            return self.history_id
        history_id = self._next_history_id()
        stored.label_ids = [label for label in stored.label_ids if label not in removed] + added
        stored.history_id = history_id
        snapshot = tuple(stored.label_ids)
        if added:
            self.history.append(
                HistoryRecord(history_id, "labelAdded", stored.ref_with_labels(), tuple(added), snapshot)
            )
        if removed:
            self.history.append(
                HistoryRecord(history_id, "labelRemoved", stored.ref_with_labels(), tuple(removed), snapshot)
            )
        return history_id

    def delete(self, message_id: str) -> int:
        stored = self.get(message_id)
        del self.messages[message_id]
        history_id = self._next_history_id()
        self.history.append(HistoryRecord(history_id, "messageDeleted", stored.ref(), (), tuple(stored.label_ids)))
        return history_id

    def expire_history(self) -> None:
        """Forget every record so far: only the current history id (or a later one) is a valid start."""
        self.history.clear()
        self.oldest_valid_start = self.history_id

    def get(self, message_id: str) -> StoredMessage:
        if not re.fullmatch(r"[0-9a-f]{1,16}", message_id):
            raise errors.invalid_argument("Invalid id value")
        try:
            return self.messages[message_id]
        except KeyError:
            raise errors.not_found() from None

    # ---- reads ---------------------------------------------------------------------------------------------------

    def newest_first(self) -> list[StoredMessage]:
        return sorted(self.messages.values(), key=lambda m: (m.internal_date_ms, m.sequence), reverse=True)

    def labels(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for label in SYSTEM_LABELS:
            item: dict[str, Any] = {"id": label, "name": label, "type": "system"}
            if label in _VISIBLE_SYSTEM:
                item["messageListVisibility"] = "hide"
                item["labelListVisibility"] = "labelShow" if label != "UNREAD" else "labelHide"
            out.append(item)
        for label_id, name in self.user_labels.items():
            out.append(
                {
                    "id": label_id,
                    "name": name,
                    "type": "user",
                    "messageListVisibility": "show",
                    "labelListVisibility": "labelShow",
                }
            )
        return out

    def thread_count(self) -> int:
        return len({m.thread_id for m in self.messages.values()})


# ---- search (the `q` parameter): a small, honest subset of Gmail's search operators ---------------------------------

_TERM = re.compile(r"(?P<op>[a-z0-9]+):(?P<value>\S+)$")


def _date_bound(value: str) -> float:
    if value.isdigit():
        return float(value)
    try:
        day = datetime.strptime(value.replace("-", "/"), "%Y/%m/%d").replace(tzinfo=UTC)
    except ValueError:
        raise errors.invalid_argument(f"Invalid date in query: {value}") from None
    return day.timestamp()


def _addresses(message: EmailMessage, *names: str) -> str:
    values = [str(message.get(name, "")) for name in names]
    return " ".join(f"{n} {a}" for n, a in email.utils.getaddresses(values)).lower()


def search_filter(query: str, mailbox: Mailbox) -> tuple[Any, bool]:
    """Compile ``q`` into a predicate; also say whether the query itself reaches into SPAM/TRASH.

    Supported: from:, to:, cc:, subject:, rfc822msgid:, label:, in:(inbox|sent|spam|trash|anywhere),
    is:(unread|read|starred|important), has:attachment, after:, before: (YYYY/MM/DD or epoch seconds), and free
    words, as typed in the Gmail search box: each word of a term must be a whole word (case-insensitive) of the
    subject, the sender and recipients, or a text part. Anything else (OR, quotes, negation, braces) is refused with
    501 rather than answered wrongly.
    """
    tests = []
    reaches_spam_trash = False
    for term in query.split():
        match = _TERM.match(term)
        if (
            not match
            and not term.startswith("-")
            and term not in ("OR", "AND", "AROUND")
            and not set(term) & set('"(){}')
        ):
            words = _WORD.findall(term.lower())
            tests.append(lambda m, w=words: all(word in _searchable_words(m) for word in w))
            continue
        if not match:
            raise errors.not_implemented(f"search term {term!r} in q")
        op, value = match["op"], match["value"].lower()
        if op in ("from", "to", "cc"):
            names = {"from": ("From",), "to": ("To", "Cc", "Bcc") if op == "to" else ("To",), "cc": ("Cc",)}[op]
            tests.append(lambda m, v=value, n=names: v in _addresses(m.parsed, *n))
        elif op == "subject":
            tests.append(lambda m, v=value: v in str(m.parsed.get("Subject", "")).lower())
        elif op == "rfc822msgid":
            wanted_id = value.strip("<>")
            tests.append(lambda m, v=wanted_id: str(m.parsed.get("Message-ID", "")).lower().strip("<> ") == v)
        elif op in ("label", "in"):
            if op == "in" and value == "anywhere":
                reaches_spam_trash = True
                continue
            label = _label_by_name(value, mailbox)
            reaches_spam_trash |= label in ("SPAM", "TRASH")
            tests.append(lambda m, lab=label: lab in m.label_ids)
        elif op == "is" and value in ("unread", "starred", "important"):
            system_label = value.upper()
            tests.append(lambda m, lab=system_label: lab in m.label_ids)
        elif op == "is" and value == "read":
            tests.append(lambda m: "UNREAD" not in m.label_ids)
        elif op == "has" and value == "attachment":
            tests.append(lambda m: any(True for _ in m.parsed.iter_attachments()))
        elif op in ("after", "before"):
            bound = _date_bound(value) * 1000
            if op == "after":
                tests.append(lambda m, b=bound: m.internal_date_ms >= b)
            else:
                tests.append(lambda m, b=bound: m.internal_date_ms < b)
        else:
            raise errors.not_implemented(f"search operator {op!r} in q")
    return (lambda m: all(t(m) for t in tests)), reaches_spam_trash


_WORD = re.compile(r"\w+")


def _searchable_words(message: StoredMessage) -> set[str]:
    """The words free text matches: subject, sender and recipients, and every text part that is no attachment."""
    parsed = message.parsed
    texts = [str(parsed.get("Subject", "")), _addresses(parsed, "From", "To", "Cc")]
    for part in parsed.walk():
        if part.get_content_maintype() != "text" or part.get_content_disposition() == "attachment":
            continue
        try:
            content = part.get_content()
        except (LookupError, ValueError):
            continue
        if isinstance(content, str):
            texts.append(re.sub(r"<[^>]+>", " ", content) if part.get_content_subtype() == "html" else content)
    return set(_WORD.findall(" ".join(texts).lower()))


def _label_by_name(value: str, mailbox: Mailbox) -> str:
    for label in SYSTEM_LABELS:
        if label.lower() == value:
            return label
    for label_id, name in mailbox.user_labels.items():
        if name.lower() == value:
            return label_id
    # Gmail answers an unknown label with no results rather than an error.
    return f"\0unknown:{value}"


def new_message_id_header() -> str:
    return f"<{secrets.token_hex(12)}@mail.gmail.com>"
