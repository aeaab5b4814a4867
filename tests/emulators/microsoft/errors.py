"""Errors as Microsoft sends them: Microsoft Graph's JSON error and the identity platform's OAuth 2.0 error with its
AADSTS code.

Graph (``graph/errors`` in the Graph docs)::

    {"error": {"code": "ErrorItemNotFound", "message": "...",
               "innerError": {"date", "request-id", "client-request-id"},
               "details"?: [{"code", "message", "target"}]}}

Identity platform (``reference-error-codes`` / the v2.0 auth code flow's error response)::

    {"error": "invalid_grant", "error_description": "AADSTS70008: ...\\r\\nTrace ID: ...\\r\\nCorrelation ID: ...\\r\\n
     Timestamp: ...", "error_codes": [70008], "timestamp", "trace_id", "correlation_id", "error_uri", "suberror"?}
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any


def _now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")


class GraphError(Exception):
    """A Microsoft Graph error response."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        details: tuple[dict[str, str], ...] = (),
        html: str | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.details = details  # the optional ``details`` list: {"code", "message", "target"} each
        self.html = html  # sent instead of the JSON error when set (a gateway's page)

    def body(self, request_id: str, client_request_id: str) -> dict[str, Any]:
        error: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "innerError": {
                "date": _now_text(),
                "request-id": request_id,
                "client-request-id": client_request_id,
            },
        }
        if self.details:
            error["details"] = [dict(detail) for detail in self.details]
        return {"error": error}


def bad_request(message: str, code: str = "BadRequest") -> GraphError:
    return GraphError(400, code, message)


def not_found() -> GraphError:
    return GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")


def malformed_id() -> GraphError:
    return GraphError(400, "ErrorInvalidIdMalformed", "Id is malformed.")


def access_denied() -> GraphError:
    return GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")


def unknown_property(name: str, type_name: str) -> GraphError:
    return GraphError(
        400, "RequestBroker--ParseUri", f"Could not find a property named '{name}' on type '{type_name}'."
    )


def not_implemented(what: str) -> GraphError:
    """What the emulator does not do: refused out loud rather than answered wrongly."""
    return GraphError(501, "emulator.NotImplemented", f"Not implemented by the Microsoft emulator: {what}")


def invalid_token(message: str) -> GraphError:
    return GraphError(
        401,
        "InvalidAuthenticationToken",
        message,
        {
            "WWW-Authenticate": 'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/'
            'authorize", client_id="00000003-0000-0000-c000-000000000000"'
        },
    )


# Faults a test can inject on Graph requests: (status, code) -> message, as Graph's throttling guidance shows them.
FAULTS: dict[tuple[int, str], str] = {
    (429, "TooManyRequests"): "Please retry again later.",
    (429, "ApplicationThrottled"): "Application is over its MailboxConcurrency limit.",
    (503, "serviceNotAvailable"): "The service is temporarily unavailable. Please retry later.",
    (504, "gatewayTimeout"): "The request timed out.",
}
MAILBOX_CONCURRENCY = (429, "ApplicationThrottled", "Application is over its MailboxConcurrency limit.")


class OAuthError(Exception):
    """An identity platform (STS) error: RFC 6749 section 5.2 plus Microsoft's AADSTS fields."""

    def __init__(
        self,
        error: str,
        aadsts: int,
        description: str,
        status: int = 400,
        suberror: str | None = None,
        retry_after: int | None = None,
        html: str | None = None,
    ) -> None:
        super().__init__(f"{error}: AADSTS{aadsts}: {description}")
        self.error = error
        self.aadsts = aadsts
        self.description = description
        self.status = status
        self.suberror = suberror
        self.retry_after = retry_after  # a Retry-After header (the STS sends one with 429 and 503)
        self.html = html  # sent instead of the JSON error when set (a gateway's page)

    def body(self, correlation_id: str | None = None) -> dict[str, Any]:
        trace_id = str(uuid.uuid4())
        correlation_id = correlation_id or str(uuid.uuid4())
        timestamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        body: dict[str, Any] = {
            "error": self.error,
            "error_description": f"AADSTS{self.aadsts}: {self.description} Trace ID: {trace_id} "
            f"Correlation ID: {correlation_id} Timestamp: {timestamp}",
            "error_codes": [self.aadsts],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": f"https://login.microsoftonline.com/error?code={self.aadsts}",
        }
        if self.suberror:
            body["suberror"] = self.suberror
        return body
