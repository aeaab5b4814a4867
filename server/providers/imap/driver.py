"""The IMAP/SMTP driver: imapclient for reading (always EXAMINE and BODY.PEEK, so nothing is marked read),
smtplib for submission, every blocking call in a worker thread on a pooled, logged-in connection."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import smtplib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

from server.domain.blocking import BlockingPool
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
from server.domain.models import AccountProfile, TransportSecurity
from server.errors import CursorExpired, FailedPrecondition, NotFound, OutcomeUnknown
from server.providers import mime
from server.providers.base import ATTACHMENT_CHUNK_BYTES, DriverCapabilities
from server.providers.imap import ids
from server.providers.imap.aioimap import AsyncImap
from server.providers.imap.bodystructure import StructurePart, parts_from_bodystructure, text_sections
from server.providers.imap.connection import (
    Credentials,
    close_imap,
    close_smtp,
    open_imap,
    open_smtp,
    provider_errors,
    tls_context,
)
from server.providers.imap.feed import FolderWatcher
from server.providers.imap.network import NetworkGuard
from server.providers.imap.pool import ImapPool, ImapSession, close_orphan
from server.providers.stats import IMAP, SMTP, ProviderStats

log = logging.getLogger("mailbroker.imap")

ROLES = {
    b"\\sent": FolderRole.SENT,
    b"\\drafts": FolderRole.DRAFTS,
    b"\\trash": FolderRole.TRASH,
    b"\\junk": FolderRole.JUNK,
    b"\\archive": FolderRole.ARCHIVE,
    b"\\all": FolderRole.ALL,
    b"\\flagged": FolderRole.FLAGGED,
    b"\\important": FolderRole.IMPORTANT,
}
UNSELECTABLE = {b"\\noselect", b"\\nonexistent"}
SYSTEM_FLAGS = {b"\\seen", b"\\flagged", b"\\answered", b"\\draft", b"\\deleted", b"\\recent"}
LIST_HEADERS = b"BODY.PEEK[HEADER.FIELDS (FROM TO CC BCC REPLY-TO SUBJECT DATE MESSAGE-ID)]"
SUMMARY_ITEMS = [b"UID", b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", LIST_HEADERS]
METADATA_ITEMS = (b"UID", b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"BODY.PEEK[HEADER]")
FULL_ITEMS = (*METADATA_ITEMS, b"BODYSTRUCTURE")
MAX_BODY_BYTES = 12 * 1024 * 1024  # text + HTML in a FULL view, encoded; under the 16 MiB response limit
SUMMARY_BATCH = 500  # UIDs per FETCH: a feed catching up on thousands of changes stays under command-line limits
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]")
_ESEARCH_COUNT = re.compile(rb"\bCOUNT (\d+)")


@dataclass(frozen=True)
class ImapSettings:
    """Operator settings for every IMAP account (config [imap])."""

    allow_plaintext: bool = False
    ca_file: str | None = None
    pool_size: int = 4
    timeout_seconds: float = 30.0
    # The SSRF guard every IMAP and SMTP connection goes through (config [imap] allowed_networks).
    guard: NetworkGuard = field(default_factory=NetworkGuard)
    stats: ProviderStats = field(default_factory=ProviderStats, compare=False)  # read by the metrics endpoint


CAPABILITIES = DriverCapabilities(
    search=True, labels=False, partial_attachments=True, keeps_sent_copy=False, revocable=False
)


def _item(data: dict[bytes, Any], prefix: bytes) -> Any:
    """A FETCH item by name prefix (servers answer BODY[...] for BODY.PEEK[...], with varying spacing)."""
    for key, value in data.items():
        if key.upper().startswith(prefix):
            return value
    return None


class ImapDriver:
    """One IMAP account: a connection pool for reading, SMTP per send."""

    capabilities = CAPABILITIES
    inbox_id = ids.folder_id("INBOX")

    def __init__(
        self, profile: AccountProfile, credentials: Credentials, blocking: BlockingPool, settings: ImapSettings
    ) -> None:
        if profile.imap_server is None:
            raise FailedPrecondition("the account has no IMAP server", reason="ACCOUNT_MISCONFIGURED")
        servers = (profile.imap_server, profile.smtp_server)
        if not settings.allow_plaintext and any(s and s.security is TransportSecurity.PLAINTEXT for s in servers):
            # Checked on every use, not only at connection time: turning the setting off stops existing accounts.
            raise FailedPrecondition(
                "plaintext connections are not allowed by this broker's configuration", reason="PLAINTEXT_NOT_ALLOWED"
            )
        self._profile = profile
        self._credentials = credentials
        self._blocking = blocking
        self._settings = settings
        self._tls = tls_context(settings.ca_file)
        imap_server = profile.imap_server
        self._pool = ImapPool(
            lambda: open_imap(imap_server, credentials, self._tls, settings.timeout_seconds, settings.guard),
            blocking,
            size=settings.pool_size,
            command_timeout=settings.timeout_seconds,
            stats=settings.stats,
        )
        self._sent_folder: str | None = None

    @property
    def pool(self) -> ImapPool:
        return self._pool

    # Verification (ConnectImapAccount): log in to both servers, store nothing.

    async def verify(self, smtp: bool, timeout: float) -> None:
        """Log in to IMAP (and SMTP when asked) once, without retries, and log out again."""
        assert self._profile.imap_server is not None
        with self._settings.stats.counting(IMAP):
            opening = self._blocking.submit(
                open_imap, self._profile.imap_server, self._credentials, self._tls, timeout, self._settings.guard
            )
            try:
                client = await asyncio.shield(opening)
            except asyncio.CancelledError:  # the caller's deadline: the login may still succeed, and is then undone
                opening.add_done_callback(functools.partial(close_orphan, self._blocking))
                raise
            await self._blocking.run(close_imap, client)
        if smtp:
            assert self._profile.smtp_server is not None
            with self._settings.stats.counting(SMTP):
                session = await self._blocking.run(
                    open_smtp, self._profile.smtp_server, self._credentials, self._tls, timeout, self._settings.guard
                )
                await self._blocking.run(close_smtp, session)

    # Folders

    async def list_folders(self) -> list[Folder]:
        rows = await self._pool.run(lambda s: s.client.list_folders())
        folders = []
        for flags, delimiter, name in rows:
            lowered = {flag.lower() for flag in flags}
            if lowered & UNSELECTABLE:
                continue
            role = (
                FolderRole.INBOX if name.upper() == "INBOX" else next((ROLES[f] for f in lowered if f in ROLES), None)
            )
            parent = None
            if delimiter and isinstance(name, str):
                sep = delimiter.decode() if isinstance(delimiter, bytes) else str(delimiter)
                if sep in name:
                    parent = ids.folder_id(name.rsplit(sep, 1)[0])
            folders.append(Folder(id=ids.folder_id(name), display_name=name, role=role, parent_id=parent))
        return folders

    # Messages

    async def list_messages(
        self, folder_id: str | None, query: str | None, page_size: int, cursor: dict[str, object] | None
    ) -> MessagePage:
        folder = ids.folder_name(folder_id) if folder_id else "INBOX"
        if query:
            check_query(query)
        return await self._pool.run(lambda s: _list_messages(s, folder, query, page_size, cursor))

    async def get_message(self, message_id: str, view: MessageView) -> Message:
        ref = ids.message_ref(message_id)
        return await self._pool.run(lambda s: _get_message(s, ref, view))

    async def stream_attachment(self, message_id: str, attachment_id: str) -> AsyncIterator[AttachmentChunk]:
        ref = ids.message_ref(message_id)
        section = ids.part_section(attachment_id)
        part = await self._pool.run(lambda s: _find_part(s, ref, section))
        decoder = mime.make_decoder(part.encoding)
        # BODYSTRUCTURE gives the part's encoded size, which is what partial fetches count: a range that comes
        # back short of it means the message went away mid-stream, and the stream must fail, not end early.
        expected = part.size_bytes
        fetched = 0
        offset = 0
        first = True
        while True:
            wanted = min(ATTACHMENT_CHUNK_BYTES, expected - fetched)
            raw = b""
            if wanted > 0:
                raw = await self._pool.run(
                    lambda s, start=fetched, size=wanted: _fetch_range(s, ref, section, start, size)  # type: ignore[misc]
                )
                if len(raw) < wanted:
                    raise NotFound("the message changed while it was being read", reason="MESSAGE_NOT_FOUND")
            fetched += len(raw)
            done = fetched >= expected
            data = decoder.feed(raw) + (decoder.finish() if done else b"")
            for begin in range(0, len(data), ATTACHMENT_CHUNK_BYTES):
                piece = data[begin : begin + ATTACHMENT_CHUNK_BYTES]
                yield AttachmentChunk(offset=offset, data=piece, info=_attachment_info(part) if first else None)
                first = False
                offset += len(piece)
            if done:
                break
        if first:  # an empty attachment still announces itself
            yield AttachmentChunk(offset=0, data=b"", info=_attachment_info(part))

    # Sending

    async def send_message(self, built: mime.BuiltMessage, envelope_from: str) -> SendResult:
        if self._profile.smtp_server is None:
            raise FailedPrecondition("the account has no SMTP server", reason="ACCOUNT_MISCONFIGURED")
        smtp_server = self._profile.smtp_server

        def submit() -> tuple[str, ...]:
            # Until the server answers the message, an error means it was not sent; an explicit refusal
            # (recipients, sender, data) too. A connection lost or a timeout mid-transaction leaves it unknown.
            # Some recipients refused and others accepted: it was sent, and the refused ones are reported.
            session = open_smtp(
                smtp_server, self._credentials, self._tls, self._settings.timeout_seconds, self._settings.guard
            )
            try:
                with provider_errors():
                    try:
                        refused = session.sendmail(envelope_from, list(built.envelope_recipients), built.raw)
                    except smtplib.SMTPServerDisconnected as exc:
                        raise OutcomeUnknown() from exc
                    except smtplib.SMTPException:
                        raise  # the server refused: nothing was sent
                    except OSError as exc:  # a timeout or a reset mid-transaction
                        raise OutcomeUnknown() from exc
            finally:
                close_smtp(session)
            return tuple(recipient for recipient in built.envelope_recipients if recipient in refused)

        with self._settings.stats.counting(SMTP):
            refused = await self._blocking.run(submit)
        sent_at = datetime.now(UTC)
        copy_id = ""
        try:
            copy_id = await self._pool.run(lambda s: _append_sent(s, built.raw), retry_lost=False)
        except Exception:  # the message is sent; failing to file a copy must not make the caller send it again
            log.warning("sent copy not filed", exc_info=True, extra={"component": "imap"})
        return SendResult(
            internet_message_id=built.internet_message_id,
            send_time=sent_at,
            message_id=copy_id,
            refused_recipients=refused,
        )

    # Change feeds

    def folder_watcher(self, folder_id: str) -> FolderWatcher:
        """An upstream for the feed hub: IDLE on its own asyncio connection, summaries through the pool."""
        folder = ids.folder_name(folder_id, "folders")
        assert self._profile.imap_server is not None
        server = self._profile.imap_server

        async def connect() -> AsyncImap:
            # Not capped by the caller's deadline: the feed's upstream outlives the call that started it.
            return await AsyncImap.connect(
                server, self._credentials, self._tls, self._settings.timeout_seconds, guard=self._settings.guard
            )

        return FolderWatcher(folder, connect, self.summaries)

    async def summaries(self, folder: str, uidvalidity: int, uids: Sequence[int]) -> dict[int, Message]:
        """METADATA views (without headers) of the given UIDs; empty if the folder's UIDVALIDITY moved on."""

        def fetch(session: ImapSession) -> dict[int, Message]:
            _select(session, folder, fresh=True)
            if session.uidvalidity != uidvalidity:
                return {}
            found: dict[int, Message] = {}
            wanted = list(uids)
            for start in range(0, len(wanted), SUMMARY_BATCH):
                rows = session.client.fetch(wanted[start : start + SUMMARY_BATCH], SUMMARY_ITEMS)
                for uid, data in rows.items():
                    found[uid] = _summary(folder, uidvalidity, uid, data, MessageView.METADATA, with_headers=False)
            return found

        return await self._pool.run(fetch)

    async def close(self) -> None:
        await self._pool.close()


