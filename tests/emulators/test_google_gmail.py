"""The emulator's Gmail REST subset, called through google-api-python-client built from its shipped discovery
document, with google-auth credentials refreshed against the emulator's token endpoint."""

from __future__ import annotations

import base64
import io
import itertools
import json
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import pytest
from google.auth.exceptions import RefreshError
from googleapiclient.errors import HttpError
from googleapiclient.http import MediaIoBaseUpload

from tests.emulators.google import GoogleEmulator
from tests.emulators.google.flows import METADATA, READONLY, REDIRECT_URI, SEND, credentials, gmail_service, sign_in

USER = "alice@example.test"
ATTACHMENT = bytes(range(256)) * 3

Service = Callable[..., Any]


def google_reason(error: HttpError) -> str:
    """errors[0].reason of a Google JSON error body."""
    return str(json.loads(error.content)["error"]["errors"][0]["reason"])


def plain_message(subject: str = "Quarterly report", sender: str = "bob@example.test", **headers: str) -> bytes:
    message = EmailMessage()
    message["From"] = f"Bob <{sender}>"
    message["To"] = USER
    message["Subject"] = subject
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content("Hello Alice,\nthe numbers are in. It's fine.\n")
    return message.as_bytes()


def message_with_attachment() -> bytes:
    message = EmailMessage()
    message["From"] = "Bob <bob@example.test>"
    message["To"] = USER
    message["Subject"] = "Résumé attached"
    message.set_content("Plain body\n")
    message.add_alternative("<p>HTML <b>body</b></p>\n", subtype="html")
    message.add_attachment(ATTACHMENT, maintype="application", subtype="octet-stream", filename="data.bin")
    return message.as_bytes()


@pytest.fixture
def gmail(google_emulator: GoogleEmulator) -> Service:
    """``gmail(*scopes)`` -> a Gmail service for alice holding a token with exactly those scopes."""
    google_emulator.add_user(USER)
    client = google_emulator.register_client([REDIRECT_URI])

    def service(*scopes: str) -> Any:
        tokens = sign_in(google_emulator, client, USER, scopes, prompt="consent")
        return gmail_service(google_emulator, credentials(google_emulator, client, tokens))

    return service


def test_profile_and_labels(google_emulator: GoogleEmulator, gmail: Service) -> None:
    label_id = google_emulator.add_label(USER, "Receipts")
    google_emulator.deliver(USER, plain_message())
    users = gmail(READONLY).users()

    profile = users.getProfile(userId="me").execute()
    labels = {label["id"]: label for label in users.labels().list(userId="me").execute()["labels"]}

    assert profile["emailAddress"] == USER and profile["messagesTotal"] == 1 and profile["threadsTotal"] == 1
    assert profile["historyId"] == str(google_emulator.history_id(USER))
    for system in ("INBOX", "SENT", "DRAFT", "TRASH", "SPAM", "UNREAD", "STARRED", "IMPORTANT", "CATEGORY_SOCIAL"):
        assert labels[system]["type"] == "system"
    assert labels[label_id] == {
        "id": label_id,
        "name": "Receipts",
        "type": "user",
        "messageListVisibility": "show",
        "labelListVisibility": "labelShow",
    }


def test_messages_list_newest_first_with_labels_paging_and_spam(
    google_emulator: GoogleEmulator, gmail: Service
) -> None:
    ids = [
        google_emulator.deliver(USER, plain_message(f"m{i}"), internal_date_ms=1_700_000_000_000 + i).id
        for i in range(5)
    ]
    spam = google_emulator.deliver(USER, plain_message("spam"), ["SPAM"], 1_800_000_000_000).id
    google_emulator.modify_labels(USER, ids[1], remove=["UNREAD"])
    messages = gmail(READONLY).users().messages()

    first = messages.list(userId="me", maxResults=2).execute()
    second = messages.list(userId="me", maxResults=2, pageToken=first["nextPageToken"]).execute()
    third = messages.list(userId="me", maxResults=2, pageToken=second["nextPageToken"]).execute()
    unread = messages.list(userId="me", labelIds=["INBOX", "UNREAD"]).execute()
    everything = messages.list(userId="me", includeSpamTrash=True).execute()

    assert [m["id"] for m in first["messages"] + second["messages"] + third["messages"]] == ids[::-1]
    assert "nextPageToken" not in third and first["resultSizeEstimate"] == 5
    assert [m["id"] for m in unread["messages"]] == [ids[4], ids[3], ids[2], ids[0]]
    assert everything["messages"][0]["id"] == spam
    with pytest.raises(HttpError) as bad_token:
        messages.list(userId="me", labelIds=["INBOX"], pageToken=first["nextPageToken"]).execute()
    assert bad_token.value.status_code == 400


