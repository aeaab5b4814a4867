"""Real mail servers for integration tests: a private Dovecot (IMAP, LMTP) and an SMTP submission server.

    servers = MailServers()                      # or the ``mail_servers`` fixture (tests/mailserver/fixtures.py)
    address, password = servers.new_mailbox()    # a fresh user: tests never see each other's mail
    smtplib.SMTP_SSL(servers.host, servers.smtps_port, context=servers.client_context())   # submit ...
    IMAPClient(servers.host, servers.imap_port, ssl_context=servers.client_context())      # ... and read

Send -> SMTP (AUTH over TLS) -> LMTP into Dovecot -> IDLE EXISTS on a watching client, all on 127.0.0.1 with
certificates from a CA made at start-up (``ca_path``). Needs root and Dovecot (``scripts/install-system-deps``).
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import shutil
import ssl
import tempfile
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from imapclient import IMAPClient

from tests.mailserver.dovecot import SPECIAL_USE_FOLDERS, Dovecot, DovecotError
from tests.mailserver.maildir import MaildirMessage, MessageFactory
from tests.mailserver.smtp import Received, SubmissionServer
from tests.mailserver.tls import ServerTls
from tests.mailserver.users import MailUsers

__all__ = [
    "SPECIAL_USE_FOLDERS",
    "Dovecot",
    "DovecotError",
    "MailServers",
    "MailUsers",
    "Mailbox",
    "MaildirMessage",
    "MessageFactory",
    "Received",
    "ServerTls",
    "SubmissionServer",
]

DOMAIN = "example.test"


class Mailbox(NamedTuple):
    """A mail user's address and password (unpacks as ``address, password``)."""

    address: str
    password: str


class MailServers:
    """Dovecot and the submission server, sharing one user table and one test CA; stop() ends both.

    ``allow_plaintext_auth`` is passed to :class:`Dovecot` (see there: it matters for connections to
    :attr:`insecure_host`). The SMTP server never accepts AUTH before TLS.
    """

    host = Dovecot.host
    insecure_host = Dovecot.insecure_host

    def __init__(self, *, allow_plaintext_auth: bool = False) -> None:
        """Start both servers (about 0.1 s; stopping takes about 1 s, most of it Dovecot's)."""
        self.users = MailUsers()
        self._counter = itertools.count(1)
        self._directory = Path(tempfile.mkdtemp(prefix="mailbroker-mail-"))
        self._running = contextlib.ExitStack()
        self._running.callback(shutil.rmtree, self._directory, ignore_errors=True)
        try:
            self.tls = ServerTls.create(self._directory / "tls")
            self.dovecot = self._running.enter_context(
                Dovecot(users=self.users, tls=self.tls, allow_plaintext_auth=allow_plaintext_auth)
            )
            self.smtp = self._running.enter_context(SubmissionServer(users=self.users, tls=self.tls, relay=self._relay))
        except BaseException:
            self._running.close()
            raise

    def _relay(self, mail_from: str, recipients: Sequence[str], raw: bytes) -> None:
        self.dovecot.deliver(recipients, raw, mail_from=mail_from)

    def stop(self) -> None:
        """Stop both servers and remove their files (a second call does nothing)."""
        self._running.close()

    def __enter__(self) -> MailServers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- users ----------------------------------------------------------------------------------------------------

    def new_mailbox(self, name: str = "user") -> Mailbox:
        """Create a user with a fresh address (``name-N-xxxx@example.test``) and a random password."""
        address = f"{name.lower()}-{next(self._counter)}-{secrets.token_hex(3)}@{DOMAIN}"
        password = secrets.token_urlsafe(18)
        self.users.add(address, password)
        return Mailbox(address, password)

    def add_user(self, address: str, password: str) -> None:
        """Add a user (both servers see them at once), or change a password (blocks up to 1 s, see Dovecot)."""
        self.users.add(address, password)

    # -- where the servers are -----------------------------------------------------------------------------------

    @property
    def ca_path(self) -> Path:
        """The PEM of the CA that issued both servers' certificate (for localhost, 127.0.0.1 and 127.0.0.2)."""
        return self.tls.ca_path

    def client_context(self) -> ssl.SSLContext:
        """Return an SSL context that trusts only the test CA and checks host names."""
        return self.tls.client_context()

    @property
    def imap_port(self) -> int:
        """Dovecot's IMAPS port (implicit TLS)."""
        return self.dovecot.imap_port

    @property
    def imap_starttls_port(self) -> int:
        """Dovecot's IMAP port (STARTTLS)."""
        return self.dovecot.starttls_port

    @property
    def lmtp_port(self) -> int:
        """Dovecot's LMTP port (no TLS, no AUTH: only this machine reaches it)."""
        return self.dovecot.lmtp_port

    @property
    def smtps_port(self) -> int:
        """The submission server's implicit-TLS port."""
        return self.smtp.smtps_port

    @property
    def smtp_starttls_port(self) -> int:
        """The submission server's STARTTLS port."""
        return self.smtp.starttls_port

    # -- mail -----------------------------------------------------------------------------------------------------

    def deliver(self, recipient: str | Sequence[str], raw: bytes, *, mail_from: str = f"sender@{DOMAIN}") -> None:
        """Deliver a message into Dovecot over LMTP, as an MTA would (fires IDLE on watching clients)."""
        self.dovecot.deliver(recipient, raw, mail_from=mail_from)

    def append(
        self,
        address: str,
        folder: str,
        raw: bytes,
        flags: Iterable[str] = (),
        internal_date: datetime | None = None,
    ) -> int:
        """Append a message to a user's folder over IMAP and return its UID."""
        return self.dovecot.append(address, folder, raw, flags, internal_date)

    def bulk_fill(self, address: str, folder: str, count: int, factory: MessageFactory) -> None:
        """Write ``count`` messages from ``factory(i)`` straight into a user's folder (see Dovecot.bulk_fill)."""
        self.dovecot.bulk_fill(address, folder, count, factory)

    def imap(self, address: str, *, timeout: float = 10) -> IMAPClient:
        """Return an IMAPClient logged in as ``address`` over IMAPS; use it in a ``with`` block to log out."""
        return self.dovecot.imap(address, timeout=timeout)
