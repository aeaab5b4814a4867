"""One long-lived mTLS channel to the broker, typed stubs on it, and gRPC's own retries for idempotent methods."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from mailbroker.v1 import account_service_pb2_grpc, mail_service_pb2, mail_service_pb2_grpc

from mailbroker_client.backoff import Backoff
from mailbroker_client.watch import watch

# Reads, and only reads: repeating one changes nothing. Left out on purpose: SendMessage (a blind retry could send
# twice; Client.send_message retries it only with a request_id), DeleteAccount (a repeat is NOT_FOUND and the
# receipt is lost), ConnectImapAccount, BeginOAuth and CompleteOAuth (each creates or consumes state), and
# WatchMailbox (a feed resumes from its token instead: see watch()).
RETRIED_METHODS: dict[str, tuple[str, ...]] = {
    "mailbroker.v1.AccountService": ("GetAccount", "ListAccounts", "ListAuditEvents"),
    "mailbroker.v1.MailService": ("ListFolders", "ListMessages", "GetMessage", "GetAttachment"),
}

SERVICE_CONFIG: dict[str, Any] = {
    "methodConfig": [
        {
            "name": [
                {"service": service, "method": method}
                for service, methods in RETRIED_METHODS.items()
                for method in methods
            ],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.2s",
                "maxBackoff": "5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}

Pem = str | os.PathLike[str] | bytes


def _pem(value: Pem) -> bytes:
    """PEM bytes as given, or read from a path."""
    return value if isinstance(value, bytes) else Path(value).read_bytes()


class Client:
    """Typed stubs over one channel: ``accounts`` (AccountService) and ``mail`` (MailService)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.accounts = account_service_pb2_grpc.AccountServiceStub(channel)  # type: ignore[no-untyped-call]
        self.mail = mail_service_pb2_grpc.MailServiceStub(channel)  # type: ignore[no-untyped-call]

    def watch(
        self,
        account: str,
        resume_token: str | None = None,
        *,
        folders: Sequence[str] = (),
        heartbeat_interval: float | None = None,
        backoff: Backoff = Backoff(),  # noqa: B008 (frozen)
        max_attempts: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> Iterator[mail_service_pb2.MailboxEvent]:
        """Follow ``account``'s changes, resuming from the last token on UNAVAILABLE (see ``watch.watch``)."""
        return watch(
            self.mail,
            account,
            resume_token,
            folders=folders,
            heartbeat_interval=heartbeat_interval,
            backoff=backoff,
            max_attempts=max_attempts,
            sleep=sleep,
        )

    def send_message(
        self,
        request: mail_service_pb2.SendMessageRequest,
        *,
        timeout: float | None = None,
        attempts: int = 4,
        backoff: Backoff = Backoff(initial=0.2, maximum=5),  # noqa: B008 (frozen)
        sleep: Callable[[float], None] = time.sleep,
    ) -> mail_service_pb2.SendMessageResponse:
        """Send a message, retrying on UNAVAILABLE with the same ``request_id`` (a random UUID when the request has
        none), so that the broker sends it at most once: a repeat returns the first result with ``replayed`` set."""
        if not request.request_id:
            filled = mail_service_pb2.SendMessageRequest()
            filled.CopyFrom(request)
            filled.request_id = str(uuid.uuid4())
            request = filled
        for attempt in range(attempts):
            try:
                response: mail_service_pb2.SendMessageResponse = self.mail.SendMessage(request, timeout=timeout)
                return response
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                    raise
            sleep(backoff.delay(attempt))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def connect(
    target: str,
    ca: Pem,
    cert: Pem,
    key: Pem,
    *,
    server_name: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> Client:
    """Open a mutual-TLS channel to ``target`` (``host:port``) and return typed stubs over it.

    ``ca`` is the CA that signed the broker's certificate; ``cert`` and ``key`` are this caller's certificate and key
    (paths or PEM bytes). Open it once and share it: a channel multiplexes any number of calls and feeds, and a
    fresh mTLS handshake costs milliseconds. ``server_name`` overrides the name checked in the broker's certificate.
    Idempotent reads are retried by gRPC on UNAVAILABLE (``SERVICE_CONFIG``).
    """
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_pem(ca), private_key=_pem(key), certificate_chain=_pem(cert)
    )
    channel_options: list[tuple[str, Any]] = [
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
    ]
    if server_name:
        channel_options.append(("grpc.ssl_target_name_override", server_name))
    channel_options.extend(options)
    return Client(grpc.secure_channel(target, credentials, options=channel_options))
