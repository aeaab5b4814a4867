"""Opening IMAP and SMTP connections with verified TLS, and mapping their errors into the broker's tree.

Everything here blocks: callers run it in a BlockingPool thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import smtplib
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from imapclient import IMAPClient
from imapclient import exceptions as imap_exc

from server.domain.models import MailServer, TransportSecurity
from server.errors import (
    BrokerError,
    FailedPrecondition,
    ProviderUnavailable,
    Unauthenticated,
)


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


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Certificate- and host-verifying TLS; ``ca_file`` replaces the system trust store when set."""
    context = ssl.create_default_context(cafile=ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def open_imap(server: MailServer, credentials: Credentials, tls: ssl.SSLContext, timeout: float) -> IMAPClient:
    """A logged-in IMAPClient; the socket is closed again on any failure."""
    with provider_errors():
        client = IMAPClient(
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


def close_imap(client: IMAPClient) -> None:
    """Log out politely if possible, and always close the socket."""
    try:
        client.logout()
    except Exception:  # the connection is being discarded whatever happened
        with contextlib.suppress(Exception):
            client.shutdown()


def open_smtp(server: MailServer, credentials: Credentials, tls: ssl.SSLContext, timeout: float) -> smtplib.SMTP:
    """A logged-in SMTP submission session (implicit TLS or STARTTLS; AUTH only over TLS unless plaintext)."""
    with provider_errors():
        smtp: smtplib.SMTP
        if server.security is TransportSecurity.IMPLICIT_TLS:
            smtp = smtplib.SMTP_SSL(server.host, server.port, timeout=timeout, context=tls)
        else:
            smtp = smtplib.SMTP(server.host, server.port, timeout=timeout)
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
