"""The mail-server harness works with real clients: Dovecot over IMAPS/STARTTLS/LMTP, the submission server over
SMTPS/STARTTLS, and the whole path send -> SMTP -> LMTP -> IDLE."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import ssl
import time
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from server.pki import new_ca
from tests.mailserver import (
    SPECIAL_USE_FOLDERS,
    Dovecot,
    Mailbox,
    MaildirMessage,
    MailServers,
    SubmissionServer,
)

pytestmark = pytest.mark.integration

REQUIRED_CAPABILITIES = {b"IDLE", b"CONDSTORE", b"QRESYNC", b"UIDPLUS", b"MOVE", b"SPECIAL-USE", b"BINARY"}


def message(to: str, subject: str, body: str = "Hello.\n", sender: str = "sender@example.test") -> bytes:
    """Return a small RFC 5322 message as bytes with CRLF line ends."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{time.monotonic_ns()}@example.test>"
    msg.set_content(body)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def subjects(client: IMAPClient, folder: str = "INBOX") -> list[bytes]:
    """Return the subjects of all messages in ``folder``, in UID order."""
    client.select_folder(folder, readonly=True)
    uids = client.search("ALL")
    fetched = client.fetch(uids, ["ENVELOPE"])
    return [fetched[uid][b"ENVELOPE"].subject for uid in sorted(fetched)]


def wait_for_exists(client: IMAPClient, timeout: float) -> float:
    """IDLE until the server reports EXISTS; return how long that took (raise if it did not within ``timeout``)."""
    started = time.monotonic()
    while (remaining := timeout - (time.monotonic() - started)) > 0:
        if any(len(response) > 1 and response[1] == b"EXISTS" for response in client.idle_check(timeout=remaining)):
            return time.monotonic() - started
    raise AssertionError(f"no EXISTS within {timeout} s")


# -- IMAP ---------------------------------------------------------------------------------------------------------


def test_imaps_login_verifies_the_test_ca(mail_servers: MailServers, mailbox: Mailbox) -> None:
    context = ssl.create_default_context(cafile=str(mail_servers.ca_path))
    with IMAPClient(mail_servers.host, port=mail_servers.imap_port, ssl_context=context, timeout=10) as client:
        client.login(*mailbox)
        capabilities = set(client.capabilities())
        certificate = client.socket().getpeercert()

    assert capabilities >= REQUIRED_CAPABILITIES
    assert ("IP Address", "127.0.0.1") in certificate["subjectAltName"]


def test_imaps_refuses_a_client_that_does_not_trust_the_test_ca(mail_servers: MailServers) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=new_ca("some other CA").cert_pem().decode())

    with pytest.raises(ssl.SSLCertVerificationError):
        IMAPClient(mail_servers.host, port=mail_servers.imap_port, ssl_context=context, timeout=10)


def test_starttls_login(mail_servers: MailServers, mailbox: Mailbox) -> None:
    with IMAPClient(mail_servers.host, port=mail_servers.imap_starttls_port, ssl=False, timeout=10) as client:
        assert b"STARTTLS" in client.capabilities()
        client.starttls(mail_servers.client_context())
        client.login(*mailbox)

        assert client.socket().version() in {"TLSv1.2", "TLSv1.3"}
        assert set(client.capabilities()) >= REQUIRED_CAPABILITIES


def test_wrong_password_is_refused(mail_servers: MailServers, mailbox: Mailbox) -> None:
    with (
        IMAPClient(mail_servers.host, port=mail_servers.imap_port, ssl_context=mail_servers.client_context()) as client,
        pytest.raises(LoginError, match="AUTHENTICATIONFAILED"),
    ):
        client.login(mailbox.address, mailbox.password + "x")


def test_a_password_change_is_seen_at_the_next_login(mail_servers: MailServers, mailbox: Mailbox) -> None:
    with mail_servers.imap(mailbox.address):  # Dovecot has just read the user's passwd-file
        pass
    new_password = mailbox.password[::-1]  # the same length: only the file's mtime shows that it changed
    mail_servers.add_user(mailbox.address, new_password)

    with (
        IMAPClient(mail_servers.host, port=mail_servers.imap_port, ssl_context=mail_servers.client_context()) as client,
        pytest.raises(LoginError),
    ):
        client.login(*mailbox)
    with IMAPClient(
        mail_servers.host, port=mail_servers.imap_port, ssl_context=mail_servers.client_context()
    ) as client:
        client.login(mailbox.address, new_password)


def test_plaintext_login_is_refused_until_starttls(mail_servers: MailServers, mailbox: Mailbox) -> None:
    # On insecure_host Dovecot does not treat the connection as local, and so applies ssl = required.
    with IMAPClient(mail_servers.insecure_host, port=mail_servers.imap_starttls_port, ssl=False, timeout=10) as client:
        assert b"LOGINDISABLED" in client.capabilities()
        with pytest.raises(LoginError, match="PRIVACYREQUIRED"):
            client.login(*mailbox)
        client.starttls(mail_servers.client_context())  # the certificate names 127.0.0.2 too
        client.login(*mailbox)


