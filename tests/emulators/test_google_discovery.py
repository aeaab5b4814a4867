"""Every JSON body the emulator serves for a Gmail resource conforms to the schema the shipped discovery document
names for the method — and the schema walker that says so can fail."""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import pytest
from googleapiclient.http import MediaIoBaseUpload

from tests.emulators.google import GoogleEmulator
from tests.emulators.google.discovery import gmail_discovery, gmail_methods, method_by_id, validate
from tests.emulators.google.flows import METADATA, READONLY, REDIRECT_URI, SEND, credentials, gmail_service, sign_in
from tests.emulators.test_google_gmail import USER, message_with_attachment, plain_message

IMPLEMENTED = {
    "gmail.users.getProfile",
    "gmail.users.labels.list",
    "gmail.users.messages.list",
    "gmail.users.messages.get",
    "gmail.users.messages.attachments.get",
    "gmail.users.messages.send",
    "gmail.users.history.list",
}


def _exercise_every_endpoint(google: GoogleEmulator) -> None:
    google.add_user(USER)
    client = google.register_client([REDIRECT_URI])
    read = gmail_service(google, credentials(google, client, sign_in(google, client, USER, [READONLY])))
    metadata_only = gmail_service(
        google, credentials(google, client, sign_in(google, client, USER, [METADATA], prompt="consent"))
    )
    send = gmail_service(google, credentials(google, client, sign_in(google, client, USER, [SEND], prompt="consent")))
    google.add_label(USER, "Projects")
    start = google.history_id(USER)
    with_attachment = google.deliver(USER, message_with_attachment())
    plain = google.deliver(USER, plain_message(), ["INBOX", "UNREAD", "CATEGORY_UPDATES", "IMPORTANT"])
    google.modify_labels(USER, plain.id, add=["STARRED"], remove=["UNREAD"])
    users = read.users()
    users.getProfile(userId="me").execute()
    users.labels().list(userId="me").execute()
    users.messages().list(userId="me").execute()
    users.messages().list(userId="me", maxResults=1, q="is:unread").execute()
    users.messages().list(userId="me", labelIds=["SPAM"]).execute()  # empty
    for fmt in ("minimal", "metadata", "full", "raw"):
        for message in (with_attachment, plain):
            users.messages().get(userId="me", id=message.id, format=fmt).execute()
    full = users.messages().get(userId="me", id=with_attachment.id).execute()
    attachment_id = full["payload"]["parts"][1]["body"]["attachmentId"]
    users.messages().attachments().get(userId="me", messageId=with_attachment.id, id=attachment_id).execute()
    metadata_only.users().messages().get(userId="me", id=plain.id, format="metadata").execute()
    raw = plain_message("outgoing")
    send.users().messages().send(userId="me", body={"raw": base64.urlsafe_b64encode(raw).decode()}).execute()
    media = MediaIoBaseUpload(io.BytesIO(raw), mimetype="message/rfc822", resumable=False)
    send.users().messages().send(userId="me", media_body=media).execute()
    google.delete_message(USER, with_attachment.id)
    users.history().list(userId="me", startHistoryId=str(start)).execute()
    users.history().list(userId="me", startHistoryId=str(start), maxResults=1).execute()
    users.history().list(userId="me", startHistoryId=str(google.history_id(USER))).execute()


def test_every_gmail_response_matches_its_discovery_schema(google_emulator: GoogleEmulator) -> None:
    _exercise_every_endpoint(google_emulator)

    responses = google_emulator.gmail_responses()

    assert {method_id for method_id, _, _ in responses} == IMPLEMENTED
    problems = []
    for method_id, schema, body in responses:
        assert schema == method_by_id(method_id).response
        problems += [f"{method_id}: {p}" for p in validate(body, {"$ref": schema})]
    assert problems == []


def test_the_routes_are_the_paths_the_client_library_builds(google_emulator: GoogleEmulator) -> None:
    _exercise_every_endpoint(google_emulator)
    paths = {r.path for r in google_emulator.requests("/gmail/") + google_emulator.requests("/upload/")}
    assert "/gmail/v1/users/me/profile" in paths
    assert "/gmail/v1/users/me/history" in paths
    assert "/upload/gmail/v1/users/me/messages/send" in paths
    assert all(r.status == 200 for r in google_emulator.requests("/gmail/"))


# ---- the walker itself ------------------------------------------------------------------------------------------

GOOD_MESSAGE: dict[str, Any] = {
    "id": "18c1f2a3b4c5d6e7",
    "threadId": "18c1f2a3b4c5d6e7",
    "labelIds": ["INBOX"],
    "historyId": "123456",
    "internalDate": "1700000000000",
    "sizeEstimate": 1234,
    "payload": {
        "partId": "",
        "mimeType": "text/plain",
        "filename": "",
        "headers": [{"name": "Subject", "value": "x"}],
        "body": {"size": 2, "data": "aGk="},
    },
}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"colour": "blue"}, "unknown property 'colour'"),
        ({"historyId": 123456}, "expected a string"),
        ({"historyId": "12x"}, "not a uint64"),
        ({"internalDate": 1700000000000}, "expected a string"),
        ({"sizeEstimate": "1234"}, "expected an integer"),
        ({"sizeEstimate": 2**31}, "out of range"),
        ({"labelIds": "INBOX"}, "expected an array"),
        ({"payload": {"body": {"data": "not base64!"}}}, "not base64"),
        ({"payload": {"headers": [{"name": "a", "value": "b", "extra": 1}]}}, "unknown property 'extra'"),
    ],
)
def test_the_walker_rejects_what_the_schema_does_not_allow(change: dict[str, Any], problem: str) -> None:
    assert validate(GOOD_MESSAGE, {"$ref": "Message"}) == []
    problems = validate({**GOOD_MESSAGE, **change}, {"$ref": "Message"})
    assert any(problem in p for p in problems), problems


def test_the_walker_checks_enums_and_additional_properties() -> None:
    label = {"id": "Label_1", "name": "x", "type": "user", "messageListVisibility": "sometimes"}
    assert any("not one of" in p for p in validate(label, {"$ref": "Label"}))
    schema = {"type": "object", "additionalProperties": {"type": "string", "format": "int64"}}
    assert validate({"a": "-5", "b": "7"}, schema) == []
    assert validate({"a": 5}, schema) != []


def test_every_gmail_method_has_a_route() -> None:
    methods = gmail_methods()
    assert {m.id for m in methods} >= IMPLEMENTED
    for method in methods:
        sample = re.sub(r"\{\+?(\w+)\}", "x1", method.path)
        assert method.pattern.fullmatch(f"/{gmail_discovery()['servicePath']}{sample}"), method.id
    assert not method_by_id("gmail.users.messages.get").pattern.fullmatch("/gmail/v1/users/me/messages/a/b")
