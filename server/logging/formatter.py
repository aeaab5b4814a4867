"""Format a log record as one JSON object per line, carrying only allow-listed fields.

Keys: ``ts`` (RFC 3339, UTC, milliseconds), ``level``, ``logger``, ``msg``, then any field of
:data:`~server.logging.fields.ALLOWED_FIELDS` set on the record (``extra={...}``), then ``exc`` when the record
carries an exception. Any other attribute is dropped without a word. Every string is redacted here as well as in
the filter, so the formatter is safe on its own and the filter is safe with any formatter.
"""

from __future__ import annotations

import json
import logging
import math
import time

from server.logging.fields import ALLOWED_FIELDS, BASE_KEYS
from server.logging.filters import safe_exc_text, safe_message
from server.logging.redact import redact

# Sorted once so every line lists its fields in the same order.
_FIELD_ORDER = tuple(sorted(ALLOWED_FIELDS - set(BASE_KEYS)))


def rfc3339_utc(timestamp: float) -> str:
    """``2025-01-31T12:00:00.123Z`` for a POSIX timestamp."""
    seconds = int(timestamp)
    millis = min(int((timestamp - seconds) * 1000), 999)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _json_value(value: object) -> object:
    """A JSON-safe, redacted value: numbers, booleans and None as they are, everything else as redacted text."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # NaN/Infinity are not JSON
    if isinstance(value, str):
        return redact(value)
    try:
        text = str(value)
    except Exception:  # a broken __str__ must not lose the line
        text = f"<unprintable {type(value).__name__}>"
    return redact(text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line with an allow-list of fields; see the module docstring."""

    def format(self, record: logging.LogRecord) -> str:
        attributes = vars(record)
        line: dict[str, object] = {
            "ts": rfc3339_utc(record.created),
            "level": record.levelname,
            "logger": redact(record.name),
            "msg": safe_message(record),
        }
        for key in _FIELD_ORDER:
            if key in attributes:
                line[key] = _json_value(attributes[key])
        exc = safe_exc_text(record)
        if exc:
            line["exc"] = exc
        # ensure_ascii: U+2028 and friends would split a line for some readers; escaped, one record stays one line.
        return json.dumps(line, ensure_ascii=True, separators=(",", ":"))