def test_messages_list_query_subset_and_honest_refusal(google_emulator: GoogleEmulator, gmail: Service) -> None:
    wanted = google_emulator.deliver(USER, plain_message("Invoice 42", "billing@example.test")).id
    google_emulator.deliver(USER, plain_message("Lunch?"))
    messages = gmail(READONLY).users().messages()

    found = messages.list(userId="me", q="from:billing@example.test subject:invoice is:unread").execute()

    assert [m["id"] for m in found["messages"]] == [wanted]
    with pytest.raises(HttpError) as refused:
        messages.list(userId="me", q="invoice OR lunch").execute()
    assert refused.value.status_code == 501  # not an answer Google might give differently


def test_message_formats(google_emulator: GoogleEmulator, gmail: Service) -> None:
    raw = message_with_attachment()
    delivered = google_emulator.deliver(USER, raw)
    messages = gmail(READONLY).users().messages()

    minimal = messages.get(userId="me", id=delivered.id, format="minimal").execute()
    metadata = messages.get(userId="me", id=delivered.id, format="metadata", metadataHeaders=["subject"]).execute()
    full = messages.get(userId="me", id=delivered.id).execute()
    raw_format = messages.get(userId="me", id=delivered.id, format="raw").execute()

    assert "payload" not in minimal and minimal["labelIds"] == ["INBOX", "UNREAD"]
    assert minimal["historyId"] == str(delivered.history_id) and minimal["sizeEstimate"] == len(raw)
    assert minimal["snippet"] == "Plain body"
    assert metadata["payload"]["headers"] == [{"name": "Subject", "value": "Résumé attached"}]
    assert base64.urlsafe_b64decode(raw_format["raw"]) == raw and "payload" not in raw_format
    top = full["payload"]
    assert (top["partId"], top["mimeType"], top["body"]) == ("", "multipart/mixed", {"size": 0})
    alternative, attachment = top["parts"]
    assert [p["partId"] for p in alternative["parts"]] == ["0.0", "0.1"]
    assert base64.urlsafe_b64decode(alternative["parts"][0]["body"]["data"]) == b"Plain body\n"
    assert attachment["partId"] == "1" and attachment["filename"] == "data.bin"
    assert attachment["body"]["size"] == len(ATTACHMENT) and "data" not in attachment["body"]

    fetched = (
        messages.attachments().get(userId="me", messageId=delivered.id, id=attachment["body"]["attachmentId"]).execute()
    )
    assert base64.urlsafe_b64decode(fetched["data"]) == ATTACHMENT and fetched["size"] == len(ATTACHMENT)


def test_unknown_message_and_bad_parameters(google_emulator: GoogleEmulator, gmail: Service) -> None:
    messages = gmail(READONLY).users().messages()
    with pytest.raises(HttpError) as missing:
        messages.get(userId="me", id="abcdef0123456789").execute()
    with pytest.raises(HttpError) as other_user:
        messages.list(userId="carol@example.test").execute()
    with pytest.raises(HttpError) as too_many:
        messages.list(userId="me", maxResults=501).execute()
    assert (missing.value.status_code, google_reason(missing.value)) == (404, "notFound")
    assert (other_user.value.status_code, google_reason(other_user.value)) == (403, "forbidden")
    assert (too_many.value.status_code, google_reason(too_many.value)) == (400, "invalidArgument")


