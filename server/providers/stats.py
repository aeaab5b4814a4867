"""A tally of the calls drivers make to providers — calls, errors (by gRPC code name) and retries, per provider — that
the metrics endpoint reads when it is scraped (server.metrics). Drivers count whether or not metrics are on and know
nothing of Prometheus.

Keys are bounded enums only: a provider name from :data:`PROVIDERS` and an error's gRPC code name. Counts change on
the event loop thread only; the scrape runs in another thread and reads a copy (``dict(d)`` is one C call, so it
never sees a dict changing size under it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from server.errors import BrokerError

GOOGLE = "google"
MICROSOFT = "microsoft"
IMAP = "imap"
SMTP = "smtp"
PROVIDERS = (GOOGLE, MICROSOFT, IMAP, SMTP)


class ProviderStats:
    """Counts per provider of calls (a driver operation, retries included), failed calls and retries."""

    __slots__ = ("calls", "errors", "retries")

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.errors: dict[tuple[str, str], int] = {}  # (provider, gRPC code name of the error raised)
        self.retries: dict[str, int] = {}  # requests repeated after a transient failure or a refused access token

    def call(self, provider: str) -> None:
        self.calls[provider] = self.calls.get(provider, 0) + 1

    def retry(self, provider: str) -> None:
        self.retries[provider] = self.retries.get(provider, 0) + 1

    def error(self, provider: str, error: BaseException) -> None:
        key = (provider, error.code if isinstance(error, BrokerError) else "INTERNAL")
        self.errors[key] = self.errors.get(key, 0) + 1

    @contextmanager
    def counting(self, provider: str) -> Iterator[None]:
        """Count one call, and its failure when an exception leaves (a cancelled caller is not a failure)."""
        self.call(provider)
        try:
            yield
        except Exception as exc:
            self.error(provider, exc)
            raise

    def snapshot(self) -> tuple[dict[str, int], dict[tuple[str, str], int], dict[str, int]]:
        """Copies of (calls, errors, retries), safe to take from another thread."""
        return dict(self.calls), dict(self.errors), dict(self.retries)
