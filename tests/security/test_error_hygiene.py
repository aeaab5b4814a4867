"""No status message, ErrorInfo, BadRequest, trailing metadata or log line of an error path carries the provider's
response text, an address, a host, a username or a password: canaries go in through each error path (bad
password, a host that does not resolve or answer, an IMAP server whose refusals quote canaries, an SMTP server whose
5xx and 4xx replies quote them) and are looked for, in every encoding, in everything that comes out. The Gmail and
Graph APIs' and token endpoints' error bodies: tests/security/test_provider_error_canaries.py."""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1 import resources_pb2 as rpb

from server.providers.imap import network
from tests.broker import error_reason, running_broker, stubs
from tests.integration.test_imap import connect_request, imap_config
from tests.mailserver import Mailbox, MailServers
from tests.mailserver.fixtures import mail_servers, mailbox  # noqa: F401 - fixtures
from tests.pki import TestPki, make_test_pki
from tests.security.canaries import canary, leaks
from tests.security.hygiene import captured_broker_log, everything, fails, leaking_lines

SYSTEM_RESOLVE = network.resolve
CANARIES = {name: canary(name) for name in ("password", "host", "provider", "user")}
CANARY_ADDRESS = f"{canary('address')}@example.test"
ALL = {**CANARIES, "address": CANARY_ADDRESS}


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return make_test_pki(tmp_path)


@pytest.fixture
def broker_log() -> Iterator[io.StringIO]:
    with captured_broker_log() as buffer:
        yield buffer


class RefusingImapServer:
    """An IMAP server whose every refusal quotes canaries: a NO to LOGIN, or (with ``login_ok``) a BAD to every
    command after it."""

    def __init__(self, login_ok: bool) -> None:
        self.login_ok = login_ok
        self.server: asyncio.Server | None = None
        text = f"{CANARIES['provider']} {CANARY_ADDRESS} {CANARIES['password']} {CANARIES['host']}".encode()
        self.text = text

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK [CAPABILITY IMAP4rev1] " + self.text + b"\r\n")
        while line := await reader.readline():
            tag, _, rest = line.partition(b" ")
            command = rest.split(b" ", 1)[0].strip().upper()
            if command == b"CAPABILITY":
                writer.write(b"* CAPABILITY IMAP4rev1\r\n" + tag + b" OK " + self.text + b"\r\n")
            elif command == b"LOGIN" and not self.login_ok:
                writer.write(tag + b" NO [AUTHENTICATIONFAILED] " + self.text + b"\r\n")
            elif command == b"LOGIN":
                writer.write(tag + b" OK " + self.text + b"\r\n")
            elif command == b"LOGOUT":
                writer.write(b"* BYE " + self.text + b"\r\n" + tag + b" OK\r\n")
            else:
                writer.write(tag + b" BAD " + self.text + b"\r\n")
            await writer.drain()
        writer.close()


@pytest.fixture
async def refusing_servers() -> AsyncIterator[tuple[int, int]]:
    no_login, bad_commands = RefusingImapServer(False), RefusingImapServer(True)
    first = await asyncio.start_server(no_login.handle, "127.0.0.1", 0)
    second = await asyncio.start_server(bad_commands.handle, "127.0.0.1", 0)
    try:
        yield first.sockets[0].getsockname()[1], second.sockets[0].getsockname()[1]
    finally:
        first.close()
        second.close()


def _resolver(host: str, port: int) -> list[str]:
    if host == f"{CANARIES['host']}.test":
        return ["127.0.0.1"]
    if host.endswith(".invalid"):
        raise socket.gaierror(socket.EAI_NONAME, f"{host} not known")
    return SYSTEM_RESOLVE(host, port)