def test_send_json_media_and_multipart(google_emulator: GoogleEmulator, gmail: Service) -> None:
    first = google_emulator.deliver(USER, plain_message(Message_ID="<thread-start@example.test>"))
    messages = gmail(SEND).users().messages()
    outgoing = EmailMessage()
    outgoing["To"] = "bob@example.test"
    outgoing["Bcc"] = "audit@example.test"
    outgoing["Subject"] = "Re: Quarterly report"
    outgoing["In-Reply-To"] = "<thread-start@example.test>"
    outgoing.set_content("Thanks!\n")
    raw = outgoing.as_bytes()

    sent_json = messages.send(userId="me", body={"raw": base64.urlsafe_b64encode(raw).decode()}).execute()
    media = MediaIoBaseUpload(io.BytesIO(raw), mimetype="message/rfc822", resumable=False)
    sent_media = messages.send(userId="me", media_body=media).execute()
    media = MediaIoBaseUpload(io.BytesIO(raw), mimetype="message/rfc822", resumable=False)
    sent_multipart = messages.send(userId="me", body={"threadId": first.thread_id}, media_body=media).execute()

    assert sent_json["labelIds"] == ["SENT"] and sent_json["threadId"] == first.thread_id
    assert {sent_media["threadId"], sent_multipart["threadId"]} == {first.thread_id}
    outbox = google_emulator.sent_messages(USER)
    assert [m.message_id for m in outbox] == [sent_json["id"], sent_media["id"], sent_multipart["id"]]
    for sent in outbox:
        assert sent.recipients == ("bob@example.test", "audit@example.test")
        assert b"audit@example.test" not in sent.raw  # Bcc is not kept
        assert f"From: {USER}\r\n".encode() in sent.raw  # filled in, as Gmail does
        assert b"Message-ID: " in sent.raw and sent.raw.endswith(b"Thanks!\n")
    paths = [r.path for r in google_emulator.requests("/upload/")]
    assert paths == ["/upload/gmail/v1/users/me/messages/send"] * 2
    assert [r.query["uploadType"] for r in google_emulator.requests("/upload/")] == [["media"], ["multipart"]]


def test_send_refuses_a_message_without_recipients(google_emulator: GoogleEmulator, gmail: Service) -> None:
    raw = base64.urlsafe_b64encode(b"Subject: nobody\r\n\r\nhi\r\n").decode()
    with pytest.raises(HttpError) as refused:
        gmail(SEND).users().messages().send(userId="me", body={"raw": raw}).execute()
    assert (refused.value.status_code, google_reason(refused.value)) == (400, "invalidArgument")
    assert google_emulator.sent_messages() == []


def test_history_records_paging_filters_and_expiry(google_emulator: GoogleEmulator, gmail: Service) -> None:
    start = google_emulator.history_id(USER)
    added = google_emulator.deliver(USER, plain_message())
    labelled = google_emulator.modify_labels(USER, added.id, add=["STARRED"], remove=["UNREAD"])
    deleted = google_emulator.delete_message(USER, added.id)
    history = gmail(READONLY).users().history()

    everything = history.list(userId="me", startHistoryId=str(start)).execute()
    first = history.list(userId="me", startHistoryId=str(start), maxResults=1).execute()
    rest = history.list(
        userId="me", startHistoryId=str(start), maxResults=1, pageToken=first["nextPageToken"]
    ).execute()
    only_deleted = history.list(userId="me", startHistoryId=str(start), historyTypes=["messageDeleted"]).execute()
    starred = history.list(userId="me", startHistoryId=str(start), labelId="STARRED").execute()
    nothing_new = history.list(userId="me", startHistoryId=everything["historyId"]).execute()

    records = everything["history"]
    assert [int(r["id"]) for r in records] == [added.history_id, labelled, deleted]
    assert everything["historyId"] == str(deleted)
    assert records[0]["messagesAdded"] == [
        {"message": {"id": added.id, "threadId": added.thread_id, "labelIds": ["INBOX", "UNREAD"]}}
    ]
    assert records[1]["labelsAdded"][0]["labelIds"] == ["STARRED"]
    assert records[1]["labelsRemoved"][0]["labelIds"] == ["UNREAD"]
    assert records[2]["messagesDeleted"] == [{"message": {"id": added.id, "threadId": added.thread_id}}]
    assert first["history"] == records[:1] and rest["history"] == records[1:2]
    assert [r["id"] for r in only_deleted["history"]] == [str(deleted)]
    assert [r["id"] for r in starred["history"]] == [str(labelled), str(deleted)]  # it was starred when deleted
    assert "history" not in nothing_new

    google_emulator.expire_history(USER)

    with pytest.raises(HttpError) as expired:
        history.list(userId="me", startHistoryId=str(start)).execute()
    assert (expired.value.status_code, google_reason(expired.value)) == (404, "notFound")
    assert "history" not in history.list(userId="me", startHistoryId=everything["historyId"]).execute()


