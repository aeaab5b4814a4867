"""Fixtures and hooks shared by every test directory."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from server.cli import event_loop_factory
from server.config import ServerConfig
from server.logging.filters import scrub
from server.logging.setup import LOCK_HOLDING_LOGGERS
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
    # As the broker's logging does (server/logging/setup.py), also for tests that raise the root level themselves:
    # gRPC's Cython layer logs under a lock that garbage collection in another thread can need (a deadlock).
    for name in LOCK_HOLDING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    plugin = config.pluginmanager.get_plugin("logging-plugin")
    if plugin is None:
        return
    for handler in (plugin.caplog_handler, plugin.report_handler):
        handler.setFormatter(_RedactedCopyFormatter(handler.formatter or logging.Formatter()))


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """Every async test, and the brokers tests start in their process, runs on the event loop a broker runs on by
    default (``[server] event_loop``); ``MAILBROKER_TEST_EVENT_LOOP=asyncio`` runs them on the other."""
    name = os.environ.get("MAILBROKER_TEST_EVENT_LOOP") or ServerConfig().event_loop
    return {name: event_loop_factory(name) or asyncio.new_event_loop}


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL server for the whole session (tests use fresh databases: ``postgres.new_database()``)."""
    with PostgresServer() as server:
        yield server
