"""The broker's log handlers: stderr (or any text stream) and an owner-only (0600) log file.

Both report their own failures as one fixed JSON line on stderr that names only the exception type: the stdlib's
``Handler.handleError`` prints the record's message and arguments and the failing exception's text, which is
exactly the leak the rest of this package prevents.
"""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path
from typing import IO, Final

from server.logging.formatter import rfc3339_utc
from server.logging.tracebacks import type_name

_FILE_MODE: Final = 0o600


def _report_handler_error() -> None:
    if not logging.raiseExceptions:
        return
    exc_type = sys.exc_info()[0]
    line = {
        "ts": rfc3339_utc(time.time()),
        "level": "ERROR",
        "logger": "server.logging",
        "msg": "a log record could not be written",
        "exc": type_name(exc_type) if exc_type is not None else "unknown",
    }
    try:
        sys.stderr.write(json.dumps(line, separators=(",", ":")) + "\n")
    except Exception:  # stderr itself is gone; nothing left to tell
        return


class BrokerStreamHandler(logging.StreamHandler[IO[str]]):
    """A StreamHandler whose error report carries no record content."""

    def handleError(self, record: logging.LogRecord) -> None:
        _report_handler_error()


class BrokerFileHandler(logging.handlers.WatchedFileHandler):
    """Append to a file created (or tightened) to mode 0600; reopened likewise after rotation moves it away."""

    def __init__(self, path: Path) -> None:
        super().__init__(os.fspath(path), mode="a", encoding="utf-8")

    def _open(self) -> io.TextIOWrapper:
        # os.open with an explicit mode: FileHandler's open() would create the file with the umask's 0644. No
        # symlinks: a log path swapped for a link must not make the broker append to (or chmod) another file.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.baseFilename, flags, _FILE_MODE)
        try:
            os.fchmod(fd, _FILE_MODE)  # an existing file keeps its mode on open; tighten it
            return open(fd, "a", encoding=self.encoding, errors=self.errors)
        except BaseException:
            os.close(fd)
            raise

    def handleError(self, record: logging.LogRecord) -> None:
        _report_handler_error()