# Blocking helpers: run in a worker thread with a pooled session, inside provider_errors().


def _select(session: ImapSession, folder: str, *, fresh: bool = False, sync: bool = True) -> None:
    """EXAMINE ``folder`` unless the session has it selected already. Then, with ``sync``, a NOOP (far cheaper than
    a new EXAMINE of a large folder) lets the server tell this session of messages added and expunged by others, so
    a listing is never read from a stale view. Reads by UID pass ``sync=False``: the server reports those changes
    after the UID FETCH itself, and ``_fetch_uid`` looks at them (one round trip instead of two)."""
    if session.selected == (folder, True) and not fresh:
        if sync:
            session.client.noop()
        session.take_updates()
        return
    client = session.client
    try:
        info = client.select_folder(folder, readonly=True)
    except IMAPClientError as exc:
        text = str(exc).upper()
        # Missing, or a name the server cannot have at all ("[CANNOT]", "not valid mUTF-7"): no such folder.
        if any(mark in text for mark in ("NONEXISTENT", "DOESN'T EXIST", "NOT EXIST", "[CANNOT]", "NOT VALID")):
            session.selected = None
            raise NotFound("folder not found", reason="FOLDER_NOT_FOUND") from exc
        raise
    session.selected = (folder, True)
    session.uidvalidity = int(info.get(b"UIDVALIDITY", 0))
    session.updates.clear()  # the EXAMINE's own EXISTS is in ``info``
    session.exists = int(info.get(b"EXISTS", 0))


