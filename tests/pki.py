"""Test PKI: a CA, a server certificate and a cast of client certificates, good and bad, written to a directory.

    alice          spiffe://mailbroker.test/alice    good client
    bob            spiffe://mailbroker.test/bob      good client of another tenant
    carol          carol                             good client named only by its CN (no SAN)
    mallory        spiffe://mailbroker.test/mallory  good certificate, but no policy knows the identity
    foreign        spiffe://mailbroker.test/alice    issued by ANOTHER CA
    expired        spiffe://mailbroker.test/alice    not_after in the past
    not_yet_valid  spiffe://mailbroker.test/alice    not_before in the future

The three bad certificates claim alice's identity on purpose: if one of them gets in, nothing but the certificate
check could have stopped it, so a test that expects the handshake to fail cannot pass by a policy denial instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

from server.pki import CertKey, issue_cert, new_ca

TRUST_DOMAIN = "mailbroker.test"
SERVER_NAME = "localhost"


def spiffe_id(name: str) -> str:
    """Return the SPIFFE ID of a test workload."""
    return f"spiffe://{TRUST_DOMAIN}/{name}"


@dataclass(frozen=True)
class PemPair:
    """Paths of one certificate and its key, and the identity the certificate names."""

    cert: Path
    key: Path
    identity: str

    def key_cert_pair(self) -> tuple[bytes, bytes]:
        """Return (private key PEM, certificate PEM), the order grpc.ssl_*_credentials take them in."""
        return self.key.read_bytes(), self.cert.read_bytes()


@dataclass(frozen=True)
class TestPki:
    """Paths and identities of the test PKI made by :func:`make_test_pki`."""

    __test__: ClassVar[bool] = False  # a dataclass, not a pytest test class

    directory: Path
    ca: Path
    foreign_ca: Path
    server: PemPair
    alice: PemPair
    bob: PemPair
    carol: PemPair
    mallory: PemPair
    foreign: PemPair
    expired: PemPair
    not_yet_valid: PemPair

    def ca_pem(self) -> bytes:
        """Return the PEM of the CA the server trusts."""
        return self.ca.read_bytes()


def make_test_pki(tmp_path: Path) -> TestPki:
    """Create the test PKI under ``tmp_path / "pki"`` and return where everything is."""
    directory = tmp_path / "pki"
    directory.mkdir(mode=0o700)
    now = datetime.now(UTC)
    # The CA starts well before the expired certificate so that only the leaf's own dates make it invalid.
    ca = new_ca("mailbroker test CA", not_before=now - timedelta(days=60), not_after=now + timedelta(days=60))
    foreign_ca = new_ca("mailbroker test CA")  # the same name: only the key tells them apart
    ca_path = _write_cert(directory / "ca.pem", ca)
    foreign_ca_path = _write_cert(directory / "foreign-ca.pem", foreign_ca)

    def client(name: str, identity: str, cert: CertKey) -> PemPair:
        return _write_pair(directory, name, identity, cert)

    def spiffe_client(
        name: str,
        workload: str,
        issuer: CertKey = ca,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> PemPair:
        cert = issue_cert(
            issuer,
            common_name=workload,
            uri_sans=[spiffe_id(workload)],
            not_before=not_before,
            not_after=not_after,
        )
        return client(name, spiffe_id(workload), cert)

    server = issue_cert(
        ca, common_name=SERVER_NAME, dns_sans=[SERVER_NAME], ip_sans=["127.0.0.1"], client=False, server=True
    )
    return TestPki(
        directory=directory,
        ca=ca_path,
        foreign_ca=foreign_ca_path,
        server=_write_pair(directory, "server", SERVER_NAME, server),
        alice=spiffe_client("alice", "alice"),
        bob=spiffe_client("bob", "bob"),
        carol=client("carol", "carol", issue_cert(ca, common_name="carol")),
        mallory=spiffe_client("mallory", "mallory"),
        foreign=spiffe_client("foreign", "alice", issuer=foreign_ca),
        expired=spiffe_client(
            "expired", "alice", not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
        ),
        not_yet_valid=spiffe_client(
            "not-yet-valid", "alice", not_before=now + timedelta(days=1), not_after=now + timedelta(days=30)
        ),
    )


def _write_cert(path: Path, cert_key: CertKey) -> Path:
    path.write_bytes(cert_key.cert_pem())
    return path


def _write_pair(directory: Path, name: str, identity: str, cert_key: CertKey) -> PemPair:
    pair = PemPair(cert=directory / f"{name}.pem", key=directory / f"{name}-key.pem", identity=identity)
    cert_key.write(pair.cert, pair.key)
    return pair
