"""The caller's deadline, for code that waits (provider retries) to stop in time and say why, rather than be cut
off by the deadline with nothing to tell. Set once per call by the error-mapping interceptor; no grpc here."""

from __future__ import annotations

import time
from contextvars import ContextVar

# What waiting code leaves of the caller's deadline to answer with its reason before gRPC cuts the call off.
MARGIN_SECONDS = 0.25

# Absolute time.monotonic() by which the call must have answered; None when the caller set no deadline.
call_deadline: ContextVar[float | None] = ContextVar("mailbroker_call_deadline", default=None)


def set_from_remaining(remaining: float | None) -> None:
    call_deadline.set(None if remaining is None else time.monotonic() + remaining)


def remaining() -> float | None:
    """Seconds left before the caller's deadline (never below 0), or None without one."""
    deadline = call_deadline.get()
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def retry_budget(longest: float) -> float:
    """Seconds a provider call may go on retrying: ``longest``, or less, to stop MARGIN_SECONDS before the caller's
    deadline and answer with the reason rather than be cut off with nothing to tell."""
    left = remaining()
    return longest if left is None else min(longest, left - MARGIN_SECONDS)
