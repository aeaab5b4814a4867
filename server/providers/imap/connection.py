"""Opening IMAP and SMTP connections with verified TLS, and mapping their errors into the broker's tree.

Every connection goes through the SSRF guard (server.providers.imap.network): the host name is resolved once, every
address checked, and the socket opened to a checked address while TLS verifies the name. Timeouts are capped by
the caller's deadline (server.domain.deadline), so no connect, login or command outlives the call it serves.

Everything here blocks: callers run it in a BlockingPool thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import smtplib
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from imapclient import IMAPClient, imap4
from imapclient import exceptions as imap_exc
from imapclient import tls as imap_tls

from server.domain import deadline
from server.domain.models import MailServer, TransportSecurity
from server.errors import (
    BrokerError,
    DeadlineExceeded,
    FailedPrecondition,
    ProviderUnavailable,
    Unauthenticated,
)
from server.providers.imap import network
from server.providers.imap.network import NetworkGuard

# A socket timeout of 0 would make the socket non-blocking: the least a capped timeout can be.
MIN_TIMEOUT_SECONDS = 0.05
# A timeout this close to the caller's deadline was the deadline (socket timers and clocks differ by a few ms).
DEADLINE_SLACK_SECONDS = 0.05


class _NoLoginEcho(logging.Filter):
    """imapclient logs "Logged in as <username>" at DEBUG; a username need not look like an address, so the
    backstop filter cannot be relied on to mask it (found by tests/security/test_error_hygiene.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("Logged in as"))


logging.getLogger("imapclient.imapclient").addFilter(_NoLoginEcho())


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never let a password reach a log line or a traceback's locals
        return "Credentials(<redacted>)"


class ConnectionLost(ProviderUnavailable):
    default_reason = "PROVIDER_CONNECTION_LOST"
    default_message = "the connection to the mail server was lost"


@contextmanager
def provider_errors() -> Iterator[None]:
    """Map imapclient, smtplib, ssl and socket errors to BrokerErrors, keeping the original as the cause.

    Messages are our own: a provider's text may quote the username or the message.
    """
    try:
        yield
    except BrokerError:
        raise
    except (imap_exc.LoginError, smtplib.SMTPAuthenticationError) as exc:
        raise Unauthenticated("the mail server refused the credentials", reason="PROVIDER_AUTH_FAILED") from exc
    except ssl.SSLCertVerificationError as exc:
        raise FailedPrecondition(
            "the mail server's TLS certificate could not be verified", reason="PROVIDER_TLS_UNTRUSTED"
        ) from exc
    except ssl.SSLError as exc:
        raise ProviderUnavailable(
            "the TLS handshake with the mail server failed", reason="PROVIDER_TLS_FAILED"
        ) from exc
    except (imap_exc.CapabilityError, smtplib.SMTPNotSupportedError) as exc:
        raise FailedPrecondition(
            "the mail server lacks a required capability (STARTTLS or AUTH)", reason="PROVIDER_CAPABILITY_MISSING"
        ) from exc
    except TimeoutError as exc:
        if _deadline_reached():
            # The command's timeout was the caller's deadline (see capped): the call ran out of time, which is the
            # caller's answer, not the mail server's failure.
            raise DeadlineExceeded("the call's deadline passed while the mail server was asked") from exc
        raise ProviderUnavailable("the mail server did not answer in time", reason="PROVIDER_TIMEOUT") from exc
    except socket.gaierror as exc:
        raise ProviderUnavailable(
            "the mail server's host name does not resolve", reason="PROVIDER_UNREACHABLE"
        ) from exc
    except (imap_exc.IMAPClientAbortError, smtplib.SMTPServerDisconnected) as exc:
        raise ConnectionLost() from exc
    except smtplib.SMTPRecipientsRefused as exc:
        raise FailedPrecondition("the mail server refused every recipient", reason="RECIPIENTS_REFUSED") from exc
    except smtplib.SMTPSenderRefused as exc:
        raise FailedPrecondition("the mail server refused the sender", reason="SENDER_REFUSED") from exc
    except smtplib.SMTPResponseException as exc:
        if 400 <= exc.smtp_code < 500:
            raise ProviderUnavailable("the mail server deferred the message", reason="PROVIDER_DEFERRED") from exc
        raise FailedPrecondition("the mail server rejected the message", reason="MESSAGE_REJECTED") from exc
    except smtplib.SMTPException as exc:
        raise ProviderUnavailable("the mail server failed", reason="PROVIDER_ERROR") from exc
    except imap_exc.IMAPClientError as exc:
        raise ProviderUnavailable("the mail server answered with an error", reason="PROVIDER_ERROR") from exc
    except OSError as exc:
        # Last: smtplib's exceptions are OSErrors too, and must keep their own meaning above.
        raise ProviderUnavailable("the mail server cannot be reached", reason="PROVIDER_UNREACHABLE") from exc


def _deadline_reached() -> bool:
    left = deadline.remaining()
    return left is not None and left <= DEADLINE_SLACK_SECONDS


def capped(timeout: float) -> float:
    """``timeout``, or less when the caller's deadline comes sooner; DeadlineExceeded once it has passed."""
    left = deadline.remaining()
    if left is None:
        return timeout
    if left <= 0:
        raise DeadlineExceeded("the call's deadline passed before the mail server was asked")
    return max(MIN_TIMEOUT_SECONDS, min(timeout, left))


