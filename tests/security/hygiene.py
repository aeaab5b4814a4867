"""What the error-hygiene tests capture and search: the broker's DEBUG log lines (its own and third-party loggers',
through its filters and formatter) and everything a failed call hands the caller."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest

from server.logging.handlers import BrokerStreamHandler
from server.logging.setup import _broker_handler, _route_libraries
from tests.broker import rich_status
from tests.security.canaries import leaks


@contextmanager
def captured_broker_log() -> Iterator[io.StringIO]:
    """The broker's log lines at DEBUG, through its own filters, formatter and library routing (as
    ``mailbroker serve --log-level DEBUG`` has them; tests/security/test_log_canaries.py runs that process)."""
    buffer = io.StringIO()
    _route_libraries(logging.DEBUG)
    handler = _broker_handler(BrokerStreamHandler(buffer))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def everything(error: grpc.aio.AioRpcError) -> str:
    """The status message, every detail (ErrorInfo with its metadata, BadRequest, RetryInfo) and the trailers."""
    status = rich_status(error)
    return "\n".join([error.details() or "", str(status), repr(error.trailing_metadata())])


async def fails(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


def leaking_lines(log: str, values: dict[str, str]) -> list[str]:
    """For each log line that carries a canary: its logger and the canaries' names, never the line itself (a
    failure message must not print what it found)."""
    found = []
    for line in log.splitlines():
        names = leaks(line, values)
        if names:
            try:
                logger = str(json.loads(line).get("logger", "?"))
            except ValueError:
                logger = "(not JSON)"
            found.append(f"{logger}: {', '.join(names)}")
    return found