# A UID FETCH of a message another session expunged (RFC 2180 4.1.2): Dovecot answers NO [EXPUNGEISSUED] or
# "no longer exist"; other servers say NO with other words, or return nothing for the UID.
_GONE_MARKS = ("EXPUNGEISSUED", "NO LONGER EXIST", "HAS BEEN DELETED", "EXPUNGED")


def _fetch_uid(session: ImapSession, uid: int, items: Sequence[bytes]) -> dict[bytes, Any] | None:
    """FETCH ``items`` of one message by UID in the selected folder; None when the message does not exist, including
    when the server reports, with this very command, that it was expunged (it may still answer from its cache for a
    message expunged by another session that this session has not been told of yet)."""
    session.take_updates()  # reports left by earlier commands: the window below is this command's alone
    try:
        data = session.client.fetch([uid], list(items)).get(uid)
    except IMAPClientAbortError:
        raise
    except IMAPClientError as exc:
        session.take_updates()
        if any(mark in str(exc).upper() for mark in _GONE_MARKS):
            return None
        raise
    sequence = data.get(b"SEQ") if data else None
    gone = session.take_updates(follow=int(sequence) if isinstance(sequence, int) else None)
    return None if gone or not data else data


def _count_below(client: IMAPClient, below: int) -> int:
    """How many messages have a UID below ``below`` — their sequence numbers are 1..count (RFC 3501 2.3.1.2).

    ESEARCH (RFC 4731) returns just the count, so a 100,000-message folder is never listed in full.
    """
    if below <= 1:
        return 0
    if client.has_capability("ESEARCH"):
        response = client._raw_command_untagged(  # imapclient has no ESEARCH RETURN API
            b"SEARCH", [b"RETURN", b"(COUNT)", b"UID", f"1:{below - 1}".encode()], uid=False, response_name="ESEARCH"
        )
        match = _ESEARCH_COUNT.search(response if isinstance(response, bytes) else b" ".join(response or []))
        return int(match.group(1)) if match else 0
    return len(client.search(["UID", f"1:{below - 1}"]))


