"""send_message: one submission, Bcc in the envelope only, the sent copy filed where the provider does not."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from server.domain.mail import EmailAddress, FolderRole, MessageView, OutgoingAttachment, OutgoingMessage
from server.providers import mime
from tests.conformance.backends import Backend

BCC = "hidden.copy@example.test"


def _outgoing() -> OutgoingMessage:
    return OutgoingMessage(
        to=(EmailAddress("first.reader@example.test", "Zoë Æbelø"),),
        cc=(EmailAddress("second.reader@example.test"),),
        bcc=(EmailAddress(BCC, "Quiet Observer"),),
        subject="Quartalszahlen für Q3 — vertraulich",
        text_body="Hallo,\nanbei die Zahlen.\n",
        html_body="<p>Hallo,</p><p>anbei die Zahlen.</p>",
        attachments=(
            OutgoingAttachment(filename="zahlen.csv", content=b"quarter,total\nq3,42\n", content_type="text/csv"),
        ),
    )


async def test_a_sent_message_is_submitted_once_with_bcc_only_in_the_envelope(backend: Backend) -> None:
    driver = await backend.new_driver()
    built = mime.build_message(
        _outgoing(), EmailAddress(backend.address, "Conformance Tester"), message_id_domain="conformance.example.test"
    )
    before = datetime.now(UTC)

    result = await driver.send_message(built, backend.address)

    assert result.internet_message_id == built.internet_message_id
    assert result.send_time is not None and result.send_time.tzinfo is not None
    assert before - timedelta(seconds=5) <= result.send_time <= datetime.now(UTC) + timedelta(seconds=5)
    sent = await backend.sent_messages()
    assert len(sent) == 1, "the provider did not accept exactly one message"
    (accepted,) = sent
    assert accepted.envelope_from.lower() == backend.address.lower()
    assert {r.lower() for r in accepted.envelope_recipients} == {
        "first.reader@example.test",
        "second.reader@example.test",
        BCC,
    }, "the envelope recipients are not To, Cc and Bcc"
    headers = mime.parse_headers(accepted.raw)
    assert headers.internet_message_id == built.internet_message_id
    assert not any(name.lower() == "bcc" for name, _ in headers.headers), "a Bcc header was sent"
    leaked = BCC.encode() in accepted.raw.lower()
    assert not leaked, "the Bcc address is in the sent message"


async def test_the_sent_copy_is_filed_and_named(backend: Backend) -> None:
    driver = await backend.new_driver()
    built = mime.build_message(_outgoing(), EmailAddress(backend.address), message_id_domain="conformance.example.test")

    result = await driver.send_message(built, backend.address)

    if driver.capabilities.keeps_sent_copy and not result.message_id:
        return  # the provider files the copy itself and did not name it: nothing of the driver's to check
    assert result.message_id, "the driver filed a sent copy but did not name it"
    copy = await driver.get_message(result.message_id, MessageView.FULL)
    assert copy.internet_message_id == built.internet_message_id
    assert copy.subject == "Quartalszahlen für Q3 — vertraulich"
    assert [a.filename for a in copy.attachments] == ["zahlen.csv"]
    assert copy.read, "the sent copy is unread"
    (sent_folder,) = [f for f in await driver.list_folders() if f.role is FolderRole.SENT]
    assert sent_folder.id in copy.folder_ids, "the copy is not in the Sent folder"
    listed = (await driver.list_messages(sent_folder.id, None, 10, None)).messages
    assert [m.id for m in listed] == [result.message_id]
    assert (await driver.list_messages(None, None, 10, None)).messages == [], "the copy went to the inbox"
