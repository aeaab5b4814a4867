"""Fixtures and hooks shared by every test directory."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from server.logging.filters import scrub
from tests.postgres import PostgresServer


class _RedactedCopyFormatter(logging.Formatter):
    """Formats a scrubbed copy of each record: what pytest prints of captured logs in a failure report passes the
    broker's own redaction, while the record itself stays as it was for every other handler (the log-canary tests
    look at what the broker's handlers make of the original)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        copy = logging.makeLogRecord(dict(record.__dict__))
        scrub(copy)
        return self._inner.format(copy)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    plugin = config.pluginmanager.get_plugin("logging-plugin")
    if plugin is None:
        return
    for handler in (plugin.caplog_handler, plugin.report_handler):
        handler.setFormatter(_RedactedCopyFormatter(handler.formatter or logging.Formatter()))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL server for the whole session (tests use fresh databases: ``postgres.new_database()``)."""
    with PostgresServer() as server:
        yield server
