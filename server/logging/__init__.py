"""Logging for the broker: JSON lines with an allow-list of fields and a redacting filter on every handler.

Logs carry metadata only (ids, method names, statuses, durations), never an address, subject, body, token,
password or key, at any level and whichever library wrote the line.

    configure_logging(level, stream=..., file=...)   once at start-up (idempotent)
    get_logger(__name__)                             then log messages plus allow-listed ``extra`` fields

Modules: ``fields`` (the allow-list), ``redact`` (shape masking), ``tracebacks`` (exceptions without messages),
``filters`` (the backstop filter), ``formatter`` (JSON lines), ``handlers`` (stderr and 0600 file), ``setup``.
"""

from server.logging.fields import ALLOWED_FIELDS
from server.logging.filters import RedactingFilter
from server.logging.formatter import JsonFormatter
from server.logging.redact import redact
from server.logging.setup import configure_logging, get_logger

__all__ = ["ALLOWED_FIELDS", "JsonFormatter", "RedactingFilter", "configure_logging", "get_logger", "redact"]
