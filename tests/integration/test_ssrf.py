"""The SSRF guard: ConnectImapAccount and every later connection refuse mail servers on internal addresses unless
[imap] allowed_networks lets them through; a name is resolved once per connection and the socket goes to the
address that was checked (no DNS rebinding), while TLS verifies the name. A refusal says whether the IMAP or the
SMTP server was refused (message and ErrorInfo metadata ``server``), never the host or the address."""

from __future__ import annotations

import dataclasses
import ipaddress
import ssl
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1 import resources_pb2 as rpb

from server.config import Config, ImapConfig
from server.domain.models import MailServer, TransportSecurity
from server.errors import PermissionDenied, ProviderUnavailable
from server.providers.imap import network
from server.providers.imap.connection import Credentials, open_imap
from server.providers.imap.network import NetworkGuard
from tests.broker import LOOPBACK_NETWORKS, broker_config, error_reason, rich_status, running_broker, stubs
from tests.integration.test_imap import ALL, connect_request, imap_config
from tests.mailserver import Mailbox, MailServers
from tests.pki import TestPki

REFUSED = [
    "127.0.0.1",
    "127.1.2.3",
    "0.0.0.0",  # noqa: S104 - an address refused, not bound
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.1",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "ff02::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "2001::1",  # Teredo
    "2001:db8::1",
    "fec0::1",
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "2607:f8b0:4004:800::200e", "::ffff:8.8.8.8", "64:ff9b::808:808"]


def _refused(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, dict[str, str], list[str]]:
    """Code, reason, ErrorInfo metadata and BadRequest fields of a refusal."""
    metadata: dict[str, str] = {}
    fields: list[str] = []
    status = rich_status(error)
    for detail in status.details if status else []:
        info, bad_request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            metadata = dict(info.metadata)
        elif detail.Unpack(bad_request):
            fields = [violation.field for violation in bad_request.field_violations]
    return error.code(), error_reason(error), metadata, fields


def _says_which(error: grpc.aio.AioRpcError, *names: str) -> bool:
    """The message names exactly these servers (IMAP, SMTP)."""
    details = error.details() or ""
    return all((name in details) == (name in names) for name in ("IMAP", "SMTP"))