def test_history_ids_grow_with_gaps(google_emulator: GoogleEmulator, gmail: Service) -> None:
    ids = [google_emulator.deliver(USER, plain_message()).history_id for _ in range(20)]
    assert ids == sorted(ids)
    assert {b - a for a, b in itertools.pairwise(ids)} != {1}


@pytest.mark.parametrize(
    ("scopes", "call", "status", "reason"),
    [
        ([METADATA], lambda u, m: u.messages().list(userId="me", q="is:unread"), 403, "forbidden"),
        ([METADATA, READONLY], lambda u, m: u.messages().list(userId="me", q="is:unread"), 403, "forbidden"),
        ([METADATA], lambda u, m: u.messages().get(userId="me", id=m), 403, "forbidden"),
        ([METADATA], lambda u, m: u.messages().get(userId="me", id=m, format="raw"), 403, "forbidden"),
        (
            [METADATA],
            lambda u, m: u.messages().attachments().get(userId="me", messageId=m, id="x"),
            403,
            "insufficientPermissions",
        ),
        ([SEND], lambda u, m: u.messages().list(userId="me"), 403, "insufficientPermissions"),
        ([SEND], lambda u, m: u.history().list(userId="me", startHistoryId="1"), 403, "insufficientPermissions"),
        (
            [READONLY],
            lambda u, m: u.messages().send(userId="me", body={"raw": "VG86IGJAZXhhbXBsZS50ZXN0DQoNCmhp"}),
            403,
            "insufficientPermissions",
        ),
    ],
)
def test_scopes_are_enforced_per_method(
    google_emulator: GoogleEmulator, gmail: Service, scopes: list[str], call: Any, status: int, reason: str
) -> None:
    message_id = google_emulator.deliver(USER, plain_message()).id
    with pytest.raises(HttpError) as refused:
        call(gmail(*scopes).users(), message_id).execute()
    assert (refused.value.status_code, google_reason(refused.value)) == (status, reason)


def test_metadata_scope_reads_metadata(google_emulator: GoogleEmulator, gmail: Service) -> None:
    message_id = google_emulator.deliver(USER, plain_message()).id
    users = gmail(METADATA).users()
    listed = users.messages().list(userId="me", labelIds=["INBOX"]).execute()
    got = users.messages().get(userId="me", id=message_id, format="metadata").execute()
    assert listed["messages"][0]["id"] == message_id
    assert {h["name"] for h in got["payload"]["headers"]} >= {"From", "To", "Subject"}
    assert "snippet" not in got  # no body content under gmail.metadata


def test_expired_access_token_is_refreshed_by_the_library(google_emulator: GoogleEmulator, gmail: Service) -> None:
    users = gmail(READONLY).users()
    users.getProfile(userId="me").execute()
    refreshes = google_emulator.counters().get("token.refresh_token", 0)

    google_emulator.expire_access_tokens(USER)
    users.getProfile(userId="me").execute()

    assert google_emulator.counters()["token.refresh_token"] == refreshes + 1
    assert google_emulator.counters()["gmail.error.401"] == 1