def test_plaintext_login_where_the_config_allows_it(mail_servers_allowing_plaintext: MailServers) -> None:
    servers = mail_servers_allowing_plaintext
    address, password = servers.new_mailbox()

    with IMAPClient(servers.insecure_host, port=servers.imap_starttls_port, ssl=False, timeout=10) as client:
        assert b"LOGINDISABLED" not in client.capabilities()
        client.login(address, password)
        assert client.select_folder("INBOX")[b"EXISTS"] == 0


def test_special_use_folders_are_listed_with_their_flags(mail_servers: MailServers, mailbox: Mailbox) -> None:
    with mail_servers.imap(mailbox.address) as client:
        listed = {name: set(flags) for flags, _delimiter, name in client.list_folders()}
        subscribed = {name for _flags, _delimiter, name in client.list_sub_folders()}
        trash = client.find_special_folder(b"\\Trash")

    assert set(listed) == {"INBOX", *SPECIAL_USE_FOLDERS}
    for name, flag in SPECIAL_USE_FOLDERS.items():
        assert flag.encode() in listed[name], name
    assert set(SPECIAL_USE_FOLDERS) <= subscribed
    assert trash == "Trash"


def test_lmtp_delivery_lands_in_the_inbox(mail_servers: MailServers, mailbox: Mailbox) -> None:
    mail_servers.deliver(mailbox.address, message(mailbox.address, "delivered over LMTP"))

    with mail_servers.imap(mailbox.address) as client:
        assert subjects(client) == [b"delivered over LMTP"]


def test_users_do_not_see_each_others_mail(mail_servers: MailServers) -> None:
    alice, bob = mail_servers.new_mailbox("alice"), mail_servers.new_mailbox("bob")
    mail_servers.deliver(alice.address, message(alice.address, "for alice"))

    with mail_servers.imap(bob.address) as client:
        assert subjects(client) == []


def test_idle_sees_exists_within_a_second_of_an_lmtp_delivery(mail_servers: MailServers, mailbox: Mailbox) -> None:
    with mail_servers.imap(mailbox.address) as client:
        client.select_folder("INBOX")
        client.idle()
        try:
            started = time.monotonic()
            mail_servers.deliver(mailbox.address, message(mailbox.address, "watched"))
            latency = wait_for_exists(client, timeout=5)
        finally:
            client.idle_done()
        total = time.monotonic() - started

    print(f"IDLE latency: delivery + EXISTS in {total * 1000:.0f} ms")
    assert total < 1.0, f"{latency=:.3f} s"


def test_append_returns_the_uid_and_keeps_flags_and_date(mail_servers: MailServers, mailbox: Mailbox) -> None:
    internal_date = datetime(2024, 3, 1, 12, tzinfo=UTC)

    first = mail_servers.append(mailbox.address, "Archive", message(mailbox.address, "one"), ("\\Seen",))
    second = mail_servers.append(
        mailbox.address, "Archive", message(mailbox.address, "two"), ("\\Flagged",), internal_date=internal_date
    )

    with mail_servers.imap(mailbox.address) as client:
        client.select_folder("Archive", readonly=True)
        fetched = client.fetch([first, second], ["FLAGS", "INTERNALDATE"])
    assert second == first + 1
    assert b"\\Seen" in fetched[first][b"FLAGS"]
    assert b"\\Flagged" in fetched[second][b"FLAGS"]
    assert fetched[second][b"INTERNALDATE"].astimezone(UTC).replace(tzinfo=None) == datetime(2024, 3, 1, 12)


def test_bulk_fill_of_1000_messages_is_seen_in_order_on_select(mail_servers: MailServers, mailbox: Mailbox) -> None:
    def factory(index: int) -> bytes | MaildirMessage:
        raw = message(mailbox.address, f"bulk {index}")
        return MaildirMessage(raw, flags=("\\Seen",)) if index % 2 else raw

    mail_servers.bulk_fill(mailbox.address, "Archive", 1000, factory)

    with mail_servers.imap(mailbox.address) as client:
        started = time.monotonic()
        selected = client.select_folder("Archive", readonly=True)
        seconds = time.monotonic() - started
        fetched = client.fetch([1, 2, 1000], ["ENVELOPE", "FLAGS"])

    print(f"SELECT of 1,000 bulk-filled messages: {seconds * 1000:.0f} ms")
    assert selected[b"EXISTS"] == 1000
    assert [fetched[n][b"ENVELOPE"].subject for n in (1, 2, 1000)] == [b"bulk 0", b"bulk 1", b"bulk 999"]
    assert b"\\Seen" not in fetched[1][b"FLAGS"]
    assert b"\\Seen" in fetched[2][b"FLAGS"]


