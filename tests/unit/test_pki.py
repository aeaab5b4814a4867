"""Tests for server.pki: the files of the development PKI, caller identities, and real mutual-TLS handshakes."""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.errors import ConfigurationError
from server.pki import CertKey, DevPki, create_dev_pki, identity_from_certificate, issue_cert, new_ca
from tests import pki as test_pki

ExtensionT = TypeVar("ExtensionT", bound=x509.ExtensionType)

DEADLINE = 5.0
WHOAMI = "/mailbroker.test.Probe/WhoAmI"


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def extension(cert: x509.Certificate, kind: type[ExtensionT]) -> x509.Extension[ExtensionT]:
    return cert.extensions.get_extension_for_class(kind)


@pytest.fixture
def dev_pki(tmp_path: Path) -> DevPki:
    return create_dev_pki(tmp_path / "pki")


# --- create_dev_pki: files and certificates ---------------------------------------------------------------------


def test_writes_the_expected_files_with_private_keys_0600_in_a_0700_directory(dev_pki: DevPki) -> None:
    directory = dev_pki.directory
    assert sorted(p.name for p in directory.iterdir()) == [
        "ca-key.pem",
        "ca.pem",
        "client-key.pem",
        "client.pem",
        "server-key.pem",
        "server.pem",
    ]
    assert (dev_pki.ca, dev_pki.ca_key) == (directory / "ca.pem", directory / "ca-key.pem")
    assert (dev_pki.server_cert, dev_pki.server_key) == (directory / "server.pem", directory / "server-key.pem")
    assert dev_pki.clients == {"client": (directory / "client.pem", directory / "client-key.pem")}
    assert mode(directory) == 0o700
    for key in ("ca-key.pem", "server-key.pem", "client-key.pem"):
        assert mode(directory / key) == 0o600, key
        assert (directory / key).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, unencrypted
    assert set(dev_pki.written) == set(directory.iterdir())


def test_keys_are_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        pki = create_dev_pki(tmp_path / "pki")
    finally:
        os.umask(previous)
    assert mode(pki.ca_key) == mode(pki.server_key) == mode(pki.clients["client"][1]) == 0o600
    assert mode(pki.directory) == 0o700


