"""IMAP/SMTP accounts end to end: the broker over mTLS, a real Dovecot, a real SMTP submission server."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1 import resources_pb2 as rpb

from server.config import MailConfig
from tests.broker import RunningBroker, broker_config, error_reason, running_broker, stubs
from tests.mailserver import Mailbox, MailServers
from tests.pki import TestPki

ALL = [rpb.CAPABILITY_METADATA, rpb.CAPABILITY_READ, rpb.CAPABILITY_SEND]


def imap_config(tmp_path: Path, pki: TestPki, servers: MailServers, **imap: Any) -> Any:
    config = broker_config(tmp_path, pki)
    return dataclasses.replace(
        config,
        imap=dataclasses.replace(config.imap, ca_file=servers.ca_path, **imap),
        mail=MailConfig(folder_poll_seconds=0.5),
    )


@pytest.fixture
async def broker(tmp_path: Path, pki: TestPki, mail_servers: MailServers) -> AsyncIterator[RunningBroker]:
    async with running_broker(imap_config(tmp_path, pki, mail_servers), pki) as running:
        yield running


def connect_request(
    servers: MailServers,
    box: Mailbox,
    capabilities: list[int] = ALL,
    *,
    password: str | None = None,
    security: int = rpb.TRANSPORT_SECURITY_IMPLICIT_TLS,
) -> apb.ConnectImapAccountRequest:
    imap_port = servers.imap_port if security == rpb.TRANSPORT_SECURITY_IMPLICIT_TLS else servers.imap_starttls_port
    smtp_port = servers.smtps_port if security == rpb.TRANSPORT_SECURITY_IMPLICIT_TLS else servers.smtp_starttls_port
    return apb.ConnectImapAccountRequest(
        imap_server=rpb.MailServer(host=servers.host, port=imap_port, security=security),
        smtp_server=rpb.MailServer(host=servers.host, port=smtp_port, security=security),
        username=box.address,
        password=box.password if password is None else password,
        capabilities=capabilities,
    )


def sample(subject: str, *, to: str = "rcpt@example.test", attachment: bytes | None = None, html: bool = True) -> bytes:
    message = EmailMessage()
    message["From"] = "Sender <sender@example.test>"
    message["To"] = to
    message["Subject"] = subject
    message.set_content(f"text of {subject}\n")
    if html:
        message.add_alternative(f"<p>html of {subject}</p>", subtype="html")
    if attachment is not None:
        message.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="data.bin")
    return message.as_bytes()


async def _fails(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_connect_verifies_both_logins_and_stores_the_password_only_sealed(
    broker: RunningBroker,
    mail_servers: MailServers,
    mailbox: Mailbox,
) -> None:
    async with broker.channel(broker.pki.alice) as channel:
        accounts, _ = stubs(channel)
        error = await _fails(
            accounts.ConnectImapAccount(connect_request(mail_servers, mailbox, password="wrong-pw-canary"), timeout=20)
        )
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.UNAUTHENTICATED, "PROVIDER_AUTH_FAILED")
        assert not (await accounts.ListAccounts(apb.ListAccountsRequest(), timeout=5)).accounts

        for security in (rpb.TRANSPORT_SECURITY_IMPLICIT_TLS, rpb.TRANSPORT_SECURITY_STARTTLS):
            account = await accounts.ConnectImapAccount(
                connect_request(mail_servers, mailbox, security=security), timeout=20
            )
            assert account.provider == rpb.PROVIDER_IMAP
            assert account.email_address == mailbox.address
            assert account.imap_server.security == security
            assert mailbox.password not in str(account)
    raw = b"".join(p.read_bytes() for p in broker.config.data_dir.glob("broker.db*"))
    assert mailbox.password.encode() not in raw, "password on disk in the clear"
    assert mailbox.address.encode() not in raw, "address on disk in the clear"


async def test_unreachable_silent_and_plaintext_servers_fail_clearly(
    broker: RunningBroker,
    mail_servers: MailServers,
    mailbox: Mailbox,
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        async with broker.channel(broker.pki.alice) as channel:
            accounts, _ = stubs(channel)
            request = connect_request(mail_servers, mailbox, [rpb.CAPABILITY_READ])
            request.imap_server.port = closed_port
            error = await _fails(accounts.ConnectImapAccount(request, timeout=20))
            assert (error.code(), error_reason(error)) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNREACHABLE")

            request.imap_server.port = silent.getsockname()[1]
            started = time.monotonic()
            error = await _fails(accounts.ConnectImapAccount(request, timeout=2))
            assert (error.code(), error_reason(error)) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_TIMEOUT")
            assert time.monotonic() - started < 4

            request = connect_request(mail_servers, mailbox, [rpb.CAPABILITY_READ])
            request.imap_server.security = rpb.TRANSPORT_SECURITY_PLAINTEXT
            error = await _fails(accounts.ConnectImapAccount(request, timeout=20))
            assert (error.code(), error_reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "PLAINTEXT_NOT_ALLOWED")
            assert not (await accounts.ListAccounts(apb.ListAccountsRequest(), timeout=5)).accounts
    finally:
        silent.close()


async def test_folders_messages_bodies_and_attachments(
    broker: RunningBroker,
    mail_servers: MailServers,
    mailbox: Mailbox,
) -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB: several chunks
    for n in range(7):
        mail_servers.deliver(mailbox.address, sample(f"Grüße {n}", to=mailbox.address))
    mail_servers.deliver(mailbox.address, sample("with attachment", to=mailbox.address, attachment=payload))
    async with broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await accounts.ConnectImapAccount(connect_request(mail_servers, mailbox), timeout=20)

        folders = (await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10)).folders
        roles = {f.display_name: f.role for f in folders}
        assert roles["INBOX"] == rpb.FOLDER_ROLE_INBOX
        assert rpb.FOLDER_ROLE_SENT in roles.values()
        assert rpb.FOLDER_ROLE_TRASH in roles.values()
        assert rpb.FOLDER_ROLE_DRAFTS in roles.values()

        seen: list[rpb.Message] = []
        token = ""
        while True:
            page = await mail.ListMessages(
                mpb.ListMessagesRequest(parent=account.name, page_size=3, page_token=token), timeout=10
            )
            seen.extend(page.messages)
            token = page.next_page_token
            if not token:
                break
        assert [m.subject for m in seen] == ["with attachment"] + [f"Grüße {n}" for n in reversed(range(7))]
        assert len({m.name for m in seen}) == 8

        newest = seen[0]
        metadata = await mail.GetMessage(mpb.GetMessageRequest(name=newest.name), timeout=10)
        assert metadata.view == rpb.MESSAGE_VIEW_METADATA
        assert metadata.text_body == "" and not metadata.attachments
        assert any(h.name.lower() == "subject" for h in metadata.headers)

        full = await mail.GetMessage(mpb.GetMessageRequest(name=newest.name, view=rpb.MESSAGE_VIEW_FULL), timeout=10)
        assert full.text_body.strip() == "text of with attachment"
        assert "html of with attachment" in full.html_body
        (attachment,) = full.attachments
        assert attachment.filename == "data.bin"

        chunks = [c async for c in mail.GetAttachment(mpb.GetAttachmentRequest(name=attachment.name), timeout=20)]
        assert chunks[0].attachment.filename == "data.bin"
        assert len(chunks) > 1 and all(len(c.data) <= 64 * 1024 for c in chunks)
        assert b"".join(c.data for c in chunks) == payload
        assert [c.offset for c in chunks] == [sum(len(x.data) for x in chunks[:i]) for i in range(len(chunks))]

        # Reading never marked anything read.
        with mail_servers.imap(mailbox.address) as client:
            client.select_folder("INBOX", readonly=True)
            flags = client.get_flags(client.search("ALL"))
            assert all(b"\\Seen" not in f for f in flags.values())

        # Ids are stable across broker restarts.
        names = [m.name for m in seen]
    async with running_broker(broker.config, broker.pki) as again, again.channel(broker.pki.alice) as channel:
        _, mail = stubs(channel)
        page = await mail.ListMessages(mpb.ListMessagesRequest(parent=account.name, page_size=8), timeout=10)
        assert [m.name for m in page.messages] == names


async def test_capabilities_are_enforced_for_imap(
    broker: RunningBroker,
    mail_servers: MailServers,
    mailbox: Mailbox,
) -> None:
    mail_servers.deliver(mailbox.address, sample("x", to=mailbox.address, attachment=b"abc"))
    async with broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await accounts.ConnectImapAccount(
            connect_request(mail_servers, mailbox, [rpb.CAPABILITY_METADATA]), timeout=20
        )
        (message,) = (await mail.ListMessages(mpb.ListMessagesRequest(parent=account.name), timeout=10)).messages
        for call in (
            mail.GetMessage(mpb.GetMessageRequest(name=message.name, view=rpb.MESSAGE_VIEW_FULL), timeout=10),
            mail.ListMessages(mpb.ListMessagesRequest(parent=account.name, query="x"), timeout=10),
            mail.SendMessage(
                mpb.SendMessageRequest(
                    account=account.name,
                    message=mpb.OutgoingMessage(to_recipients=[rpb.EmailAddress(address=mailbox.address)]),
                ),
                timeout=10,
            ),
        ):
            error = await _fails(call)
            assert (error.code(), error_reason(error)) == (grpc.StatusCode.PERMISSION_DENIED, "CAPABILITY_NOT_GRANTED")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in mail.GetAttachment(
                mpb.GetAttachmentRequest(name=f"{message.name}/attachments/2"), timeout=10
            ):
                pass
        assert error_reason(caught.value) == "CAPABILITY_NOT_GRANTED"


async def test_send_delivers_files_a_copy_rejects_injection_and_is_idempotent(
    broker: RunningBroker,
    mail_servers: MailServers,
    mailbox: Mailbox,
) -> None:
    recipient, _ = mail_servers.new_mailbox("rcpt")
    async with broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await accounts.ConnectImapAccount(connect_request(mail_servers, mailbox), timeout=20)
        before = len(mail_servers.smtp.messages) if mail_servers.smtp else 0

        bad = mpb.SendMessageRequest(
            account=account.name,
            message=mpb.OutgoingMessage(
                to_recipients=[rpb.EmailAddress(address=recipient)], subject="hi\r\nBcc: victim@example.test"
            ),
        )
        error = await _fails(mail.SendMessage(bad, timeout=10))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "HEADER_INJECTION")
        bad = mpb.SendMessageRequest(
            account=account.name, message=mpb.OutgoingMessage(to_recipients=[rpb.EmailAddress(address="a@@b")])
        )
        error = await _fails(mail.SendMessage(bad, timeout=10))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ADDRESS")
        assert mail_servers.smtp is not None
        assert len(mail_servers.smtp.messages) == before

        request = mpb.SendMessageRequest(
            account=account.name,
            request_id="5c0ffee0-0000-4000-8000-000000000001",
            message=mpb.OutgoingMessage(
                to_recipients=[rpb.EmailAddress(address=recipient, display_name="Récipient")],
                subject="Grüße aus dem Test",
                text_body="hello",
                html_body="<b>hello</b>",
                attachments=[mpb.OutgoingAttachment(filename="a.txt", content=b"attached")],
            ),
        )
        sent = await mail.SendMessage(request, timeout=20)
        assert sent.internet_message_id and not sent.replayed
        assert sent.message  # the copy filed in Sent
        await mail_servers.smtp.wait_for_async(1, to=recipient)
        copy = await mail.GetMessage(mpb.GetMessageRequest(name=sent.message, view=rpb.MESSAGE_VIEW_FULL), timeout=10)
        assert copy.subject == "Grüße aus dem Test"
        assert copy.attachments[0].filename == "a.txt"

    # The same request_id after a restart: the stored result, nothing sent again.
    async with running_broker(broker.config, broker.pki) as again, again.channel(broker.pki.alice) as channel:
        _, mail = stubs(channel)
        replay = await mail.SendMessage(request, timeout=20)
        assert replay.replayed
        assert replay.internet_message_id == sent.internet_message_id
        assert replay.message == sent.message
        request.message.subject = "something else"
        error = await _fails(mail.SendMessage(request, timeout=10))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
    await asyncio.sleep(0.2)
    assert len([m for m in mail_servers.smtp.messages if recipient in m.rcpt_tos]) == 1


async def test_a_recipient_refused_while_others_are_accepted_is_reported_and_replayed(
    broker: RunningBroker,
    mail_servers: MailServers,
    mailbox: Mailbox,
) -> None:
    """SMTP may refuse one RCPT and take the message for the rest: the message is sent, and the response names the
    recipients it did not reach (a caller told plain success would believe everyone got it)."""
    refused, _ = mail_servers.new_mailbox("refused")
    accepted, _ = mail_servers.new_mailbox("accepted")
    assert mail_servers.smtp is not None
    async with broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await accounts.ConnectImapAccount(connect_request(mail_servers, mailbox), timeout=20)
        mail_servers.smtp.reject_next(550, "5.1.1 No such recipient here", stage="RCPT", user=mailbox.address)
        request = mpb.SendMessageRequest(
            account=account.name,
            request_id="5c0ffee0-0000-4000-8000-000000000002",
            message=mpb.OutgoingMessage(
                to_recipients=[rpb.EmailAddress(address=refused)],
                cc_recipients=[rpb.EmailAddress(address=accepted)],
                subject="partly refused",
                text_body="hello",
            ),
        )
        sent = await mail.SendMessage(request, timeout=20)
        assert list(sent.refused_recipients) == [refused]
        await mail_servers.smtp.wait_for_async(1, to=accepted)
        assert mail_servers.smtp.messages_for(refused) == []
        replay = await mail.SendMessage(request, timeout=20)
        assert replay.replayed and list(replay.refused_recipients) == [refused]

        everyone = mpb.SendMessageRequest(
            account=account.name,
            message=mpb.OutgoingMessage(to_recipients=[rpb.EmailAddress(address=accepted)], subject="x", text_body="y"),
        )
        assert list((await mail.SendMessage(everyone, timeout=20)).refused_recipients) == []


async def test_watch_mailbox_follows_adds_flags_and_deletes_and_resumes(
    broker: RunningBroker,
    mail_servers: MailServers,
    mailbox: Mailbox,
) -> None:
    async with broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await accounts.ConnectImapAccount(connect_request(mail_servers, mailbox), timeout=20)
        stream = mail.WatchMailbox(
            mpb.WatchMailboxRequest(account=account.name, heartbeat_interval=duration_pb2.Duration(seconds=5)),
            timeout=60,
        )
        await asyncio.sleep(0.5)  # the watcher is in IDLE
        mail_servers.deliver(mailbox.address, sample("live one", to=mailbox.address))
        added = await asyncio.wait_for(stream.read(), 10)
        assert added.WhichOneof("event") == "message_added"
        assert added.message_added.message.subject == "live one"
        assert added.resume_token

        with mail_servers.imap(mailbox.address) as client:
            client.select_folder("INBOX")
            uids = client.search("ALL")
            client.add_flags(uids, [b"\\Flagged"])
            updated = await asyncio.wait_for(stream.read(), 10)
            assert updated.WhichOneof("event") == "message_updated"
            assert updated.message_updated.message.flagged
            client.delete_messages(uids)
            client.expunge()
        deleted = await asyncio.wait_for(stream.read(), 10)
        assert deleted.WhichOneof("event") == "message_deleted"
        assert deleted.message_deleted.message == added.message_added.message.name

        with mail_servers.imap(mailbox.address) as client:
            client.create_folder("Projects")
            created = await _next_event(stream, "folder_added")
            assert created.folder_added.folder.display_name == "Projects"
            client.delete_folder("Projects")
        removed = await _next_event(stream, "folder_deleted")
        assert removed.folder_deleted.folder == created.folder_added.folder.name
        stream.cancel()

        # What happens while nobody watches is replayed from the last token.
        mail_servers.deliver(mailbox.address, sample("while away", to=mailbox.address))
        resumed = mail.WatchMailbox(
            mpb.WatchMailboxRequest(account=account.name, resume_token=removed.resume_token), timeout=30
        )
        replayed = await asyncio.wait_for(resumed.read(), 10)
        assert replayed.WhichOneof("event") == "message_added"
        assert replayed.message_added.message.subject == "while away"
        resumed.cancel()

        error = await _fails(
            mail.WatchMailbox(mpb.WatchMailboxRequest(account=account.name, resume_token="garbage"), timeout=10).read()
        )
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_RESUME_TOKEN")


async def _next_event(stream: Any, kind: str) -> Any:
    """The next event of ``kind``, passing over heartbeats."""
    while True:
        event = await asyncio.wait_for(stream.read(), 10)
        if event.WhichOneof("event") != "heartbeat":
            assert event.WhichOneof("event") == kind
            return event


async def _live_feed(channel: grpc.aio.Channel, servers: MailServers, box: Mailbox) -> tuple[Any, Any, Any]:
    """Connect ``box`` and open a WatchMailbox on it; returns once an event has shown the feed is live."""
    accounts, mail = stubs(channel)
    account = await accounts.ConnectImapAccount(connect_request(servers, box), timeout=20)
    stream = mail.WatchMailbox(
        mpb.WatchMailboxRequest(account=account.name, heartbeat_interval=duration_pb2.Duration(seconds=5)),
        timeout=30,
    )
    await asyncio.sleep(0.3)
    servers.deliver(box.address, sample("one", to=box.address))
    first = await _next_event(stream, "message_added")
    assert first.resume_token
    return accounts, account, stream


async def test_erasure_ends_open_feeds(
    broker: RunningBroker,
    mail_servers: MailServers,
    mailbox: Mailbox,
) -> None:
    async with broker.channel(broker.pki.alice) as channel:
        accounts, account, stream = await _live_feed(channel, mail_servers, mailbox)
        receipt = await accounts.DeleteAccount(apb.DeleteAccountRequest(name=account.name), timeout=10)
        assert receipt.steps[1].kind == rpb.ERASURE_STEP_KIND_STOP_WATCHES
        error = await _fails(stream.read())
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_ERASED")


async def test_shutdown_ends_open_feeds_with_unavailable_so_clients_resume_elsewhere(
    broker: RunningBroker,
    mail_servers: MailServers,
    mailbox: Mailbox,
) -> None:
    async with broker.channel(broker.pki.alice) as channel:
        _, _, stream = await _live_feed(channel, mail_servers, mailbox)
        stopping = asyncio.ensure_future(broker.broker.stop())
        error = await _fails(stream.read())
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.UNAVAILABLE, "SERVER_SHUTTING_DOWN")
        await stopping


async def test_a_dovecot_restart_mid_stream_loses_nothing(tmp_path: Path, pki: TestPki) -> None:
    # A private pair of servers: killing the session-wide Dovecot would disturb every other test.
    with MailServers() as servers:
        box = servers.new_mailbox()
        async with (
            running_broker(imap_config(tmp_path, pki, servers), pki) as broker,
            broker.channel(pki.alice) as channel,
        ):
            accounts, mail = stubs(channel)
            account = await accounts.ConnectImapAccount(connect_request(servers, box), timeout=20)
            stream = mail.WatchMailbox(mpb.WatchMailboxRequest(account=account.name), timeout=60)
            await asyncio.sleep(0.3)
            servers.deliver(box.address, sample("before", to=box.address))
            before = await _next_event(stream, "message_added")
            assert before.message_added.message.subject == "before"

            assert servers.dovecot is not None
            servers.dovecot.kill()
            await asyncio.sleep(0.5)  # the watcher sees the connection drop and starts backing off
            servers.dovecot.restart()
            # Mail that arrives after the restart, before the watcher is back, still reaches the stream.
            servers.deliver(box.address, sample("after", to=box.address))
            after = await asyncio.wait_for(_next_event(stream, "message_added"), 30)
            assert after.message_added.message.subject == "after"
            stream.cancel()


async def test_a_folder_reset_yields_resync_and_tokens_are_bound_to_their_account(
    broker: RunningBroker,
    mail_servers: MailServers,
    mailbox: Mailbox,
) -> None:
    other, _ = mail_servers.new_mailbox("other")
    with mail_servers.imap(mailbox.address) as client:
        client.create_folder("Projects")
    async with broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await accounts.ConnectImapAccount(connect_request(mail_servers, mailbox), timeout=20)
        folders = (await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10)).folders
        (projects,) = [f.name for f in folders if f.display_name == "Projects"]
        request = mpb.WatchMailboxRequest(account=account.name, folders=[projects])
        stream = mail.WatchMailbox(request, timeout=60)
        await asyncio.sleep(0.3)
        mail_servers.append(mailbox.address, "Projects", sample("in projects"))
        event = await _next_event(stream, "message_added")
        stream.cancel()

        # The folder is deleted and made again: same name, new UIDVALIDITY, every old id void.
        with mail_servers.imap(mailbox.address) as client:
            client.delete_folder("Projects")
            client.create_folder("Projects")
        request.resume_token = event.resume_token
        resumed = mail.WatchMailbox(request, timeout=60)
        resync = await _next_event(resumed, "resync_required")
        assert resync.resync_required.reason == mpb.RESYNC_REASON_UIDVALIDITY_CHANGED
        assert resync.resync_required.folder == projects
        resumed.cancel()

        # A token is bound to its account (and folders): presented for another feed, it is refused.
        second = await accounts.ConnectImapAccount(
            connect_request(mail_servers, Mailbox(other, mail_servers.users.password(other) or "")), timeout=20
        )
        foreign = mail.WatchMailbox(
            mpb.WatchMailboxRequest(account=second.name, resume_token=event.resume_token), timeout=10
        )
        error = await _fails(foreign.read())
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_RESUME_TOKEN")