def test_bulk_fill_creates_a_new_folder_and_refuses_unknown_users(mail_servers: MailServers, mailbox: Mailbox) -> None:
    mail_servers.bulk_fill(mailbox.address, "Projects", 3, lambda index: message(mailbox.address, f"p{index}"))
    with mail_servers.imap(mailbox.address) as client:
        assert client.folder_exists("Projects")
        assert subjects(client, "Projects") == [b"p0", b"p1", b"p2"]

    with pytest.raises(Exception, match="no such user"):
        mail_servers.bulk_fill("nobody@example.test", "INBOX", 1, lambda index: b"Subject: x\r\n\r\n")


def test_two_dovecots_run_side_by_side(mail_servers: MailServers) -> None:
    with Dovecot() as other:
        other.add_user("solo@example.test", "solo-password")
        other.deliver("solo@example.test", message("solo@example.test", "on the other server"))
        assert {other.imap_port, other.starttls_port, other.lmtp_port}.isdisjoint(
            {mail_servers.imap_port, mail_servers.imap_starttls_port, mail_servers.lmtp_port}
        )
        with other.imap("solo@example.test") as client:
            assert subjects(client) == [b"on the other server"]
        print(f"Dovecot start-up: {other.start_seconds * 1000:.0f} ms")
        assert other.start_seconds < 2
        directory = other.directory
    assert not other.running
    assert not directory.exists()
    assert "solo@example.test" not in mail_servers.users


# -- SMTP submission ----------------------------------------------------------------------------------------------


def test_smtps_submission_is_recorded_and_lands_in_the_inbox(mail_servers: MailServers, mailbox: Mailbox) -> None:
    raw = message(mailbox.address, "sent over SMTPS", sender=mailbox.address)
    with smtplib.SMTP_SSL(
        mail_servers.host, mail_servers.smtps_port, context=mail_servers.client_context(), timeout=10
    ) as smtp:
        smtp.login(*mailbox)
        refused = smtp.sendmail(mailbox.address, [mailbox.address], raw)

    assert refused == {}
    [received] = mail_servers.smtp.wait_for(1, to=mailbox.address)
    assert received.user == mailbox.address
    assert received.mail_from == mailbox.address
    assert received.rcpt_tos == (mailbox.address,)
    assert received.relayed_to == (mailbox.address,)
    assert received.implicit_tls
    assert received.raw.replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")
    with mail_servers.imap(mailbox.address) as client:
        assert subjects(client) == [b"sent over SMTPS"]


def test_starttls_submission(mail_servers: MailServers, mailbox: Mailbox) -> None:
    outsider = "someone@elsewhere.test"
    with smtplib.SMTP(mail_servers.host, mail_servers.smtp_starttls_port, timeout=10) as smtp:
        smtp.starttls(context=mail_servers.client_context())
        smtp.login(*mailbox)
        smtp.sendmail(mailbox.address, [mailbox.address, outsider], message(mailbox.address, "sent after STARTTLS"))

    [received] = mail_servers.smtp.wait_for(1, to=mailbox.address)
    assert not received.implicit_tls
    assert received.rcpt_tos == (mailbox.address, outsider)
    assert received.relayed_to == (mailbox.address,)  # not a mail user: recorded, not delivered
    with mail_servers.imap(mailbox.address) as client:
        assert subjects(client) == [b"sent after STARTTLS"]


def test_auth_before_tls_is_neither_offered_nor_accepted(mail_servers: MailServers, mailbox: Mailbox) -> None:
    with smtplib.SMTP(mail_servers.host, mail_servers.smtp_starttls_port, timeout=10) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls")
        assert not smtp.has_extn("auth")
        with pytest.raises(smtplib.SMTPNotSupportedError):
            smtp.login(*mailbox)
        credentials = base64.b64encode(f"\0{mailbox.address}\0{mailbox.password}".encode()).decode()
        code, _ = smtp.docmd("AUTH", f"PLAIN {credentials}")
        assert code == 530
        code, _ = smtp.docmd("MAIL", f"FROM:<{mailbox.address}>")
        assert code == 530
    assert mail_servers.smtp.messages_for(mailbox.address) == []


def test_smtp_refuses_a_wrong_password_and_mail_without_auth(mail_servers: MailServers, mailbox: Mailbox) -> None:
    context = mail_servers.client_context()
    with smtplib.SMTP_SSL(mail_servers.host, mail_servers.smtps_port, context=context, timeout=10) as smtp:
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            smtp.login(mailbox.address, mailbox.password + "x")
        assert refused.value.smtp_code == 535
        with pytest.raises(smtplib.SMTPSenderRefused) as no_auth:
            smtp.sendmail(mailbox.address, [mailbox.address], message(mailbox.address, "never"))
        assert no_auth.value.smtp_code == 530