def test_ca_is_a_self_signed_p256_ca_limited_to_signing_leaves(dev_pki: DevPki) -> None:
    ca = load_cert(dev_pki.ca)
    ca.verify_directly_issued_by(ca)
    public_key = ca.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    assert isinstance(ca.signature_hash_algorithm, hashes.SHA256)
    basic = extension(ca, x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca
    assert basic.value.path_length == 0
    usage = extension(ca, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    assert extension(ca, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(public_key)


def test_server_certificate_chains_to_the_ca_with_its_names_and_server_auth_only(dev_pki: DevPki) -> None:
    ca, server = load_cert(dev_pki.ca), load_cert(dev_pki.server_cert)
    server.verify_directly_issued_by(ca)
    san = extension(server, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == []
    assert list(extension(server, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    basic = extension(server, x509.BasicConstraints)
    assert basic.critical
    assert not basic.value.ca
    ski = extension(ca, x509.SubjectKeyIdentifier).value
    assert extension(server, x509.AuthorityKeyIdentifier).value.key_identifier == ski.digest
    assert isinstance(server.signature_hash_algorithm, hashes.SHA256)


def test_server_key_matches_server_certificate(dev_pki: DevPki) -> None:
    key = serialization.load_pem_private_key(dev_pki.server_key.read_bytes(), password=None)
    assert key.public_key() == load_cert(dev_pki.server_cert).public_key()


def test_client_certificate_names_its_spiffe_identity_for_client_auth_only(dev_pki: DevPki) -> None:
    cert_path, key_path = dev_pki.clients["client"]
    ca, cert = load_cert(dev_pki.ca), load_cert(cert_path)
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "client"
    san = extension(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://mailbroker.dev/client"]
    assert list(extension(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not extension(cert, x509.BasicConstraints).value.ca
    assert identity_from_certificate(cert_path.read_bytes()) == "spiffe://mailbroker.dev/client"
    CertKey.load(cert_path, key_path)  # raises if the key is not this certificate's


def test_server_names_become_dns_or_ip_sans_and_trust_domain_names_clients(tmp_path: Path) -> None:
    pki = create_dev_pki(
        tmp_path, ["billing"], trust_domain="corp.example", server_names=["broker.internal", "::1", "10.0.0.7"]
    )
    san = extension(load_cert(pki.server_cert), x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.internal"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1"), ipaddress.ip_address("10.0.0.7")]
    assert identity_from_certificate(pki.clients["billing"][0].read_bytes()) == "spiffe://corp.example/billing"


def test_days_sets_the_lifetime(tmp_path: Path) -> None:
    pki = create_dev_pki(tmp_path, days=30)
    for path in (pki.ca, pki.server_cert, pki.clients["client"][0]):
        cert = load_cert(path)
        lifetime = cert.not_valid_after_utc - datetime.now(UTC)
        assert timedelta(days=29) < lifetime <= timedelta(days=30), path.name
        assert cert.not_valid_before_utc <= datetime.now(UTC)


# --- create_dev_pki: a second run -------------------------------------------------------------------------------


def test_second_call_reuses_the_ca_and_keeps_existing_files(dev_pki: DevPki) -> None:
    before = {p.name: p.read_bytes() for p in dev_pki.directory.iterdir()}

    again = create_dev_pki(dev_pki.directory, ["billing"])

    assert again.ca.read_bytes() == before["ca.pem"]
    assert again.ca_key.read_bytes() == before["ca-key.pem"]
    assert again.server_cert.read_bytes() == before["server.pem"]
    assert (dev_pki.directory / "client.pem").read_bytes() == before["client.pem"]
    cert_path, key_path = again.clients["billing"]
    assert set(again.written) == {cert_path, key_path}
    load_cert(cert_path).verify_directly_issued_by(load_cert(again.ca))
    assert identity_from_certificate(cert_path.read_bytes()) == "spiffe://mailbroker.dev/billing"
    assert mode(key_path) == 0o600


def test_force_reissues_leaves_under_the_same_ca(dev_pki: DevPki) -> None:
    ca_before, server_before = dev_pki.ca.read_bytes(), dev_pki.server_cert.read_bytes()
    dev_pki.server_key.chmod(0o644)  # someone loosened it; rewriting must not keep that mode

    again = create_dev_pki(dev_pki.directory, force=True)

    assert again.ca.read_bytes() == ca_before
    assert again.server_cert.read_bytes() != server_before
    load_cert(again.server_cert).verify_directly_issued_by(load_cert(again.ca))
    assert mode(again.server_key) == 0o600
    assert not [p for p in again.directory.iterdir() if p.name.endswith(".tmp")]


def test_leaves_never_outlive_a_reused_ca(tmp_path: Path) -> None:
    ca = new_ca("short-lived CA", not_after=datetime.now(UTC) + timedelta(days=10))
    ca.write(tmp_path / "ca.pem", tmp_path / "ca-key.pem")

    pki = create_dev_pki(tmp_path)

    assert load_cert(pki.server_cert).not_valid_after_utc == ca.cert.not_valid_after_utc
    assert load_cert(pki.clients["client"][0]).not_valid_after_utc == ca.cert.not_valid_after_utc


def test_expired_ca_is_refused(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    new_ca("old CA", not_before=now - timedelta(days=9), not_after=now - timedelta(days=1)).write(
        tmp_path / "ca.pem", tmp_path / "ca-key.pem"
    )
    with pytest.raises(ConfigurationError, match="expired"):
        create_dev_pki(tmp_path)


def test_half_a_ca_is_refused_and_nothing_is_written(dev_pki: DevPki) -> None:
    dev_pki.ca_key.unlink()
    before = sorted(dev_pki.directory.iterdir())
    with pytest.raises(ConfigurationError, match=r"ca-key\.pem is missing"):
        create_dev_pki(dev_pki.directory, force=True)
    assert sorted(dev_pki.directory.iterdir()) == before


def test_ca_key_that_does_not_match_the_ca_is_refused(dev_pki: DevPki) -> None:
    new_ca("another CA").write(dev_pki.directory / "other-ca.pem", dev_pki.ca_key)
    with pytest.raises(ConfigurationError, match="is not the private key of"):
        create_dev_pki(dev_pki.directory, ["billing"])
    assert not (dev_pki.directory / "billing.pem").exists()


def test_kept_leaf_from_a_replaced_ca_is_refused_before_anything_is_written(dev_pki: DevPki) -> None:
    dev_pki.ca.unlink()
    dev_pki.ca_key.unlink()
    with pytest.raises(ConfigurationError, match=r"server\.pem was not issued by the CA"):
        create_dev_pki(dev_pki.directory)
    assert not dev_pki.ca.exists()  # no new CA left behind by the failed call


# --- create_dev_pki: bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Billing",
        "-billing",
        ".hidden",
        "a/b",
        "../up",
        "x y",
        "caf\u00e9",
        "client\n",
        "a" * 64,
        "ca",
        "server",
        "billing-key",
    ],
)
def test_bad_client_name_is_a_one_line_configuration_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        create_dev_pki(tmp_path / "pki", ["good", name])
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "pki").exists()


@pytest.mark.parametrize("name", ["a", "0", "billing-v2.prod_1", "a" * 63])
def test_good_client_names_are_accepted(tmp_path: Path, name: str) -> None:
    pki = create_dev_pki(tmp_path, [name])
    assert pki.clients[name] == (tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"trust_domain": "Corp/../x"}, "trust domain"),
        ({"server_names": []}, "server name"),
        ({"server_names": ["bad name"]}, "server name"),
        ({"days": 0}, "lifetime"),
    ],
)
def test_bad_options_are_configuration_errors(tmp_path: Path, options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        create_dev_pki(tmp_path / "pki", **options)  # type: ignore[arg-type]
    assert not (tmp_path / "pki").exists()


def test_unwritable_directory_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ConfigurationError, match="cannot write"):
        create_dev_pki(tmp_path / "file" / "pki")


# --- identity_from_certificate ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> CertKey:
    return new_ca("identity test CA")


def test_identity_is_the_first_uri_san_in_pem_or_der(ca: CertKey) -> None:
    cert = issue_cert(
        ca, common_name="crm", uri_sans=["spiffe://corp/crm", "spiffe://corp/other"], dns_sans=["crm.corp"]
    )
    assert identity_from_certificate(cert.cert_pem()) == "spiffe://corp/crm"
    assert identity_from_certificate(cert.cert.public_bytes(serialization.Encoding.DER)) == "spiffe://corp/crm"


def test_identity_falls_back_to_the_common_name(ca: CertKey) -> None:
    assert identity_from_certificate(issue_cert(ca, common_name="carol").cert_pem()) == "carol"
    with_dns_only = issue_cert(ca, common_name="dave", dns_sans=["dave.corp"])
    assert identity_from_certificate(with_dns_only.cert_pem()) == "dave"


def test_identity_is_none_without_uri_san_or_common_name(ca: CertKey) -> None:
    nameless = issue_cert(ca, common_name=None, dns_sans=["host.corp"])
    assert identity_from_certificate(nameless.cert_pem()) is None


def test_identity_with_unprintable_characters_is_none(ca: CertKey) -> None:
    forged = issue_cert(ca, common_name="alice\nlevel=admin")
    assert identity_from_certificate(forged.cert_pem()) is None


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"garbage",
        b"\x30\x82\x01\x00" + b"\x00" * 8,
        b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\n",
        os.urandom(512),
    ],
)
def test_identity_of_garbage_is_none(garbage: bytes) -> None:
    assert identity_from_certificate(garbage) is None


def test_identity_of_a_truncated_certificate_is_none(ca: CertKey) -> None:
    der = issue_cert(ca, common_name="carol").cert.public_bytes(serialization.Encoding.DER)
    assert identity_from_certificate(der[: len(der) // 2]) is None


# --- the building blocks ---------------------------------------------------------------------------------------


def test_issue_cert_for_both_roles_and_a_verified_chain(ca: CertKey) -> None:
    both = issue_cert(ca, common_name="peer", dns_sans=["peer"], client=True, server=True)
    both.cert.verify_directly_issued_by(ca.cert)
    assert set(extension(both.cert, x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ExtendedKeyUsageOID.SERVER_AUTH,
    }
    with pytest.raises(InvalidSignature):
        both.cert.verify_directly_issued_by(new_ca("identity test CA").cert)
    with pytest.raises(ValueError, match="client"):
        issue_cert(ca, common_name="nobody", client=False, server=False)


def test_certkey_round_trips_through_files(tmp_path: Path, ca: CertKey) -> None:
    leaf = issue_cert(ca, common_name="carol")
    leaf.write(tmp_path / "carol.pem", tmp_path / "carol-key.pem")
    loaded = CertKey.load(tmp_path / "carol.pem", tmp_path / "carol-key.pem")
    assert loaded.cert == leaf.cert
    assert loaded.key_pem() == leaf.key_pem()
    assert mode(tmp_path / "carol-key.pem") == 0o600


def test_test_pki_identities_match_its_certificates(tmp_path: Path) -> None:
    made = test_pki.make_test_pki(tmp_path)
    ca = load_cert(made.ca)
    for pair in (made.server, made.alice, made.bob, made.carol, made.mallory, made.expired, made.not_yet_valid):
        load_cert(pair.cert).verify_directly_issued_by(ca)
        assert identity_from_certificate(pair.cert.read_bytes()) == pair.identity or pair is made.server
    load_cert(made.foreign.cert).verify_directly_issued_by(load_cert(made.foreign_ca))
    with pytest.raises(InvalidSignature):
        load_cert(made.foreign.cert).verify_directly_issued_by(ca)
    assert made.alice.identity == "spiffe://mailbroker.test/alice"
    assert made.bob.identity == "spiffe://mailbroker.test/bob"
    assert made.carol.identity == "carol"
    assert made.mallory.identity == "spiffe://mailbroker.test/mallory"
    now = datetime.now(UTC)
    assert load_cert(made.expired.cert).not_valid_after_utc < now
    assert load_cert(made.not_yet_valid.cert).not_valid_before_utc > now


# --- real mutual TLS over loopback -----------------------------------------------------------------------------


@dataclass
class ProbeServer:
    """A gRPC server with one method that answers with the caller identity it saw in the auth context."""

    port: int
    seen: list[str | None] = field(default_factory=list)


@asynccontextmanager
async def probe_server(ca_pem: bytes, key_pem: bytes, cert_pem: bytes) -> AsyncIterator[ProbeServer]:
    probe = ProbeServer(port=0)

    async def who_am_i(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        peer_certs = list(context.auth_context().get("x509_pem_cert", []))
        identity = identity_from_certificate(peer_certs[0]) if peer_certs else None
        probe.seen.append(identity)
        return (identity or "").encode()

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "mailbroker.test.Probe", {"WhoAmI": grpc.unary_unary_rpc_method_handler(who_am_i)}
    )
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True)
    probe.port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield probe
    finally:
        await server.stop(None)


async def call_who_am_i(
    port: int, ca_pem: bytes, client: tuple[bytes, bytes] | None, *, target_name: str | None = None
) -> bytes:
    key_pem, cert_pem = client if client is not None else (None, None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )
    options = [("grpc.ssl_target_name_override", target_name)] if target_name else []
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        # No (de)serializers: the method sends and receives raw bytes, so no protos are needed.
        method = channel.unary_unary(WHOAMI, request_serializer=None, response_deserializer=None)
        response: bytes = await method(b"", timeout=DEADLINE)
        return response


def read_pair(cert_path: Path, key_path: Path) -> tuple[bytes, bytes]:
    return key_path.read_bytes(), cert_path.read_bytes()


@pytest.fixture
async def dev_server(dev_pki: DevPki) -> AsyncIterator[ProbeServer]:
    async with probe_server(
        dev_pki.ca.read_bytes(), dev_pki.server_key.read_bytes(), dev_pki.server_cert.read_bytes()
    ) as probe:
        yield probe


async def test_dev_client_is_identified_by_its_spiffe_id(dev_pki: DevPki, dev_server: ProbeServer) -> None:
    client = read_pair(*dev_pki.clients["client"])

    answer = await call_who_am_i(dev_server.port, dev_pki.ca.read_bytes(), client)

    assert answer == b"spiffe://mailbroker.dev/client"
    assert dev_server.seen == ["spiffe://mailbroker.dev/client"]


async def test_dev_server_certificate_holds_its_dns_name(dev_pki: DevPki, dev_server: ProbeServer) -> None:
    client = read_pair(*dev_pki.clients["client"])
    answer = await call_who_am_i(dev_server.port, dev_pki.ca.read_bytes(), client, target_name="localhost")
    assert answer == b"spiffe://mailbroker.dev/client"


async def test_client_of_another_ca_is_refused_at_the_handshake(dev_pki: DevPki, dev_server: ProbeServer) -> None:
    impostor_ca = new_ca("mailbroker development CA")  # same name as the real CA; only the key differs
    impostor = issue_cert(impostor_ca, common_name="client", uri_sans=["spiffe://mailbroker.dev/client"])

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_who_am_i(dev_server.port, dev_pki.ca.read_bytes(), (impostor.key_pem(), impostor.cert_pem()))

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dev_server.seen == []


async def test_client_without_a_certificate_is_refused(dev_pki: DevPki, dev_server: ProbeServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_who_am_i(dev_server.port, dev_pki.ca.read_bytes(), None)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dev_server.seen == []


async def test_client_that_does_not_trust_the_server_ca_refuses_it(dev_pki: DevPki, dev_server: ProbeServer) -> None:
    client = read_pair(*dev_pki.clients["client"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call_who_am_i(dev_server.port, new_ca("some other CA").cert_pem(), client)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dev_server.seen == []


@pytest.fixture
def made_pki(tmp_path: Path) -> test_pki.TestPki:
    return test_pki.make_test_pki(tmp_path)


@pytest.mark.parametrize("name", ["alice", "bob", "carol", "mallory"])
async def test_test_pki_good_clients_get_in_with_their_identity(made_pki: test_pki.TestPki, name: str) -> None:
    pair: test_pki.PemPair = getattr(made_pki, name)
    async with probe_server(made_pki.ca_pem(), *made_pki.server.key_cert_pair()) as probe:
        answer = await call_who_am_i(probe.port, made_pki.ca_pem(), pair.key_cert_pair())
    assert answer == pair.identity.encode()


@pytest.mark.parametrize("name", ["foreign", "expired", "not_yet_valid"])
async def test_test_pki_bad_clients_are_refused(made_pki: test_pki.TestPki, name: str) -> None:
    pair: test_pki.PemPair = getattr(made_pki, name)
    async with probe_server(made_pki.ca_pem(), *made_pki.server.key_cert_pair()) as probe:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call_who_am_i(probe.port, made_pki.ca_pem(), pair.key_cert_pair())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert probe.seen == []
