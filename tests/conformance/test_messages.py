"""list_messages and get_message: order, paging, search, decoding, views, ids, and never marking anything read."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from server.domain.feeds import FeedHub
from server.domain.mail import EmailAddress, Message, MessagePage, MessageView
from server.errors import BrokerError, InvalidArgument, NotFound
from server.providers.base import MailDriver
from tests.conformance import samples
from tests.conformance.backends import Backend, Flag


def _relay(cursor: dict[str, object] | None) -> dict[str, object] | None:
    """A cursor as the domain hands it back: sealed as JSON into a page token and opened again."""
    return None if cursor is None else json.loads(json.dumps(cursor))


async def _walk(driver: MailDriver, folder_id: str | None, query: str | None, page_size: int) -> list[MessagePage]:
    pages = []
    cursor: dict[str, object] | None = None
    while True:
        page = await driver.list_messages(folder_id, query, page_size, _relay(cursor))
        pages.append(page)
        assert len(pages) < 100, "paging does not end"
        cursor = page.cursor
        if cursor is None:
            return pages


def _mids(messages: list[Message]) -> list[str]:
    return [m.internet_message_id for m in messages]


async def _seed(backend: Backend, subjects: list[str], **kwargs: Any) -> list[str]:
    mids = []
    for subject in subjects:
        raw, mid = samples.simple(subject, **kwargs)
        await backend.seed(raw)
        mids.append(mid)
    return mids


# --- list_messages ---------------------------------------------------------------------------------------------------


async def test_an_empty_folder_lists_as_one_empty_page_without_a_cursor(backend: Backend) -> None:
    driver = await backend.new_driver()
    for folder_id in (None, driver.inbox_id):
        page = await driver.list_messages(folder_id, None, 10, None)
        assert page.messages == []
        assert page.cursor is None


async def test_paging_walks_every_message_once_newest_first(backend: Backend) -> None:
    driver = await backend.new_driver()
    seeded = await _seed(backend, [f"Message {n:02}" for n in range(23)])

    pages = await _walk(driver, None, None, 5)

    assert [len(p.messages) for p in pages] == [5, 5, 5, 5, 3]
    listed = [m for p in pages for m in p.messages]
    assert _mids(listed) == list(reversed(seeded)), "not every message exactly once, newest first"
    assert len({m.id for m in listed}) == 23, "message ids are not unique"
    assert [m.subject for m in listed] == [f"Message {n:02}" for n in reversed(range(23))]
    for message in listed:
        assert message.view is MessageView.METADATA
        assert message.folder_ids == (driver.inbox_id,)
        assert not message.read
        assert message.text_body == message.html_body == "" and message.attachments == ()

    # The inbox by its id lists the same as "no folder".
    by_id = await _walk(driver, driver.inbox_id, None, 5)
    assert [m.id for p in by_id for m in p.messages] == [m.id for m in listed]


async def test_a_page_that_ends_exactly_at_the_last_message(backend: Backend) -> None:
    driver = await backend.new_driver()
    seeded = await _seed(backend, [f"Even {n}" for n in range(6)])

    pages = await _walk(driver, None, None, 3)

    # A cursor may be returned for a last page that turns out empty, but no message may be missed or repeated.
    listed = [m for p in pages for m in p.messages]
    assert _mids(listed) == list(reversed(seeded))
    assert [len(p.messages) for p in pages] in ([3, 3], [3, 3, 0])


async def test_message_flags_are_listed(backend: Backend) -> None:
    driver = await backend.new_driver()
    plain, read, flagged = (samples.simple(s) for s in ("plain", "already read", "flagged"))
    await backend.seed(plain[0])
    await backend.seed(read[0], flags=[Flag.READ])
    await backend.seed(flagged[0], flags=[Flag.FLAGGED])

    state = {
        m.internet_message_id: (m.read, m.flagged) for m in (await driver.list_messages(None, None, 10, None)).messages
    }

    assert state == {plain[1]: (False, False), read[1]: (True, False), flagged[1]: (False, True)}


async def test_message_ids_are_url_safe_and_stable_across_driver_instances(backend: Backend) -> None:
    driver = await backend.new_driver()
    await _seed(backend, [f"Stable {n}" for n in range(4)])

    first = (await driver.list_messages(None, None, 10, None)).messages
    again = (await driver.list_messages(None, None, 10, None)).messages
    other_driver = await backend.another_driver()
    other = (await other_driver.list_messages(None, None, 10, None)).messages

    assert all(m.id and m.id.replace("-", "").replace("_", "").isalnum() and m.id.isascii() for m in first)
    assert [m.id for m in again] == [m.id for m in first]
    assert [m.id for m in other] == [m.id for m in first]
    # An id from one driver instance opens the message on another.
    fetched = await other_driver.get_message(first[-1].id, MessageView.METADATA)
    assert fetched.id == first[-1].id
    assert fetched.internet_message_id == first[-1].internet_message_id


async def test_a_query_lists_only_matching_messages(backend: Backend) -> None:
    driver = await backend.new_driver()
    if not driver.capabilities.search:
        pytest.skip(f"{backend.name} cannot search")
    wanted: list[str] = []
    for n in range(7):
        raw, mid = samples.simple(f"Report {n}", body=f"Entry {n}: the quokka count is {n}.\n")
        await backend.seed(raw)
        wanted.append(mid)
        raw, _ = samples.simple(f"Other {n}", body=f"Entry {n}: the wombat count is {n}.\n")
        await backend.seed(raw)

    pages = await _walk(driver, None, "quokka", 3)
    assert _mids([m for p in pages for m in p.messages]) == list(reversed(wanted)), "a query page lists the wrong set"
    assert all(len(p.messages) <= 3 for p in pages)

    assert (await driver.list_messages(None, "platypus", 10, None)).messages == []
    subject_match = await driver.list_messages(None, "Other 3", 10, None)
    assert [m.subject for m in subject_match.messages] == ["Other 3"]


async def test_paging_stays_exact_while_the_folder_changes(backend: Backend) -> None:
    if not backend.exact_paging_under_change:
        pytest.skip(f"{backend.name} pages with the provider's own page tokens")
    driver = await backend.new_driver()
    seeded = await _seed(backend, [f"Changing {n}" for n in range(10)])
    first = await driver.list_messages(None, None, 4, None)
    assert _mids(first.messages) == list(reversed(seeded))[:4]
    assert first.cursor is not None

    # Between pages: one listed and one not yet listed message go away, two new ones arrive.
    await backend.delete(seeded[8])
    await backend.delete(seeded[2])
    await _seed(backend, ["Newcomer 1", "Newcomer 2"])
    rest = await _walk_from(driver, first.cursor, 4)

    # Every message that was there throughout is listed exactly once; the deleted one that was not yet listed is not.
    remaining = [mid for mid in reversed(seeded) if mid not in (seeded[8], seeded[2])]
    listed = _mids(first.messages) + _mids(rest)
    assert [mid for mid in listed if mid in remaining] == remaining, "a message was skipped or repeated"
    assert seeded[2] not in listed, "a deleted message was listed"


async def _walk_from(driver: MailDriver, cursor: dict[str, object], page_size: int) -> list[Message]:
    messages: list[Message] = []
    position: dict[str, object] | None = cursor
    while position is not None:
        page = await driver.list_messages(None, None, page_size, _relay(position))
        messages.extend(page.messages)
        position = page.cursor
        assert len(messages) < 100, "paging does not end"
    return messages


# Queries with characters that mean something in a provider's query or command syntax. The last one is an IMAP
# command injection (a line break ends the SEARCH command; the lines after it would run as commands of their own).
QUERIES = [
    "Grüße",
    'say "hi"',
    "back\\slash",
    "50%_off*",
    "(",
    ")",
    "{5}",
    "\x00",
    "a\r\nX1 SELECT INBOX\r\nX2 STORE 1:* +FLAGS (Injected)\r\nX3 NOOP",
]


async def test_a_query_with_any_characters_is_answered_or_refused_and_changes_nothing(backend: Backend) -> None:
    driver = await backend.new_driver()
    if not driver.capabilities.search:
        pytest.skip(f"{backend.name} cannot search")
    raw, mid = samples.simple("Grüße aus 日本語 land", body='He said "hi" about 50%_off* and back\\slash.\n')
    await backend.seed(raw)
    raw, other = samples.simple("unrelated")
    await backend.seed(raw)

    outcomes: dict[str, str] = {}
    for number, query in enumerate(QUERIES):
        try:
            page = await driver.list_messages(None, query, 10, None)
        except InvalidArgument:
            outcomes[f"query {number}"] = "refused"  # refusing a query is fine
        except BrokerError as exc:
            outcomes[f"query {number}"] = f"{type(exc).__name__} {exc.reason}"
        else:
            matched = _mids(page.messages)
            outcomes[f"query {number}"] = "answered" if matched in ([], [mid]) else "matched the wrong message"

    listed = (await driver.list_messages(None, None, 10, None)).messages
    assert [m.keywords for m in listed] == [(), ()], "a query changed the mailbox"
    assert await backend.flags(mid) == await backend.flags(other) == frozenset(), "a query changed the mailbox"
    assert {n: o for n, o in outcomes.items() if o not in ("answered", "refused")} == {}, "queries failed"
    for query in ("Grüße", "日本語", "hi"):
        page = await driver.list_messages(None, query, 10, None)
        assert _mids(page.messages) == [mid], "a query did not find the message that contains it"


# --- get_message -----------------------------------------------------------------------------------------------------


async def _rich(backend: Backend) -> tuple[MailDriver, Message, str]:
    driver = await backend.new_driver()
    raw, mid = samples.rich()
    await backend.seed(raw)
    (listed,) = (await driver.list_messages(None, None, 10, None)).messages
    return driver, listed, mid


async def test_the_metadata_view_has_decoded_headers_and_no_bodies(backend: Backend) -> None:
    driver, listed, mid = await _rich(backend)

    message = await driver.get_message(listed.id, MessageView.METADATA)

    assert message.view is MessageView.METADATA
    assert message.id == listed.id
    assert message.internet_message_id == mid
    assert message.subject == samples.RICH_SUBJECT, "the RFC 2047 subject is not decoded"
    assert message.sender == EmailAddress(*samples.RICH_SENDER), "the sender is not decoded"
    assert message.to == (EmailAddress(*samples.RICH_TO),), "the recipients are not decoded"
    assert message.cc == (EmailAddress(samples.RICH_CC),)
    assert message.send_time == samples.RICH_DATE
    assert message.receive_time is not None
    if backend.reports_message_size:
        assert message.size_bytes > 0
    else:
        assert message.size_bytes == 0, "a size the provider does not report"
    names = {name.lower() for name, _ in message.headers}
    assert {"from", "to", "subject", "date", "message-id", "content-type"} <= names, "headers are missing"
    assert next(value for name, value in message.headers if name.lower() == "subject") == samples.RICH_SUBJECT, (
        "header values are not decoded"
    )
    assert message.text_body == "" and message.html_body == "", "the metadata view carries a body"
    assert message.attachments == (), "the metadata view lists attachments"


async def test_the_full_view_has_bodies_and_attachments(backend: Backend) -> None:
    driver, listed, mid = await _rich(backend)

    message = await driver.get_message(listed.id, MessageView.FULL)

    assert message.view is MessageView.FULL
    assert message.internet_message_id == mid
    assert message.subject == samples.RICH_SUBJECT
    assert message.sender == EmailAddress(*samples.RICH_SENDER)
    assert message.text_body.replace("\r\n", "\n") == samples.RICH_TEXT
    assert samples.RICH_HTML_MARK in message.html_body
    assert message.html_body.lstrip().startswith("<html>")
    by_name = {a.filename: a for a in message.attachments}
    assert set(by_name) == {"logo.png", samples.PDF_NAME}, "the attachment list is wrong"
    image, pdf = by_name["logo.png"], by_name[samples.PDF_NAME]
    assert (image.content_type, image.inline, image.content_id) == ("image/png", True, samples.IMAGE_CID)
    assert (pdf.content_type, pdf.inline, pdf.content_id) == ("application/pdf", False, "")
    assert image.id != pdf.id
    for attachment in message.attachments:
        assert attachment.id.replace("-", "").replace("_", "").isalnum() and attachment.id.isascii()
    # Sizes are decoded sizes, close enough for a progress bar.
    assert abs(pdf.size_bytes - len(samples.PDF_BYTES)) <= len(samples.PDF_BYTES) // 20
    assert abs(image.size_bytes - len(samples.IMAGE_BYTES)) <= len(samples.IMAGE_BYTES) // 20


async def test_reading_never_marks_a_message_read(backend: Backend) -> None:
    driver, listed, mid = await _rich(backend)

    await driver.get_message(listed.id, MessageView.METADATA)
    await driver.get_message(listed.id, MessageView.FULL)
    info = (await driver.get_message(listed.id, MessageView.FULL)).attachments[0]
    async for _ in driver.stream_attachment(listed.id, info.id):
        pass

    assert Flag.READ not in await backend.flags(mid), "the provider has the message as read"
    (again,) = (await driver.list_messages(None, None, 10, None)).messages
    assert again.read is False
    assert (await (await backend.another_driver()).get_message(listed.id, MessageView.METADATA)).read is False


async def test_a_deleted_message_is_not_found(backend: Backend) -> None:
    driver, listed, mid = await _rich(backend)
    await backend.delete(mid)

    for view in MessageView:
        with pytest.raises(NotFound) as caught:
            await driver.get_message(listed.id, view)
        assert caught.value.reason == "MESSAGE_NOT_FOUND"


async def test_a_message_of_a_deleted_folder_is_not_found(backend: Backend) -> None:
    if not backend.has_folders:
        pytest.skip(f"{backend.name} has no folders to delete")
    driver = await backend.new_driver()
    await backend.create_folder("Old Projects")
    raw, mid = samples.simple("kept in a folder")
    await backend.seed(raw, folder_name="Old Projects")
    (folder,) = [f for f in await driver.list_folders() if f.display_name == "Old Projects"]
    (listed,) = (await driver.list_messages(folder.id, None, 10, None)).messages
    await backend.delete(mid)
    await backend.delete_folder("Old Projects")

    # The caller asked for a message: that it lived in a folder is the driver's business.
    with pytest.raises(NotFound) as caught:
        await driver.get_message(listed.id, MessageView.METADATA)
    assert caught.value.reason == "MESSAGE_NOT_FOUND"


# Ids a caller might make up. Some are crafted against id schemes drivers use (base64url of a binary record, of a
# folder name that carries protocol syntax), but to any other driver they are just unknown ids.
MADE_UP_IDS = [
    "",
    "x",
    "not an id",
    "../../etc/passwd",
    "a/b",
    "%00",
    "é",
    "A" * 5000,
    "AAAAAAAAAAA",  # a zero UID and an empty folder
    "AAAAAQAAAAFJTkJPWA",  # UIDVALIDITY 1, UID 1, INBOX
    "AAAAAQAAAAFJTkJPWCINCkEgTE9HT1VU",  # ... a folder 'INBOX"<CRLF>A LOGOUT'
    "AAAAAQAAAAFOb1N1Y2hGb2xkZXI",  # ... a folder that does not exist
    "AAAAAQAAAAH_",  # ... a folder that is not UTF-8
    "AAAAAQAAAAFJTkJPWAA",  # ... a folder 'INBOX<NUL>'
]
ACCEPTED_REFUSALS = {(InvalidArgument, "INVALID_RESOURCE_NAME"), (NotFound, "MESSAGE_NOT_FOUND")}


@pytest.mark.parametrize("made_up", MADE_UP_IDS)
async def test_a_made_up_message_id_is_refused(backend: Backend, made_up: str) -> None:
    driver = await backend.new_driver()
    raw, _ = samples.simple("the only message")
    await backend.seed(raw)

    for view in MessageView:
        with pytest.raises((InvalidArgument, NotFound)) as caught:
            await driver.get_message(made_up, view)
        assert (type(caught.value), caught.value.reason) in ACCEPTED_REFUSALS

    # The driver still works afterwards (a refused id did not break its connection).
    assert len((await driver.list_messages(None, None, 10, None)).messages) == 1


MADE_UP_FOLDER_IDS = [
    "x",
    "not an id",
    "a/b",
    "é",
    "A" * 5000,
    "Tm9wZQ",  # base64url of a name that is no folder
    "SU5CT1gA",  # ... 'INBOX<NUL>'
    "SU5CT1giDQpYMSBMT0dPVVQ",  # ... 'INBOX"<CRLF>X1 LOGOUT'
    "ezV9",  # ... '{5}', an IMAP literal
    "Li4vSU5CT1g",  # ... '../INBOX'
]


@pytest.mark.parametrize("made_up", MADE_UP_FOLDER_IDS)
async def test_a_made_up_folder_id_is_refused(backend: Backend, feed_hub: FeedHub, made_up: str) -> None:
    driver = await backend.new_driver()
    raw, _ = samples.simple("the only message")
    await backend.seed(raw)
    refusals = {(InvalidArgument, "INVALID_RESOURCE_NAME"), (NotFound, "FOLDER_NOT_FOUND")}

    with pytest.raises((InvalidArgument, NotFound)) as listing:
        await driver.list_messages(made_up, None, 10, None)
    assert (type(listing.value), listing.value.reason) in refusals

    # A feed of it is refused too: when the hub asks for the watcher, or when the watcher starts.
    async def watch() -> None:
        subscriber = feed_hub.subscribe("conformance", made_up, lambda: driver.folder_watcher(made_up), None)
        await asyncio.wait_for(subscriber.start, 10)

    with pytest.raises((InvalidArgument, NotFound)) as watching:
        await watch()
    assert (type(watching.value), watching.value.reason) in refusals

    assert len((await driver.list_messages(None, None, 10, None)).messages) == 1