def test_reject_next_fails_one_submission(mail_servers: MailServers, mailbox: Mailbox) -> None:
    smtp_server = mail_servers.smtp
    bystander = mail_servers.new_mailbox("bystander")
    smtp_server.reject_next(552, "5.3.4 Message too big for this test", user=mailbox.address)
    smtp_server.reject_next(550, "5.1.1 No such recipient here", stage="RCPT", user=mailbox.address)
    with smtplib.SMTP_SSL(
        mail_servers.host, mail_servers.smtps_port, context=mail_servers.client_context(), timeout=10
    ) as smtp:
        smtp.login(*bystander)  # another user's submission takes none of the rejections
        smtp.sendmail(bystander.address, [bystander.address], message(bystander.address, "unaffected"))
    context = mail_servers.client_context()
    with smtplib.SMTP_SSL(mail_servers.host, mail_servers.smtps_port, context=context, timeout=10) as smtp:
        smtp.login(*mailbox)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as rcpt:
            smtp.sendmail(mailbox.address, [mailbox.address], message(mailbox.address, "refused recipient"))
        with pytest.raises(smtplib.SMTPDataError) as data:
            smtp.sendmail(mailbox.address, [mailbox.address], message(mailbox.address, "refused data"))
        smtp.sendmail(mailbox.address, [mailbox.address], message(mailbox.address, "accepted"))

    assert rcpt.value.recipients[mailbox.address][0] == 550
    assert data.value.smtp_code == 552
    assert [m.raw.count(b"accepted") for m in smtp_server.wait_for(1, to=mailbox.address)] == [1]


def test_a_421_rejection_closes_the_connection(mail_servers: MailServers, mailbox: Mailbox) -> None:
    mail_servers.smtp.reject_next(421, "4.3.2 Shutting down for a test", stage="MAIL", user=mailbox.address)
    context = mail_servers.client_context()
    with smtplib.SMTP_SSL(mail_servers.host, mail_servers.smtps_port, context=context, timeout=10) as smtp:
        smtp.login(*mailbox)
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail(mailbox.address, [mailbox.address], message(mailbox.address, "temporary"))
        assert refused.value.smtp_code == 421
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtp.noop()


def test_send_then_idle_sees_it_end_to_end(mail_servers: MailServers, mailbox: Mailbox) -> None:
    sender = mail_servers.new_mailbox("sender")
    with mail_servers.imap(mailbox.address) as watcher:
        watcher.select_folder("INBOX")
        watcher.idle()
        try:
            started = time.monotonic()
            with smtplib.SMTP_SSL(
                mail_servers.host, mail_servers.smtps_port, context=mail_servers.client_context(), timeout=10
            ) as smtp:
                smtp.login(*sender)
                smtp.sendmail(sender.address, [mailbox.address], message(mailbox.address, "end to end"))
            wait_for_exists(watcher, timeout=5)
        finally:
            watcher.idle_done()
        total = time.monotonic() - started

    print(f"SMTP submission -> LMTP -> IDLE EXISTS in {total * 1000:.0f} ms")
    assert total < 1.5


async def test_asyncio_tests_can_wait_without_blocking_their_loop(mail_servers: MailServers, mailbox: Mailbox) -> None:
    def send() -> None:
        time.sleep(0.2)  # in a worker thread: the test's loop must keep ticking while it waits for the message
        context = mail_servers.client_context()
        with smtplib.SMTP_SSL(mail_servers.host, mail_servers.smtps_port, context=context, timeout=10) as smtp:
            smtp.login(*mailbox)
            smtp.sendmail(mailbox.address, [mailbox.address], message(mailbox.address, "from asyncio"))

    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    try:
        sending = asyncio.create_task(asyncio.to_thread(send))
        received = await mail_servers.smtp.wait_for_async(1, to=mailbox.address)
        await sending
    finally:
        ticker.cancel()
    assert len(received) == 1
    assert ticks >= 5


def test_stopping_with_connections_open_is_clean(mail_servers: MailServers, mailbox: Mailbox) -> None:
    server = SubmissionServer(users=mail_servers.users, tls=mail_servers.tls)
    context = mail_servers.client_context()
    open_tls = smtplib.SMTP_SSL(server.host, server.smtps_port, context=context, timeout=10)
    open_plain = smtplib.SMTP(server.host, server.starttls_port, timeout=10)
    open_tls.login(*mailbox)
    try:
        server.stop()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            open_tls.noop()
        with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)):
            open_plain.noop()
    finally:
        open_tls.close()
        open_plain.close()
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP(server.host, server.starttls_port, timeout=10)