def _fetch_by_sequence(client: IMAPClient, low: int, high: int) -> dict[int, dict[bytes, Any]]:
    client.use_uid = False
    try:
        # imapclient keeps only the ids it was given, so a range must be spelled out (at most a page of them).
        return client.fetch(list(range(low, high + 1)), SUMMARY_ITEMS)  # type: ignore[no-any-return]
    finally:
        client.use_uid = True


def _list_messages(
    session: ImapSession, folder: str, query: str | None, page_size: int, cursor: dict[str, object] | None
) -> MessagePage:
    client = session.client
    _select(session, folder)
    if cursor is not None and cursor.get("v") != session.uidvalidity:
        raise CursorExpired("the folder was reset; list it again from the start", reason="PAGE_TOKEN_EXPIRED")
    below = int(cursor["below"]) if cursor is not None else None  # type: ignore[call-overload]
    if query:
        criteria: list[Any] = ["TEXT", query]
        if below is not None:
            criteria += ["UID", f"1:{below - 1}"]
        uids = sorted(client.search(criteria, charset="UTF-8"), reverse=True)
        more = len(uids) > page_size
        rows = client.fetch(uids[:page_size], SUMMARY_ITEMS) if uids else {}
        fetched = [(uid, data) for uid, data in rows.items()]
    else:
        top = session.exists if below is None else _count_below(client, below)
        low = max(1, top - page_size + 1)
        more = low > 1
        rows = _fetch_by_sequence(client, low, top) if top > 0 else {}
        fetched = [(int(data[b"UID"]), data) for data in rows.values() if b"UID" in data]
    if below is not None:  # an expunge between the count and the fetch can shift sequence numbers
        fetched = [(uid, data) for uid, data in fetched if uid < below]
    fetched.sort(key=lambda item: item[0], reverse=True)
    messages = [
        _summary(folder, session.uidvalidity, uid, data, MessageView.METADATA, with_headers=False)
        for uid, data in fetched
    ]
    next_cursor: dict[str, object] | None = None
    if more and fetched:
        next_cursor = {"v": session.uidvalidity, "below": fetched[-1][0]}
    return MessagePage(messages=messages, cursor=next_cursor)