async def test_no_canary_leaves_by_any_error_path(
    tmp_path: Path,
    pki: TestPki,
    mail_servers: MailServers,  # noqa: F811 - the fixture
    mailbox: Mailbox,  # noqa: F811 - the fixture
    refusing_servers: tuple[int, int],
    broker_log: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(network, "resolve", _resolver)
    no_login_port, bad_commands_port = refusing_servers
    config = imap_config(tmp_path, pki, mail_servers, allow_plaintext=True)
    seen: dict[str, tuple[grpc.StatusCode, str]] = {}
    texts: list[str] = []

    def request(host: str, port: int, security: int, password: str, username: str) -> apb.ConnectImapAccountRequest:
        return apb.ConnectImapAccountRequest(
            imap_server=rpb.MailServer(host=host, port=port, security=security),
            username=username,
            password=password,
            email_address=CANARY_ADDRESS,
            capabilities=[rpb.CAPABILITY_METADATA, rpb.CAPABILITY_READ],
        )

    tls, plain = rpb.TRANSPORT_SECURITY_IMPLICIT_TLS, rpb.TRANSPORT_SECURITY_PLAINTEXT
    cases = {
        # Dovecot, a real account, the wrong password.
        "bad password": request("localhost", mail_servers.imap_port, tls, CANARIES["password"], mailbox.address),
        # A name that does not resolve; one that resolves to a port where nothing listens.
        "no such host": request(f"{CANARIES['host']}.invalid", 993, tls, CANARIES["password"], CANARIES["user"]),
        "nothing listens": request(f"{CANARIES['host']}.test", 1, tls, CANARIES["password"], CANARIES["user"]),
        # A server whose certificate names another host.
        "wrong certificate": request(
            f"{CANARIES['host']}.test", mail_servers.imap_port, tls, CANARIES["password"], CANARIES["user"]
        ),
        # Mail servers whose refusals quote the canaries (NO to LOGIN; BAD to what follows).
        "provider NO": request("127.0.0.1", no_login_port, plain, CANARIES["password"], CANARIES["user"]),
        "provider BAD": request("127.0.0.1", bad_commands_port, plain, CANARIES["password"], CANARIES["user"]),
    }
    async with running_broker(config, pki) as running, running.channel(pki.alice) as channel:
        accounts, mail = stubs(channel)
        for name, connect in cases.items():
            try:
                account = await accounts.ConnectImapAccount(connect, timeout=20)
            except grpc.aio.AioRpcError as error:
                seen[name] = (error.code(), error_reason(error))
                texts.append(everything(error))
                continue
            # The login worked (the BAD server): its refusals come with the first read.
            error = await fails(mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=20))
            seen[name] = (error.code(), error_reason(error))
            texts.append(everything(error))
    assert seen == {
        "bad password": (grpc.StatusCode.UNAUTHENTICATED, "PROVIDER_AUTH_FAILED"),
        "no such host": (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNREACHABLE"),
        "nothing listens": (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNREACHABLE"),
        "wrong certificate": (grpc.StatusCode.FAILED_PRECONDITION, "PROVIDER_TLS_UNTRUSTED"),
        "provider NO": (grpc.StatusCode.UNAUTHENTICATED, "PROVIDER_AUTH_FAILED"),
        "provider BAD": (grpc.StatusCode.UNAVAILABLE, "PROVIDER_ERROR"),
    }
    assert [leaks(text, ALL) for text in texts] == [[]] * len(texts)
    log = broker_log.getvalue()
    assert "ConnectImapAccount" in log or "imap" in log  # the log was captured
    assert leaking_lines(log, ALL) == []


async def test_no_canary_leaves_by_an_smtp_refusal(
    tmp_path: Path,
    pki: TestPki,
    mail_servers: MailServers,  # noqa: F811 - the fixture
    mailbox: Mailbox,  # noqa: F811 - the fixture
    broker_log: io.StringIO,
) -> None:
    """The submission server refuses the sender, the recipient or the message, for good (5xx) or for now (4xx),
    in replies that quote canaries (as real servers quote the address, their host name and a queue id)."""
    text = f"{CANARIES['provider']} <{CANARY_ADDRESS}> {CANARIES['host']}.example.test {CANARIES['password']}"
    rejections = {
        "sender refused": ("MAIL", 553, f"5.7.1 {text}"),
        "recipient refused": ("RCPT", 550, f"5.1.1 {text}"),
        "message refused": ("DATA", 554, f"5.7.0 {text}"),
        "message deferred": ("DATA", 451, f"4.3.0 {text}"),
        "service closing": ("DATA", 421, f"4.7.0 {text}"),
    }
    config = imap_config(tmp_path, pki, mail_servers)
    seen: dict[str, tuple[grpc.StatusCode, str]] = {}
    texts: list[str] = []
    async with running_broker(config, pki) as running, running.channel(pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await accounts.ConnectImapAccount(connect_request(mail_servers, mailbox), timeout=20)
        for name, (stage, code, reply) in rejections.items():
            mail_servers.smtp.reject_next(code, reply, stage=stage, user=mailbox.address)  # type: ignore[arg-type]
            send = mpb.SendMessageRequest(
                account=account.name,
                message=mpb.OutgoingMessage(
                    to_recipients=[rpb.EmailAddress(address=CANARY_ADDRESS)], subject="hygiene", text_body="hygiene"
                ),
            )
            error = await fails(mail.SendMessage(send, timeout=20))
            seen[name] = (error.code(), error_reason(error))
            texts.append(everything(error))
    assert seen == {
        "sender refused": (grpc.StatusCode.FAILED_PRECONDITION, "SENDER_REFUSED"),
        "recipient refused": (grpc.StatusCode.FAILED_PRECONDITION, "RECIPIENTS_REFUSED"),
        "message refused": (grpc.StatusCode.FAILED_PRECONDITION, "MESSAGE_REJECTED"),
        "message deferred": (grpc.StatusCode.UNAVAILABLE, "PROVIDER_DEFERRED"),
        # smtplib closes the connection on a 421 and raises the reply: nothing was sent, try later.
        "service closing": (grpc.StatusCode.UNAVAILABLE, "PROVIDER_DEFERRED"),
    }
    assert [leaks(text, ALL) for text in texts] == [[]] * len(texts)
    log = broker_log.getvalue()
    assert "SendMessage" in log  # the log was captured
    assert leaking_lines(log, ALL) == []