@pytest.mark.parametrize("address", REFUSED)
def test_internal_addresses_are_refused_by_default(address: str) -> None:
    assert not NetworkGuard().permits(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_permitted(address: str) -> None:
    assert NetworkGuard().permits(ipaddress.ip_address(address))


def test_allowed_networks_let_an_internal_range_through_and_nothing_else() -> None:
    guard = NetworkGuard.from_config(["10.20.0.0/16"])
    assert guard.permits(ipaddress.ip_address("10.20.3.4"))
    assert guard.permits(ipaddress.ip_address("::ffff:10.20.3.4"))  # the same address, IPv4-mapped
    assert not guard.permits(ipaddress.ip_address("10.21.0.1"))
    assert not guard.permits(ipaddress.ip_address("127.0.0.1"))


class StubResolver:
    """Answers each lookup with the next list of addresses, and counts the lookups."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.lookups: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


@pytest.fixture
def stub_resolver(monkeypatch: pytest.MonkeyPatch) -> StubResolver:
    resolver = StubResolver(["192.0.2.1"])
    monkeypatch.setattr(network, "resolve", resolver)
    return resolver


def test_a_name_rebound_to_a_private_address_is_refused_and_connections_go_to_the_checked_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    resolver = StubResolver(["203.0.113.7", "8.8.4.4"], ["10.0.0.7"])
    guard = NetworkGuard(resolver=resolver)
    tried: list[tuple[str, int]] = []

    def refuse(address: str, port: int, timeout: float) -> object:
        tried.append((address, port))
        raise ConnectionRefusedError()

    monkeypatch.setattr(network.socket, "create_connection", lambda target, timeout: refuse(*target, timeout))
    server = MailServer("mail.rebinding.test", 993, TransportSecurity.IMPLICIT_TLS)
    # First lookup: 203.0.113.7 is documentation space, so even a mix with a public address is refused whole.
    with pytest.raises(PermissionDenied) as caught:
        open_imap(server, Credentials("u", "p"), ssl.create_default_context(), 5, guard)
    assert caught.value.reason == "HOST_NOT_ALLOWED" and tried == []
    assert caught.value.metadata == {"server": "imap_server"} and "IMAP server" in caught.value.message
    assert "rebinding" not in caught.value.message and "203.0.113.7" not in caught.value.message
    # Then the name rebinds to a private address: refused again, and nothing was connected to.
    with pytest.raises(PermissionDenied) as caught:
        open_imap(server, Credentials("u", "p"), ssl.create_default_context(), 5, guard)
    assert caught.value.reason == "HOST_NOT_ALLOWED" and tried == []
    # A public answer is connected to as resolved, address by address, without another lookup.
    public = NetworkGuard(resolver=StubResolver(["8.8.4.4", "2001:4860:4860::8844"]))
    with pytest.raises(ProviderUnavailable) as unreachable:
        open_imap(server, Credentials("u", "p"), ssl.create_default_context(), 5, public)
    assert unreachable.value.reason == "PROVIDER_UNREACHABLE"
    assert tried == [("8.8.4.4", 993), ("2001:4860:4860::8844", 993)]


async def _connect_refused(
    config: Config, pki: TestPki, request: apb.ConnectImapAccountRequest
) -> grpc.aio.AioRpcError:
    """The error ConnectImapAccount ends with, on a broker of ``config``."""
    async with running_broker(config, pki) as running, running.channel(pki.alice) as channel:
        accounts, _ = stubs(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await accounts.ConnectImapAccount(request, timeout=20)
    return caught.value


def _imap_server(host: str, port: int = 993) -> rpb.MailServer:
    """A server with implicit TLS (IMAPS 993, or SMTPS with ``port=465``)."""
    return rpb.MailServer(host=host, port=port, security=rpb.TRANSPORT_SECURITY_IMPLICIT_TLS)


@pytest.mark.parametrize("host", ["127.0.0.1", "169.254.169.254", "::ffff:10.0.0.1", "fe80::1", "0.0.0.0"])  # noqa: S104
async def test_connect_refuses_an_internal_address_literal_before_any_connection(
    tmp_path: Path, pki: TestPki, host: str
) -> None:
    config = dataclasses.replace(broker_config(tmp_path, pki), imap=ImapConfig())
    request = apb.ConnectImapAccountRequest(
        imap_server=_imap_server(host),
        username="someone@example.test",
        password="irrelevant",
        capabilities=[rpb.CAPABILITY_READ],
    )
    error = await _connect_refused(config, pki, request)
    assert _refused(error) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "HOST_NOT_ALLOWED",
        {"server": "imap_server"},
        ["imap_server.host"],
    )
    assert _says_which(error, "IMAP")
    assert host not in (error.details() or "")


@pytest.mark.parametrize(
    ("imap_host", "smtp_host", "server", "names"),
    [
        ("mail.example.test", "169.254.169.254", "smtp_server", ("SMTP",)),
        ("10.0.0.1", "::1", "imap_server,smtp_server", ("IMAP", "SMTP")),
    ],
)
async def test_a_refused_smtp_address_literal_is_told_apart_from_the_imap_one(
    tmp_path: Path, pki: TestPki, imap_host: str, smtp_host: str, server: str, names: tuple[str, ...]
) -> None:
    config = dataclasses.replace(broker_config(tmp_path, pki), imap=ImapConfig())
    request = apb.ConnectImapAccountRequest(
        imap_server=_imap_server(imap_host),
        smtp_server=_imap_server(smtp_host, 465),
        username="someone@example.test",
        password="irrelevant",
        capabilities=ALL,
    )
    error = await _connect_refused(config, pki, request)
    code, reason, metadata, fields = _refused(error)
    assert (code, reason, metadata) == (grpc.StatusCode.PERMISSION_DENIED, "HOST_NOT_ALLOWED", {"server": server})
    assert fields == [f"{role}.host" for role in server.split(",")]
    assert _says_which(error, *names)
    assert smtp_host not in (error.details() or "") and imap_host not in (error.details() or "")


async def test_connect_refuses_a_name_that_resolves_to_an_internal_address(
    tmp_path: Path, pki: TestPki, stub_resolver: StubResolver
) -> None:
    stub_resolver.answers = [["10.9.8.7"]]
    config = dataclasses.replace(broker_config(tmp_path, pki), imap=ImapConfig())
    request = apb.ConnectImapAccountRequest(
        imap_server=_imap_server("mail.internal.test"),
        username="someone@example.test",
        password="irrelevant",
        capabilities=[rpb.CAPABILITY_READ],
    )
    error = await _connect_refused(config, pki, request)
    assert _refused(error) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "HOST_NOT_ALLOWED",
        {"server": "imap_server"},
        [],
    )
    assert _says_which(error, "IMAP")
    assert "internal" not in (error.details() or "")
    assert stub_resolver.lookups == ["mail.internal.test"]


async def test_an_smtp_server_name_that_resolves_to_an_internal_address_is_refused_as_the_smtp_server(
    tmp_path: Path, pki: TestPki, mail_servers: MailServers, mailbox: Mailbox, stub_resolver: StubResolver
) -> None:
    # The IMAP server (Dovecot on 127.0.0.1, allowed) logs in; the SMTP server's name resolves to a private address.
    stub_resolver.answers = [["127.0.0.1"], ["10.9.8.7"]]
    config = imap_config(tmp_path, pki, mail_servers, allowed_networks=("127.0.0.1/32",))
    request = connect_request(mail_servers, mailbox)
    request.imap_server.host = "localhost"  # the name on Dovecot's certificate
    request.smtp_server.host = "smtp.internal.test"
    error = await _connect_refused(config, pki, request)
    assert _refused(error) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "HOST_NOT_ALLOWED",
        {"server": "smtp_server"},
        [],
    )
    assert _says_which(error, "SMTP")
    assert "internal" not in (error.details() or "")
    assert stub_resolver.lookups == ["localhost", "smtp.internal.test"]


async def test_an_account_whose_name_rebinds_to_a_refused_address_is_refused_at_the_next_connection(
    tmp_path: Path, pki: TestPki, mail_servers: MailServers, mailbox: Mailbox, stub_resolver: StubResolver
) -> None:
    # Only the Dovecot's exact address is allowed; the name first resolves there, then to the metadata endpoint.
    stub_resolver.answers = [["127.0.0.1"], ["127.0.0.1"], ["169.254.169.254"]]
    config = imap_config(tmp_path, pki, mail_servers, allowed_networks=("127.0.0.1/32",))
    async with running_broker(config, pki) as running, running.channel(pki.alice) as channel:
        accounts, mail = stubs(channel)
        request = connect_request(mail_servers, mailbox)
        request.imap_server.host = request.smtp_server.host = "localhost"  # the name on Dovecot's certificate
        account = await accounts.ConnectImapAccount(request, timeout=20)  # IMAP and SMTP: two lookups
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=20)
    assert _refused(caught.value)[:3] == (
        grpc.StatusCode.PERMISSION_DENIED,
        "HOST_NOT_ALLOWED",
        {"server": "imap_server"},
    )
    assert _says_which(caught.value, "IMAP")
    assert stub_resolver.lookups == ["localhost"] * 3


async def test_tls_still_verifies_the_name_not_the_address_it_resolved_to(
    tmp_path: Path, pki: TestPki, mail_servers: MailServers, mailbox: Mailbox, stub_resolver: StubResolver
) -> None:
    stub_resolver.answers = [["127.0.0.1"]]  # Dovecot, whose certificate names localhost and 127.0.0.1 only
    config = imap_config(tmp_path, pki, mail_servers, allowed_networks=LOOPBACK_NETWORKS)
    async with running_broker(config, pki) as running, running.channel(pki.alice) as channel:
        accounts, _ = stubs(channel)
        request = connect_request(mail_servers, mailbox, [rpb.CAPABILITY_READ])
        request.imap_server.host = "mail.elsewhere.test"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await accounts.ConnectImapAccount(request, timeout=20)
    assert (caught.value.code(), error_reason(caught.value)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "PROVIDER_TLS_UNTRUSTED",
    )
    assert stub_resolver.lookups == ["mail.elsewhere.test"]
