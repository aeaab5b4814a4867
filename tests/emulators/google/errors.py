"""Errors as Google sends them: the JSON error shape of Google APIs and the RFC 6749 shape of the OAuth endpoints."""

from __future__ import annotations

from typing import Any

# HTTP status -> the canonical google.rpc.Code name Google puts in error.status.
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    412: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
}


class ApiError(Exception):
    """A Google API error response: ``{"error": {"code", "message", "errors": [...], "status", "details"?}}``."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        reason: str,
        domain: str = "global",
        location: str | None = None,
        location_type: str | None = None,
        error_info: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        html: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.location = location
        self.location_type = location_type
        self.error_info = error_info
        self.headers = dict(headers or {})
        # Sent instead of the JSON error when set: the HTML page Google's front ends answer some failures with.
        self.html = html

    def body(self) -> dict[str, Any]:
        item: dict[str, Any] = {"message": self.message, "domain": self.domain, "reason": self.reason}
        if self.location:
            item["location"] = self.location
            item["locationType"] = self.location_type or "parameter"
        error: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "errors": [item],
            "status": _STATUS_NAMES.get(self.code, "UNKNOWN"),
        }
        if self.error_info:
            error["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", **self.error_info}]
        return {"error": error}


def invalid_argument(message: str, *, location: str | None = None) -> ApiError:
    return ApiError(400, message, reason="invalidArgument", location=location)


def bad_request(message: str, *, location: str | None = None) -> ApiError:
    return ApiError(400, message, reason="badRequest", location=location)


def not_found() -> ApiError:
    return ApiError(404, "Requested entity was not found.", reason="notFound")


def forbidden(message: str) -> ApiError:
    return ApiError(403, message, reason="forbidden")


def not_implemented(what: str) -> ApiError:
    """What the emulator does not do: refused out loud rather than answered wrongly."""
    return ApiError(501, f"Not implemented by the Google emulator: {what}", reason="notImplemented", domain="emulator")


def unauthenticated(error_info_reason: str = "ACCESS_TOKEN_EXPIRED") -> ApiError:
    return ApiError(
        401,
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid "
        "authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
        reason="authError",
        location="Authorization",
        location_type="header",
        error_info={
            "reason": error_info_reason,
            "domain": "googleapis.com",
            "metadata": {"service": "gmail.googleapis.com"},
        },
        headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", error="invalid_token"'},
    )


def insufficient_scopes(method_id: str, accepted: list[str]) -> ApiError:
    return ApiError(
        403,
        "Request had insufficient authentication scopes.",
        reason="insufficientPermissions",
        error_info={
            "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
            "domain": "googleapis.com",
            "metadata": {"service": "gmail.googleapis.com", "method": method_id},
        },
        headers={
            "WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", error="insufficient_scope", '
            f'scope="{" ".join(accepted)}"'
        },
    )


# The faults a test can inject, with the reason, domain and message Google uses for each.
FAULTS: dict[tuple[int, str], tuple[str, str]] = {
    (429, "rateLimitExceeded"): ("usageLimits", "Rate Limit Exceeded"),
    (429, "userRateLimitExceeded"): ("usageLimits", "User-rate limit exceeded."),
    (403, "rateLimitExceeded"): ("usageLimits", "Rate Limit Exceeded"),
    (403, "userRateLimitExceeded"): ("usageLimits", "User Rate Limit Exceeded"),
    (403, "dailyLimitExceeded"): ("usageLimits", "Daily Limit Exceeded"),
    (500, "backendError"): ("global", "Backend Error"),
    (503, "backendError"): ("global", "The service is currently unavailable."),
}


def fault(status: int, reason: str, retry_after: int | None) -> ApiError:
    try:
        domain, message = FAULTS[(status, reason)]
    except KeyError:
        raise ValueError(f"no such fault: {status} {reason}") from None
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    return ApiError(status, message, reason=reason, domain=domain, headers=headers)


class OAuthError(Exception):
    """An OAuth 2.0 endpoint error (RFC 6749 section 5.2): ``{"error": ..., "error_description": ...}``."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}