def _summary(
    folder: str, uidvalidity: int, uid: int, data: dict[bytes, Any], view: MessageView, *, with_headers: bool
) -> Message:
    header_block = _item(data, b"BODY[HEADER") or b""
    parsed = mime.parse_headers(header_block)
    flags = [f if isinstance(f, bytes) else str(f).encode() for f in data.get(b"FLAGS", ())]
    lowered = {f.lower() for f in flags}
    received = data.get(b"INTERNALDATE")
    if isinstance(received, datetime) and received.tzinfo is None:
        received = received.replace(tzinfo=UTC)
    return Message(
        id=ids.MessageRef(folder, uidvalidity, uid).id(),
        view=view,
        folder_ids=(ids.folder_id(folder),),
        internet_message_id=parsed.internet_message_id,
        subject=parsed.subject,
        sender=parsed.sender,
        to=parsed.to,
        cc=parsed.cc,
        bcc=parsed.bcc,
        reply_to=parsed.reply_to,
        send_time=parsed.send_time,
        receive_time=received if isinstance(received, datetime) else None,
        size_bytes=int(data.get(b"RFC822.SIZE", 0)),
        read=b"\\seen" in lowered,
        flagged=b"\\flagged" in lowered,
        answered=b"\\answered" in lowered,
        draft=b"\\draft" in lowered,
        keywords=tuple(f.decode("utf-8", "replace") for f in flags if f.lower() not in SYSTEM_FLAGS),
        headers=parsed.headers if with_headers else (),
    )


def _check_uidvalidity(session: ImapSession, ref: ids.MessageRef) -> None:
    try:
        _select(session, ref.folder, sync=False)
    except NotFound as exc:  # the resource asked for is the message: its folder being gone is a detail
        raise NotFound("message not found", reason="MESSAGE_NOT_FOUND") from exc
    if session.uidvalidity != ref.uidvalidity:
        raise NotFound("message not found", reason="MESSAGE_NOT_FOUND")


