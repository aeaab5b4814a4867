"""The broker's one exception tree.

Every error the domain or a driver raises on purpose is a :class:`BrokerError`. Each subclass carries the gRPC
status it maps to (by name, so this module stays free of grpc) and a default ``reason`` in UPPER_SNAKE_CASE for
``google.rpc.ErrorInfo``. Exactly one place, ``server.interceptors.errors``, turns them into a gRPC status.

    BrokerError
    ├── InvalidArgument          INVALID_ARGUMENT      (field_violations → google.rpc.BadRequest)
    ├── NotFound                 NOT_FOUND
    ├── AlreadyExists            ALREADY_EXISTS
    ├── PermissionDenied         PERMISSION_DENIED
    ├── Unauthenticated          UNAUTHENTICATED
    ├── FailedPrecondition       FAILED_PRECONDITION
    │   └── CursorExpired        FAILED_PRECONDITION   (a feed or page cursor the provider no longer knows)
    ├── ResourceExhausted        RESOURCE_EXHAUSTED
    ├── OutcomeUnknown           UNKNOWN               (a send may or may not have gone out)
    ├── Unimplemented            UNIMPLEMENTED
    ├── DeadlineExceeded         DEADLINE_EXCEEDED
    ├── Unavailable              UNAVAILABLE
    │   ├── ShuttingDown         UNAVAILABLE           (streams end so clients resume on another replica)
    │   └── ProviderUnavailable  UNAVAILABLE           (retry_after when the provider said so)
    │       └── RateLimited      UNAVAILABLE
    └── Internal                 INTERNAL              (never carries detail to the caller)

Messages are written for the caller: they must never contain an address, subject, body, token, password, host or
any text that came from a provider. ``metadata`` goes into ErrorInfo.metadata and follows the same rule.

``ConfigurationError`` is separate: it is an operator mistake at start-up, printed as one line by the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, for google.rpc.BadRequest."""

    field: str
    description: str


class BrokerError(Exception):
    """Base of every deliberate error; see the module docstring for the tree."""

    code: str = "INTERNAL"
    default_reason: str = "INTERNAL"
    default_message: str = "internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        retry_after: float | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.field_violations = tuple(field_violations)
        self.retry_after = retry_after
        super().__init__(self.message)


class InvalidArgument(BrokerError):
    code = "INVALID_ARGUMENT"
    default_reason = "INVALID_ARGUMENT"
    default_message = "invalid argument"


class NotFound(BrokerError):
    code = "NOT_FOUND"
    default_reason = "NOT_FOUND"
    default_message = "not found"


class AlreadyExists(BrokerError):
    code = "ALREADY_EXISTS"
    default_reason = "ALREADY_EXISTS"
    default_message = "already exists"


class PermissionDenied(BrokerError):
    code = "PERMISSION_DENIED"
    default_reason = "PERMISSION_DENIED"
    default_message = "permission denied"


class Unauthenticated(BrokerError):
    code = "UNAUTHENTICATED"
    default_reason = "UNAUTHENTICATED"
    default_message = "unauthenticated"


class FailedPrecondition(BrokerError):
    code = "FAILED_PRECONDITION"
    default_reason = "FAILED_PRECONDITION"
    default_message = "failed precondition"


class CursorExpired(FailedPrecondition):
    default_reason = "CURSOR_EXPIRED"
    default_message = "the cursor has expired; resynchronise"


class ResourceExhausted(BrokerError):
    code = "RESOURCE_EXHAUSTED"
    default_reason = "RESOURCE_EXHAUSTED"
    default_message = "resource exhausted"


class OutcomeUnknown(BrokerError):
    """The provider may have acted: e.g. the connection dropped after the message was handed over."""

    code = "UNKNOWN"
    default_reason = "SEND_OUTCOME_UNKNOWN"
    default_message = "the mail server may or may not have accepted the message"


class Unimplemented(BrokerError):
    code = "UNIMPLEMENTED"
    default_reason = "NOT_IMPLEMENTED"
    default_message = "not implemented"


class DeadlineExceeded(BrokerError):
    code = "DEADLINE_EXCEEDED"
    default_reason = "DEADLINE_EXCEEDED"
    default_message = "deadline exceeded"


class Unavailable(BrokerError):
    code = "UNAVAILABLE"
    default_reason = "UNAVAILABLE"
    default_message = "unavailable; retry"


class ShuttingDown(Unavailable):
    default_reason = "SERVER_SHUTTING_DOWN"
    default_message = "the server is shutting down; resume from the last resume token"


class ProviderUnavailable(Unavailable):
    default_reason = "PROVIDER_UNAVAILABLE"
    default_message = "the mail provider is unavailable"


class RateLimited(ProviderUnavailable):
    default_reason = "PROVIDER_RATE_LIMITED"
    default_message = "the mail provider asked to slow down"


class Internal(BrokerError):
    code = "INTERNAL"
    default_reason = "INTERNAL"
    default_message = "internal error"


class ConfigurationError(Exception):
    """An operator mistake found at start-up (bad config, missing key or certificate, port in use).

    The message is one line meant for the operator's terminal; it names files and settings, never secrets.
    """
