"""The emulator's Graph v1.0 mail subset, called with plain requests the way a Graph driver calls Microsoft's."""

from __future__ import annotations

import base64
import threading
from email.message import EmailMessage
from typing import Any

import pytest
import requests

from tests.emulators.microsoft import App, MicrosoftEmulator, fixtures
from tests.emulators.microsoft.flows import REDIRECT_URI, graph, sign_in

microsoft_emulator = fixtures.microsoft_emulator
USER = "alice@contoso.test"
BOB = "bob@contoso.test"


@pytest.fixture
def app(microsoft_emulator: MicrosoftEmulator) -> App:
    microsoft_emulator.add_user(USER, display_name="Alice Liddell")
    microsoft_emulator.add_user(BOB)
    return microsoft_emulator.register_app([REDIRECT_URI])


def _session(ms: MicrosoftEmulator, app: App, scopes: list[str], user: str = USER) -> requests.Session:
    tokens = sign_in(ms, app, user, scopes)
    assert "access_token" in tokens, tokens.get("error")
    return graph(ms, tokens["access_token"])


def _message(subject: str, *, body: str = "Hello there", reply_to: str | None = None, **headers: str) -> bytes:
    message = EmailMessage()
    message["From"] = "Carol <carol@example.test>"
    message["To"] = f"Alice Liddell <{USER}>"
    message["Cc"] = "dave@example.test"
    message["Subject"] = subject
    message["Message-ID"] = f"<{subject.replace(' ', '.')}@example.test>"
    message["Date"] = "Mon, 01 Jan 2024 10:00:00 +0000"
    if reply_to:
        message["Reply-To"] = reply_to
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content(body)
    return message.as_bytes()


def _with_attachments() -> bytes:
    message = EmailMessage()
    message["From"] = "carol@example.test"
    message["To"] = USER
    message["Subject"] = "report"
    message.set_content("see attached")
    message.add_alternative("<p>see <b>attached</b></p><img src='cid:logo@x'>", subtype="html")
    message.get_payload()[1].add_related(b"\x89PNG-logo", maintype="image", subtype="png", cid="<logo@x>")
    message.add_attachment(b"%PDF-1.7 report bytes", maintype="application", subtype="pdf", filename="report.pdf")
    return message.as_bytes()


def _error(response: requests.Response) -> tuple[int, str]:
    body = response.json()["error"]
    assert set(body["innerError"]) >= {"date", "request-id", "client-request-id"}
    return response.status_code, body["code"]


