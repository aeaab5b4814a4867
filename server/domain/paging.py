"""Page sizes and opaque page tokens (AIP-158), bound to the tenant and the query they were issued for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.crypto.opaque import OpaqueTokens
from server.errors import FieldViolation, InvalidArgument


@dataclass(frozen=True)
class PageLimits:
    default: int
    maximum: int


ACCOUNTS = PageLimits(default=50, maximum=500)
AUDIT_EVENTS = PageLimits(default=50, maximum=500)


def page_size(value: int, limits: PageLimits, field: str = "page_size") -> int:
    """0 means the default; above the maximum is coerced down (AIP-158); negative is INVALID_ARGUMENT."""
    if value < 0:
        raise InvalidArgument(
            "page_size must not be negative",
            reason="INVALID_PAGE_SIZE",
            field_violations=[FieldViolation(field, "must be zero (the default) or positive")],
        )
    return limits.default if value == 0 else min(value, limits.maximum)


class PageTokens:
    """Seals a list position into an opaque token; a token from another tenant or query is refused."""

    def __init__(self, tokens: OpaqueTokens, purpose: str) -> None:
        self._tokens = tokens
        self._purpose = f"page:{purpose}"

    def issue(self, binding: Sequence[str], position: dict[str, Any]) -> str:
        return self._tokens.seal(self._purpose, binding, position)

    def position(self, binding: Sequence[str], token: str, field: str = "page_token") -> dict[str, Any] | None:
        """The position a token names (None for an empty token, the first page)."""
        if not token:
            return None
        position = self._tokens.open(self._purpose, binding, token)
        if position is None:
            raise InvalidArgument(
                "page_token is not valid for this request",
                reason="INVALID_PAGE_TOKEN",
                field_violations=[FieldViolation(field, "not a token this list issued for the same parameters")],
            )
        return position