def _get_message(session: ImapSession, ref: ids.MessageRef, view: MessageView) -> Message:
    _check_uidvalidity(session, ref)
    data = _fetch_uid(session, ref.uid, FULL_ITEMS if view is MessageView.FULL else METADATA_ITEMS)
    if not data:
        raise NotFound("message not found", reason="MESSAGE_NOT_FOUND")
    message = _summary(ref.folder, ref.uidvalidity, ref.uid, data, view, with_headers=True)
    if view is MessageView.METADATA:
        return message
    parts = parts_from_bodystructure(data.get(b"BODYSTRUCTURE"))
    text_part, html_part = text_sections(parts)
    wanted = [p for p in (text_part, html_part) if p is not None]
    if sum(p.size_bytes for p in wanted) > MAX_BODY_BYTES:
        raise FailedPrecondition(
            "the message's text is too large for one response; fetch it as an attachment", reason="BODY_TOO_LARGE"
        )
    bodies: dict[str, str] = {}
    if wanted:
        fetched = _fetch_uid(session, ref.uid, [f"BODY.PEEK[{p.section}]".encode() for p in wanted])
        if fetched is None:
            raise NotFound("message not found", reason="MESSAGE_NOT_FOUND")
        for part in wanted:
            raw = _item(fetched, f"BODY[{part.section}]".encode()) or b""
            bodies[part.section] = _decode_text(raw, part)
    attachments = tuple(_attachment_info(p) for p in parts if p.is_attachment)
    return Message(
        **{
            **message.__dict__,
            "text_body": bodies.get(text_part.section, "") if text_part else "",
            "html_body": bodies.get(html_part.section, "") if html_part else "",
            "attachments": attachments,
        }
    )


def _decode_text(raw: bytes, part: StructurePart) -> str:
    decoder = mime.make_decoder(part.encoding)
    data = decoder.feed(raw) + decoder.finish()
    return mime.decode_text(data, part.charset)


def _attachment_info(part: StructurePart) -> AttachmentInfo:
    return AttachmentInfo(
        id=ids.part_id(part.section),
        filename=part.filename,
        content_type=part.content_type,
        size_bytes=mime.decoded_size_estimate(part.size_bytes, part.encoding),
        inline=part.inline,
        content_id=part.content_id,
    )


def _find_part(session: ImapSession, ref: ids.MessageRef, section: str) -> StructurePart:
    _check_uidvalidity(session, ref)
    data = _fetch_uid(session, ref.uid, [b"BODYSTRUCTURE"])
    if not data:
        raise NotFound("message not found", reason="MESSAGE_NOT_FOUND")
    for part in parts_from_bodystructure(data.get(b"BODYSTRUCTURE")):
        if part.section == section and part.is_attachment:
            return part
    raise NotFound("attachment not found", reason="ATTACHMENT_NOT_FOUND")


def _fetch_range(session: ImapSession, ref: ids.MessageRef, section: str, start: int, size: int) -> bytes:
    _check_uidvalidity(session, ref)
    data = _fetch_uid(session, ref.uid, [f"BODY.PEEK[{section}]<{start}.{size}>".encode()])
    if not data:
        raise NotFound("message not found", reason="MESSAGE_NOT_FOUND")
    value = _item(data, f"BODY[{section}]".encode())
    return bytes(value or b"")


def _sent_folder(client: IMAPClient) -> str | None:
    for flags, _, name in client.list_folders():
        if b"\\sent" in {f.lower() for f in flags}:
            return str(name)
    return None


def _append_sent(session: ImapSession, raw: bytes) -> str:
    """File a copy in the Sent folder (marked read); the copy's message id when the server says (UIDPLUS)."""
    client = session.client
    folder = _sent_folder(client)
    if folder is None:
        return ""
    response = client.append(folder, raw, flags=[b"\\Seen"])
    match = _APPENDUID.search(response if isinstance(response, bytes) else b"")
    if not match:
        return ""
    return ids.MessageRef(folder, int(match.group(1)), int(match.group(2))).id()
