"""TLS material for the test mail servers: a CA made at test time and a server certificate for 127.0.0.1."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from server.pki import issue_cert, new_ca

SERVER_NAMES = ("localhost",)
SERVER_IPS = ("127.0.0.1", "127.0.0.2")


@dataclass(frozen=True)
class ServerTls:
    """Paths of a test CA and of the server certificate it issued for localhost and 127.0.0.1."""

    ca_path: Path
    cert_path: Path
    key_path: Path

    @classmethod
    def create(cls, directory: Path) -> ServerTls:
        """Make a fresh CA and server certificate in ``directory`` (created, mode 0700); the CA key is not kept."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca = new_ca("mailbroker test mail CA")
        leaf = issue_cert(
            ca, common_name=SERVER_NAMES[0], dns_sans=SERVER_NAMES, ip_sans=SERVER_IPS, client=False, server=True
        )
        tls = cls(
            ca_path=directory / "ca.pem", cert_path=directory / "server.pem", key_path=directory / "server-key.pem"
        )
        tls.ca_path.write_bytes(ca.cert_pem())
        leaf.write(tls.cert_path, tls.key_path)
        return tls

    def client_context(self) -> ssl.SSLContext:
        """Return a client context that trusts only the test CA and checks the host name."""
        return ssl.create_default_context(cafile=str(self.ca_path))

    def server_context(self) -> ssl.SSLContext:
        """Return a server context that presents the test server certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        return context
