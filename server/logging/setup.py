"""Configure process-wide logging once at start-up: JSON lines, redaction on every handler, quiet libraries.

After :func:`configure_logging` every record, ours or a library's, reaches output only through a handler that has
a :class:`~server.logging.filters.RedactingFilter` and the :class:`~server.logging.formatter.JsonFormatter`: the
root handlers it installs, ``logging.lastResort``, and any handler that already existed on another logger. What
does not go through ``logging`` at all is switched off where the switch is global (imaplib's and http.client's
debug printing to stderr/stdout).
"""

from __future__ import annotations

import http.client
import imaplib
import logging
import sys
from pathlib import Path
from typing import IO, Final

from server.errors import ConfigurationError
from server.logging.filters import RedactingFilter
from server.logging.formatter import JsonFormatter
from server.logging.handlers import BrokerFileHandler, BrokerStreamHandler

_LEVELS: Final = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}

# Libraries the broker runs. They log through root (propagate, no handlers of their own) and are held at WARNING
# unless the broker runs at DEBUG; even then every line they emit goes through the redacting filter. aiosmtpd logs
# as "mail.log".
THIRD_PARTY_LOGGERS: Final = (
    "googleapiclient",
    "googleapiclient.discovery_cache",
    "google.auth",
    "google_auth_httplib2",
    "msal",
    "urllib3",
    "httplib2",
    "grpc",
    "asyncio",
    "sqlalchemy",
    "alembic",
    "aiosmtpd",
    "mail.log",
    "imapclient",
)
# Protocol traces that carry message content (FETCH bodies, SMTP DATA lines, envelope addresses). The filter masks
# shapes, not a subject or a body, so these stay at WARNING even at DEBUG.
CONTENT_TRACE_LOGGERS: Final = ("imapclient.imaplib", "mail.log")
# gRPC's Cython layer logs at DEBUG while it holds its global asyncio lock, and a grpc object that the garbage
# collector finalises takes that lock in whatever thread the collection runs. If that thread holds a log handler's
# lock at the time (it was logging), each waits for the other for ever: seen in the suite, a thread collecting in
# the middle of a log line and the event loop making a channel. Held at WARNING even at DEBUG.
LOCK_HOLDING_LOGGERS: Final = ("grpc._cython",)
_LIBRARY_FLOOR: Final = logging.WARNING


def _parse_level(level: str) -> int:
    try:
        return _LEVELS[level.strip().upper()]
    except KeyError:
        choices = ", ".join(_LEVELS)
        raise ConfigurationError(f"log level {level!r} is not one of {choices}") from None


def _broker_handler(handler: logging.Handler) -> logging.Handler:
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    return handler


def _open_file_handler(file: Path) -> logging.Handler:
    try:
        return BrokerFileHandler(file)
    except OSError as exc:
        raise ConfigurationError(f"cannot open log file {file}: {exc.strerror or type(exc).__name__}") from exc


def _is_ours(handler: logging.Handler) -> bool:
    return isinstance(handler, BrokerStreamHandler | BrokerFileHandler)


def _existing_loggers() -> list[logging.Logger]:
    # list() copies in one step under the GIL; another thread creating a logger cannot break the iteration.
    items = list(logging.Logger.manager.loggerDict.values())
    return [item for item in items if isinstance(item, logging.Logger)]


def _under(name: str, parents: tuple[str, ...]) -> bool:
    return any(name == parent or name.startswith(parent + ".") for parent in parents)


def _route_libraries(level: int) -> None:
    """Send library loggers to root with a level cap; a child a library set up itself is reset to inherit."""
    for logger in _existing_loggers():
        if _under(logger.name, THIRD_PARTY_LOGGERS) and logger.name not in THIRD_PARTY_LOGGERS:
            # e.g. SQLAlchemy's echo=True gives "sqlalchemy.engine.Engine" a level and a stdout handler.
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.setLevel(logging.NOTSET)
            logger.propagate = True
    library_level = logging.NOTSET if level <= logging.DEBUG else max(_LIBRARY_FLOOR, level)
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(library_level)
    for name in (*CONTENT_TRACE_LOGGERS, *LOCK_HOLDING_LOGGERS):
        logging.getLogger(name).setLevel(max(_LIBRARY_FLOOR, level))
    # google-auth turns propagation of the "google" logger off the first time it logs, unless that logger looks
    # configured; its records would then bypass our handlers (and their filter) for good. A NullHandler makes it
    # look configured; records still propagate to the root handlers. (Its request traces put bodies and headers in
    # ``extra``, which the allow-listed formatter drops.)
    google = logging.getLogger("google")
    google.propagate = True
    if not any(isinstance(handler, logging.NullHandler) for handler in google.handlers):
        google.addHandler(logging.NullHandler())


def _filter_foreign_handlers() -> None:
    """Attach the redacting filter to every handler some other code already put on a non-root logger."""
    for logger in _existing_loggers():
        for handler in logger.handlers:
            if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
                handler.addFilter(RedactingFilter())


def _silence_wire_dumps() -> None:
    # imaplib prints every command and response (LOGIN included) to stderr, outside logging, when imaplib.Debug > 0
    # (IMAP4 copies it into self.debug at construction). http.client prints headers (Authorization included) to
    # stdout when debuglevel > 0. Both are global switches; the broker's drivers must not set the per-instance ones.
    imaplib.Debug = 0  # type: ignore[attr-defined]  # exists only under __debug__, so the stubs omit it
    http.client.HTTPConnection.debuglevel = 0


def configure_logging(level: str = "INFO", *, stream: IO[str] | None = None, file: Path | None = None) -> None:
    """Install the broker's logging: JSON lines to ``stream`` (default stderr) and optionally ``file`` (mode 0600).

    Replaces the root handlers (calling it again replaces, never doubles), sets the root level, routes and caps
    library loggers, captures ``warnings``, and makes ``logging.lastResort`` a filtered handler. Raises
    ConfigurationError for an unknown level or a log file that cannot be opened, before changing anything.
    """
    level_number = _parse_level(level)
    target = stream if stream is not None else sys.stderr
    handlers = [_broker_handler(BrokerStreamHandler(target))]
    if file is not None:
        handlers.append(_broker_handler(_open_file_handler(file)))

    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if _is_ours(old):
            old.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level_number)

    _route_libraries(level_number)
    _filter_foreign_handlers()
    # Warnings become records on "py.warnings" and go through the same handlers.
    logging.captureWarnings(True)
    # Used when a record finds no handler (a logger with propagate=False and none of its own): it must be filtered.
    previous = logging.lastResort
    last_resort = _broker_handler(BrokerStreamHandler(target))
    last_resort.setLevel(logging.WARNING)
    logging.lastResort = last_resort
    if previous is not None and _is_ours(previous):
        previous.close()
    _silence_wire_dumps()


def get_logger(name: str) -> logging.Logger:
    """Return the named logger; call sites import it from here so the package is the one door to logging."""
    return logging.getLogger(name)