class _PinnedIMAP4(imap4.IMAP4WithTimeout):  # type: ignore[misc]  # imapclient is untyped
    """Plain IMAP (then STARTTLS, which imaplib verifies against ``host``) to checked addresses."""

    def __init__(self, addresses: list[str], host: str, port: int, timeout: float | None) -> None:
        self._addresses = addresses
        super().__init__(host, port, timeout)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        return network.connect(self._addresses, self.port, timeout if timeout is not None else self._timeout)


class _PinnedIMAP4TLS(imap_tls.IMAP4_TLS):  # type: ignore[misc]  # imapclient is untyped
    """Implicit-TLS IMAP to checked addresses, SNI and certificate verification on ``host``."""

    def __init__(
        self, addresses: list[str], host: str, port: int, context: ssl.SSLContext, timeout: float | None
    ) -> None:
        self._addresses = addresses
        super().__init__(host, port, context, timeout)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        sock = network.connect(self._addresses, self.port, timeout if timeout is not None else self._timeout)
        wrapped: socket.socket = imap_tls.wrap_socket(sock, self.ssl_context, self.host)
        return wrapped


class _PinnedIMAPClient(IMAPClient):  # type: ignore[misc]  # imapclient is untyped
    def __init__(self, addresses: list[str], host: str, **kwargs: Any) -> None:
        self._addresses = addresses
        super().__init__(host, **kwargs)

    def _create_IMAP4(self) -> Any:
        timeout = getattr(self._timeout, "connect", None)
        if self.ssl:
            return _PinnedIMAP4TLS(self._addresses, self.host, self.port, self.ssl_context, timeout)
        return _PinnedIMAP4(self._addresses, self.host, self.port, timeout)


class _PinnedSMTP(smtplib.SMTP):
    def __init__(self, addresses: list[str], host: str, port: int, timeout: float) -> None:
        self._addresses = addresses
        super().__init__(host, port, timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return network.connect(self._addresses, port, timeout)


class _PinnedSMTPSSL(smtplib.SMTP_SSL):
    def __init__(self, addresses: list[str], host: str, port: int, timeout: float, context: ssl.SSLContext) -> None:
        self._addresses = addresses
        super().__init__(host, port, timeout=timeout, context=context)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = network.connect(self._addresses, port, timeout)
        return self.context.wrap_socket(sock, server_hostname=self._host)  # type: ignore[attr-defined]


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Certificate- and host-verifying TLS; ``ca_file`` replaces the system trust store when set."""
    context = ssl.create_default_context(cafile=ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def open_imap(
    server: MailServer, credentials: Credentials, tls: ssl.SSLContext, timeout: float, guard: NetworkGuard
) -> IMAPClient:
    """A logged-in IMAPClient on an address ``guard`` permits; the socket is closed again on any failure."""
    with provider_errors():
        timeout = capped(timeout)
        addresses = guard.addresses(server.host, server.port, role="imap_server")
        client = _PinnedIMAPClient(
            addresses,
            server.host,
            port=server.port,
            ssl=server.security is TransportSecurity.IMPLICIT_TLS,
            ssl_context=tls,
            timeout=timeout,
        )
        client.normalise_times = False  # keep INTERNALDATE's timezone instead of converting to naive local time
        try:
            if server.security is TransportSecurity.STARTTLS:
                client.starttls(tls)
            client.login(credentials.username, credentials.password)
        except BaseException:
            close_imap(client)
            raise
        return client


def set_command_timeout(client: IMAPClient, timeout: float) -> None:
    """Bound the next commands on a pooled connection by ``timeout`` capped by this call's deadline (the
    connection may have been opened for another call, with another deadline)."""
    client.socket().settimeout(capped(timeout))


def abort_connection(client: IMAPClient) -> None:
    """Cut a connection under the worker thread blocked on it, from another thread: its caller's deadline passed.

    shutdown(2) on the descriptor wakes the blocked read at once (the TLS layer is not touched, so the worker
    fails cleanly); the pool then discards the connection. Nothing is sent to the server.
    """
    with contextlib.suppress(Exception):
        socket.socket.shutdown(client.socket(), socket.SHUT_RDWR)


def close_imap(client: IMAPClient) -> None:
    """Log out politely if possible, and always close the socket."""
    try:
        client.logout()
    except Exception:  # the connection is being discarded whatever happened
        with contextlib.suppress(Exception):
            client.shutdown()


def open_smtp(
    server: MailServer, credentials: Credentials, tls: ssl.SSLContext, timeout: float, guard: NetworkGuard
) -> smtplib.SMTP:
    """A logged-in SMTP submission session on an address ``guard`` permits (implicit TLS or STARTTLS; AUTH only
    over TLS unless plaintext)."""
    with provider_errors():
        timeout = capped(timeout)
        addresses = guard.addresses(server.host, server.port, role="smtp_server")
        smtp: smtplib.SMTP
        if server.security is TransportSecurity.IMPLICIT_TLS:
            smtp = _PinnedSMTPSSL(addresses, server.host, server.port, timeout, tls)
        else:
            smtp = _PinnedSMTP(addresses, server.host, server.port, timeout)
        try:
            smtp.ehlo()
            if server.security is TransportSecurity.STARTTLS:
                smtp.starttls(context=tls)
                smtp.ehlo()
            smtp.login(credentials.username, credentials.password)
        except BaseException:
            close_smtp(smtp)
            raise
        return smtp


def close_smtp(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except Exception:  # the session is being discarded whatever happened
        smtp.close()