def test_me_and_folders(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    ms = microsoft_emulator
    session = _session(ms, app, ["User.Read", "Mail.ReadBasic"])
    me = session.get(ms.graph_url + "/me").json()
    assert (me["id"], me["userPrincipalName"], me["displayName"]) == (ms.state.users[USER].oid, USER, "Alice Liddell")

    folders = session.get(ms.graph_url + "/me/mailFolders", params={"$top": "50"}).json()
    names = {f["displayName"] for f in folders["value"]}
    assert names == {"Inbox", "Drafts", "Sent Items", "Deleted Items", "Junk Email", "Archive"}
    assert folders["@odata.context"].endswith("/mailFolders")
    inbox = session.get(ms.graph_url + "/me/mailFolders/inbox").json()
    assert inbox["id"] == ms.folder_id(USER, "inbox") and inbox["totalItemCount"] == 0
    child = ms.create_folder(USER, "Projects", parent="inbox")
    children = session.get(f"{ms.graph_url}/me/mailFolders/{inbox['id']}/childFolders").json()["value"]
    assert [(c["id"], c["parentFolderId"]) for c in children] == [(child, inbox["id"])]
    # wellKnownName is a beta property: v1.0 refuses to select it.
    refused = session.get(ms.graph_url + "/me/mailFolders", params={"$select": "displayName,wellKnownName"})
    assert _error(refused) == (400, "RequestBroker--ParseUri")
    without = _session(ms, app, ["Mail.ReadBasic"], user=BOB).get(ms.graph_url + "/me")
    assert _error(without) == (403, "Authorization_RequestDenied")


def test_listing_pages_with_top_skip_select_and_orderby(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    ms = microsoft_emulator
    ids = [ms.deliver(USER, _message(f"note {i}"), received=1_700_000_000 + i).id for i in range(7)]
    session = _session(ms, app, ["Mail.Read"])
    url: str | None = ms.graph_url + "/me/mailFolders/inbox/messages"
    params: dict[str, str] | None = {
        "$top": "3",
        "$select": "subject,receivedDateTime",
        "$orderby": "receivedDateTime desc",
    }
    seen: list[dict[str, Any]] = []
    while url:
        page = session.get(url, params=params).json()
        params = None  # the next link carries the options
        assert all(set(m) == {"@odata.etag", "id", "subject", "receivedDateTime"} for m in page["value"])
        seen += page["value"]
        url = page.get("@odata.nextLink")
    assert [m["id"] for m in seen] == ids[::-1]
    oldest = session.get(
        ms.graph_url + "/me/messages", params={"$top": "1", "$orderby": "receivedDateTime asc", "$select": "subject"}
    ).json()
    assert oldest["value"][0]["subject"] == "note 0" and "@odata.nextLink" in oldest
    bad = session.get(ms.graph_url + "/me/messages", params={"$select": "subject,colour"})
    assert _error(bad) == (400, "RequestBroker--ParseUri")
    assert _error(session.get(ms.graph_url + "/me/messages", params={"$top": "0"}))[0] == 400


def test_a_message_is_rendered_from_its_mime(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    ms = microsoft_emulator
    first = ms.deliver(USER, _message("plans", reply_to="Team <team@example.test>"))
    reply = ms.deliver(USER, _message("Re plans", In_Reply_To="<plans@example.test>", X_Custom="yes"))
    session = _session(ms, app, ["Mail.Read"])

    message = session.get(f"{ms.graph_url}/me/messages/{first.id}").json()
    assert message["subject"] == "plans"
    assert message["from"] == {"emailAddress": {"name": "Carol", "address": "carol@example.test"}}
    assert message["toRecipients"] == [{"emailAddress": {"name": "Alice Liddell", "address": USER}}]
    assert message["ccRecipients"] == [{"emailAddress": {"name": "dave@example.test", "address": "dave@example.test"}}]
    assert message["bccRecipients"] == []
    assert message["replyTo"][0]["emailAddress"]["address"] == "team@example.test"
    assert message["internetMessageId"] == "<plans@example.test>"
    assert message["sentDateTime"] == "2024-01-01T10:00:00Z"
    assert message["parentFolderId"] == ms.folder_id(USER, "inbox")
    assert (message["isRead"], message["flag"], message["hasAttachments"]) == (
        False,
        {"flagStatus": "notFlagged"},
        False,
    )
    assert message["body"]["contentType"] == "html" and "Hello there" in message["body"]["content"]
    assert message["bodyPreview"] == "Hello there"
    assert "internetMessageHeaders" not in message  # only when $select names it

    text = session.get(
        f"{ms.graph_url}/me/messages/{reply.id}",
        params={"$select": "body,internetMessageHeaders,conversationId"},
        headers={"Prefer": 'outlook.body-content-type="text"'},
    )
    assert text.headers["Preference-Applied"] == 'outlook.body-content-type="text"'
    assert text.json()["body"] == {"contentType": "text", "content": "Hello there\n"}
    assert {"name": "X-Custom", "value": "yes"} in text.json()["internetMessageHeaders"]
    assert text.json()["conversationId"] == message["conversationId"]
    assert session.get(f"{ms.graph_url}/me/messages/{first.id}/$value").content == ms.message_raw(USER, first.id)


def test_moves_change_the_id_but_not_the_immutable_id(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    ms = microsoft_emulator
    delivered = ms.deliver(USER, _message("moving"))
    moved = ms.move(USER, delivered.id, "archive")
    session = _session(ms, app, ["Mail.ReadBasic"])
    assert moved.id != delivered.id and moved.immutable_id == delivered.immutable_id
    assert _error(session.get(f"{ms.graph_url}/me/messages/{delivered.id}")) == (404, "ErrorItemNotFound")
    immutable = session.get(
        f"{ms.graph_url}/me/mailFolders/archive/messages/{moved.immutable_id}",
        headers={"Prefer": 'IdType="ImmutableId"'},
    )
    assert immutable.json()["id"] == moved.immutable_id
    assert _error(session.get(f"{ms.graph_url}/me/mailFolders/inbox/messages/{moved.id}")) == (404, "ErrorItemNotFound")
    assert _error(session.get(f"{ms.graph_url}/me/messages/not!an!id")) == (400, "ErrorInvalidIdMalformed")


def test_attachments_and_their_value(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    ms = microsoft_emulator
    delivered = ms.deliver(USER, _with_attachments())
    session = _session(ms, app, ["Mail.Read"])
    message = session.get(f"{ms.graph_url}/me/messages/{delivered.id}").json()
    assert message["hasAttachments"] is True and "<b>attached</b>" in message["body"]["content"]

    listing = session.get(f"{ms.graph_url}/me/messages/{delivered.id}/attachments").json()["value"]
    by_name = {a["name"]: a for a in listing}
    assert set(by_name) == {"report.pdf", ""}
    pdf = by_name["report.pdf"]
    assert pdf["@odata.type"] == "#microsoft.graph.fileAttachment"
    assert (pdf["contentType"], pdf["isInline"], pdf["size"]) == ("application/pdf", False, 21)
    assert base64.b64decode(pdf["contentBytes"]) == b"%PDF-1.7 report bytes"
    logo = by_name[""]
    assert (logo["isInline"], logo["contentId"]) == (True, "logo@x")
    one = session.get(f"{ms.graph_url}/me/messages/{delivered.id}/attachments/{pdf['id']}").json()
    assert one["id"] == pdf["id"] and one["contentBytes"] == pdf["contentBytes"]
    raw = session.get(f"{ms.graph_url}/me/messages/{delivered.id}/attachments/{pdf['id']}/$value")
    assert raw.content == b"%PDF-1.7 report bytes" and raw.headers["Content-Type"] == "application/pdf"


def test_a_file_attachment_property_is_selected_through_a_type_cast(
    microsoft_emulator: MicrosoftEmulator, app: App
) -> None:
    # contentId is fileAttachment's, not the attachment base type's: OData's $select reaches it with a type-cast
    # segment, and Graph refuses the plain name (microsoftgraph/microsoft-graph-explorer-v4#3916).
    ms = microsoft_emulator
    delivered = ms.deliver(USER, _with_attachments())
    session = _session(ms, app, ["Mail.Read"])
    url = f"{ms.graph_url}/me/messages/{delivered.id}/attachments"

    cast = session.get(url, params={"$select": "id,name,isInline,microsoft.graph.fileAttachment/contentId"})
    assert cast.ok
    by_name = {a["name"]: a for a in cast.json()["value"]}
    assert set(by_name[""]) == {"@odata.type", "@odata.mediaContentType", "id", "name", "isInline", "contentId"}
    assert by_name[""]["contentId"] == "logo@x"
    assert "contentBytes" not in by_name["report.pdf"]
    one = session.get(f"{url}/{by_name['']['id']}", params={"$select": "microsoft.graph.fileAttachment/contentId"})
    assert one.json()["contentId"] == "logo@x" and "name" not in one.json()

    for refused in ("id,contentId", "microsoft.graph.itemAttachment/contentId", "microsoft.graph.nothing/contentId"):
        assert _error(session.get(url, params={"$select": refused})) == (400, "RequestBroker--ParseUri"), refused


def test_search_matches_from_subject_and_body_newest_sent_first(
    microsoft_emulator: MicrosoftEmulator, app: App
) -> None:
    ms = microsoft_emulator
    for n in range(5):
        ms.deliver(USER, _message(f"quokka {n}", body="nothing here"), received=1_700_000_000 + n)
    ms.deliver(USER, _message("plain", body="A Quokka in the body."), received=1_700_000_100)
    ms.deliver(USER, _message("unrelated", body="wombats only"), received=1_700_000_200)
    session = _session(ms, app, ["Mail.Read"])
    url: str | None = ms.graph_url + "/me/mailFolders/inbox/messages"
    params: dict[str, str] | None = {"$search": '"quokka"', "$top": "2", "$select": "subject"}
    subjects: list[str] = []
    while url:
        page = session.get(url, params=params).json()
        params = None  # the next link carries $search
        assert len(page["value"]) <= 2
        subjects += [m["subject"] for m in page["value"]]
        url = page.get("@odata.nextLink")
    # All were sent at the same Date; the latest received comes first among equals.
    assert subjects == ["plain", "quokka 4", "quokka 3", "quokka 2", "quokka 1", "quokka 0"]

    def found(value: str) -> list[str]:
        response = session.get(ms.graph_url + "/me/messages", params={"$search": value, "$select": "subject"})
        assert response.ok, value
        return [m["subject"] for m in response.json()["value"]]

    assert found('"quokka 3"') == ["quokka 3"]
    assert found('"subject:quokka 3"') == ["quokka 3"]
    assert found('"body:quokka"') == ["plain"]
    assert found('"from:carol@example.test"') == found('"carol"') != []
    assert found('"quok*"') == found('"quokka"')
    assert found("wombats") == ["unrelated"]
    assert found('"platypus"') == []

    base = ms.graph_url + "/me/messages"
    both = session.get(base, params={"$search": '"quokka"', "$orderby": "receivedDateTime desc"})
    assert _error(both) == (400, "SearchWithOrderBy")
    assert _error(session.get(base, params={"$search": '"quokka'})) == (400, "BadRequest")
    assert _error(session.get(base, params={"$search": '""'})) == (400, "BadRequest")
    assert _error(session.get(base, params={"$search": "quokka OR wombat"})) == (501, "emulator.NotImplemented")
    # Mail.ReadBasic "does not include permissions to search messages".
    basic = _session(ms, app, ["Mail.ReadBasic"], user=BOB)
    assert basic.get(base).ok
    assert _error(basic.get(base, params={"$search": '"quokka"'})) == (403, "ErrorAccessDenied")


def test_mail_read_basic_sees_no_body_attachments_or_mime(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    ms = microsoft_emulator
    delivered = ms.deliver(USER, _with_attachments())
    session = _session(ms, app, ["Mail.ReadBasic"])
    message = session.get(f"{ms.graph_url}/me/messages/{delivered.id}").json()
    assert message["subject"] == "report" and message["hasAttachments"] is True
    assert "body" not in message and "bodyPreview" not in message
    base = f"{ms.graph_url}/me/messages/{delivered.id}"
    for url, params in [
        (base, {"$select": "subject,body"}),
        (base + "/$value", None),
        (base + "/attachments", None),
        (ms.graph_url + "/me/mailFolders/inbox/messages", {"$select": "bodyPreview"}),
    ]:
        assert _error(session.get(url, params=params)) == (403, "ErrorAccessDenied")
    send_only = _session(ms, app, ["Mail.Send"], user=BOB)
    assert _error(send_only.get(ms.graph_url + "/me/mailFolders")) == (403, "ErrorAccessDenied")


def test_send_mail_json_and_mime(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    ms = microsoft_emulator
    session = _session(ms, app, ["Mail.Send", "Mail.Read"])
    payload = {
        "message": {
            "subject": "hello",
            "body": {"contentType": "text", "content": "hi bob"},
            "toRecipients": [{"emailAddress": {"address": BOB}}],
            "bccRecipients": [{"emailAddress": {"address": "hidden@example.test"}}],
            "internetMessageHeaders": [{"name": "X-Broker", "value": "1"}],
            "attachments": [
                {
                    "@odata.type": "#microsoft.graph.fileAttachment",
                    "name": "a.txt",
                    "contentType": "text/plain",
                    "contentBytes": base64.b64encode(b"attached").decode(),
                }
            ],
        }
    }
    response = session.post(ms.graph_url + "/me/sendMail", json=payload)
    assert (response.status_code, response.content) == (202, b"")
    sent = ms.sent_messages(USER)[-1]
    assert sent.recipients == (BOB, "hidden@example.test") and sent.kind == "json"
    assert b"hidden@example.test" not in sent.raw and b"X-Broker: 1" in sent.raw
    assert len(ms.message_ids(BOB, "inbox")) == 1  # delivered to the local recipient
    saved = session.get(ms.graph_url + "/me/mailFolders/sentitems/messages", params={"$select": "bccRecipients"})
    assert saved.json()["value"][0]["bccRecipients"][0]["emailAddress"]["address"] == "hidden@example.test"

    mime = EmailMessage()
    mime["To"] = "erin@example.test"
    mime["Subject"] = "as mime"
    mime.set_content("body")
    encoded = base64.b64encode(mime.as_bytes())
    response = session.post(ms.graph_url + "/me/sendMail", data=encoded, headers={"Content-Type": "text/plain"})
    assert response.status_code == 202 and ms.sent_messages(USER)[-1].recipients == ("erin@example.test",)

    bad_header = {"message": {**payload["message"], "internetMessageHeaders": [{"name": "Bcc", "value": "x@y"}]}}
    assert _error(session.post(ms.graph_url + "/me/sendMail", json=bad_header)) == (400, "InvalidInternetMessageHeader")
    not_b64 = session.post(ms.graph_url + "/me/sendMail", data=b"not base64!", headers={"Content-Type": "text/plain"})
    assert _error(not_b64) == (400, "ErrorMimeContentInvalidBase64String")
    mime.replace_header("To", "erin@example.test")
    mime["From"] = "ceo@contoso.test"
    spoof = session.post(
        ms.graph_url + "/me/sendMail", data=base64.b64encode(mime.as_bytes()), headers={"Content-Type": "text/plain"}
    )
    assert _error(spoof) == (403, "ErrorSendAsDenied")
    nobody = {"message": {"subject": "x", "body": {"contentType": "text", "content": "x"}}}
    assert _error(session.post(ms.graph_url + "/me/sendMail", json=nobody)) == (400, "ErrorInvalidRecipients")
    assert len(ms.sent_messages(USER)) == 2


def test_delta_rounds_report_changes_and_removals(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    ms = microsoft_emulator
    kept, moved, deleted, purged = (ms.deliver(USER, _message(f"m{i}")) for i in range(4))
    session = _session(ms, app, ["Mail.ReadBasic"])
    prefer = {"Prefer": "odata.maxpagesize=3"}

    def round_(url: str, params: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], str]:
        items: list[dict[str, Any]] = []
        while True:
            page = session.get(url, params=params, headers=prefer)
            assert page.status_code == 200, page.text
            body = page.json()
            items += body["value"]
            params = None
            if "@odata.deltaLink" in body:
                return items, body["@odata.deltaLink"]
            url = body["@odata.nextLink"]

    first, delta_link = round_(ms.graph_url + "/me/mailFolders/inbox/messages/delta", {"$select": "subject,isRead"})
    assert sorted(i["subject"] for i in first) == ["m0", "m1", "m2", "m3"]
    assert all(set(i) == {"@odata.type", "@odata.etag", "id", "subject", "isRead"} for i in first)

    new = ms.deliver(USER, _message("m4"))
    ms.set_read(USER, kept.id)
    ms.move(USER, moved.id, "archive")
    ms.delete_message(USER, deleted.id)
    ms.delete_message(USER, purged.id, permanent=True)
    second, delta_link = round_(delta_link)
    changed = {i["id"]: i for i in second}
    assert changed[new.id]["subject"] == "m4" and changed[kept.id]["isRead"] is True
    assert changed[moved.id]["@removed"] == {"reason": "changed"}
    assert changed[deleted.id]["@removed"] == {"reason": "changed"}  # in Deleted Items: restorable
    assert changed[purged.id]["@removed"] == {"reason": "deleted"}
    assert len(second) == 5
    third, delta_link = round_(delta_link)
    assert third == []

    ms.expire_delta_tokens(USER)
    gone = session.get(delta_link)
    assert _error(gone) == (410, "syncStateNotFound")
    assert gone.headers["Location"].startswith(ms.graph_url + "/me/mailFolders(")
    restarted, _ = round_(gone.headers["Location"])
    assert sorted(i["subject"] for i in restarted) == ["m0", "m4"]


def test_errors_and_authentication(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    ms = microsoft_emulator
    anonymous = ms.session()
    response = anonymous.get(ms.graph_url + "/me/messages")
    assert _error(response) == (401, "InvalidAuthenticationToken")
    assert "WWW-Authenticate" in response.headers
    session = _session(ms, app, ["Mail.Read"])
    assert session.get(ms.graph_url + "/me/messages").ok
    ms.expire_access_tokens(USER)
    assert _error(session.get(ms.graph_url + "/me/messages")) == (401, "InvalidAuthenticationToken")
    other = ms.state.users[BOB].oid
    fresh = _session(ms, app, ["Mail.Read"])
    assert _error(fresh.get(f"{ms.graph_url}/users/{other}/messages")) == (403, "ErrorAccessDenied")
    assert fresh.get(f"{ms.graph_url}/users/{USER}/messages").ok
    assert _error(fresh.get(ms.graph_url + "/me/nothing")) == (400, "BadRequest")
    assert _error(fresh.get(ms.graph_url + "/me/messages", params={"$filter": "isRead eq false"})) == (
        501,
        "emulator.NotImplemented",
    )


@pytest.mark.parametrize(("status", "code"), [(429, "TooManyRequests"), (503, "serviceNotAvailable")])
def test_throttling_on_demand(microsoft_emulator: MicrosoftEmulator, app: App, status: int, code: str) -> None:
    ms = microsoft_emulator
    session = _session(ms, app, ["Mail.Read"])
    ms.throttle(2, status=status, code=code, retry_after=7, user=USER)
    for _ in range(2):
        response = session.get(ms.graph_url + "/me/messages")
        assert _error(response) == (status, code)
        assert response.headers["Retry-After"] == "7"
    assert session.get(ms.graph_url + "/me/messages").ok
    assert ms.counters()["graph.throttled"] == 2


def test_a_fifth_concurrent_request_for_a_mailbox_is_refused(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    ms = microsoft_emulator
    token = sign_in(ms, app, USER, ["Mail.Read"])["access_token"]
    bob = _session(ms, app, ["Mail.Read"], user=BOB)
    statuses: list[int] = []
    lock = threading.Lock()

    def call() -> None:
        status = graph(ms, token).get(ms.graph_url + "/me/messages").status_code
        with lock:
            statuses.append(status)

    with ms.hold_graph_requests():
        threads = [threading.Thread(target=call) for _ in range(4)]
        for thread in threads:
            thread.start()
        assert ms.wait_for_in_flight(USER, 4)
        fifth = graph(ms, token).get(ms.graph_url + "/me/mailFolders")
        assert _error(fifth) == (429, "ApplicationThrottled")
        assert fifth.json()["error"]["message"] == "Application is over its MailboxConcurrency limit."
        assert fifth.headers["Retry-After"] == "1"
        assert ms.in_flight(USER) == 4
    for thread in threads:
        thread.join()
    assert statuses == [200] * 4
    assert bob.get(ms.graph_url + "/me/messages").ok  # another mailbox was never limited
    assert graph(ms, token).get(ms.graph_url + "/me/messages").ok