def test_revoked_grant_ends_api_access(google_emulator: GoogleEmulator, gmail: Service) -> None:
    users = gmail(READONLY).users()
    google_emulator.revoke_user(USER)
    with pytest.raises(RefreshError, match="invalid_grant"):
        users.getProfile(userId="me").execute()


def test_a_bad_token_is_401_in_googles_shape(google_emulator: GoogleEmulator, gmail: Service) -> None:
    gmail(READONLY)  # registers the user
    response, content = google_emulator.http().request(
        f"{google_emulator.base_url}/gmail/v1/users/me/profile", headers={"Authorization": "Bearer ya29.canary"}
    )
    error = json.loads(content)["error"]
    assert response.status == 401 and 'error="invalid_token"' in response["www-authenticate"]
    assert (error["code"], error["status"], error["errors"][0]["reason"]) == (401, "UNAUTHENTICATED", "authError")


@pytest.mark.parametrize(
    ("status", "reason", "retry_after"),
    [
        (429, "rateLimitExceeded", 7),
        (429, "userRateLimitExceeded", 30),
        (500, "backendError", None),
        (503, "backendError", 2),
    ],
)
def test_injected_faults(
    google_emulator: GoogleEmulator, gmail: Service, status: int, reason: str, retry_after: int | None
) -> None:
    users = gmail(READONLY).users()
    google_emulator.throttle(2, status=status, reason=reason, retry_after=retry_after)

    for _ in range(2):
        with pytest.raises(HttpError) as refused:
            users.getProfile(userId="me").execute()
        assert (refused.value.status_code, google_reason(refused.value)) == (status, reason)
        assert refused.value.resp.get("retry-after") == (str(retry_after) if retry_after is not None else None)
    assert users.getProfile(userId="me").execute()["emailAddress"] == USER
    assert google_emulator.counters()["gmail.throttled"] == 2


def test_unknown_query_parameters_and_unimplemented_methods(google_emulator: GoogleEmulator, gmail: Service) -> None:
    service = gmail(READONLY)
    response, _ = service._http.request(f"{google_emulator.base_url}/gmail/v1/users/me/profile?colour=blue")
    assert response.status == 400
    with pytest.raises(HttpError) as unimplemented:
        service.users().threads().list(userId="me").execute()
    assert unimplemented.value.status_code == 501


def test_partial_responses_with_fields(google_emulator: GoogleEmulator, gmail: Service) -> None:
    delivered = google_emulator.deliver(USER, plain_message())
    messages = gmail(READONLY).users().messages()

    listed = messages.list(userId="me", fields="messages(id),resultSizeEstimate").execute()
    got = messages.get(userId="me", id=delivered.id, format="metadata", fields="id,payload/headers").execute()

    assert listed == {"messages": [{"id": delivered.id}], "resultSizeEstimate": 1}
    assert set(got) == {"id", "payload"} and set(got["payload"]) == {"headers"}
    with pytest.raises(HttpError) as invalid:
        messages.list(userId="me", fields="messages(colour)").execute()
    assert (invalid.value.status_code, google_reason(invalid.value)) == (400, "badRequest")


def test_batch_requests(google_emulator: GoogleEmulator, gmail: Service) -> None:
    from googleapiclient.http import BatchHttpRequest

    ids = [google_emulator.deliver(USER, plain_message(f"m{i}")).id for i in range(3)]
    service = gmail(READONLY)
    results: dict[str, Any] = {}

    def collect(request_id: str, response: Any, exception: HttpError | None) -> None:
        results[request_id] = exception.status_code if exception else response["id"]

    batch = BatchHttpRequest(callback=collect, batch_uri=google_emulator.batch_url)
    for message_id in [*ids, "abcdef0123456789"]:
        batch.add(service.users().messages().get(userId="me", id=message_id, format="minimal"), request_id=message_id)
    batch.execute(http=service._http)

    assert results == {**{i: i for i in ids}, "abcdef0123456789": 404}
    assert google_emulator.counters()["batch"] == 1
    assert google_emulator.counters()["gmail.users.messages.get"] == 4
