"""The backstop filter on every handler: it masks a log record in place so no handler can print a secret.

Whatever formatter a handler has (ours, the stdlib default, a library's), once :class:`RedactingFilter` has run the
record holds only redacted text: the message is formatted and redacted (``args`` cleared), exception objects passed
as arguments or as the message are reduced to their type, allow-listed ``extra`` fields are redacted and any other
``extra`` attribute is replaced by ``[WITHHELD]`` (a plain ``%(subject)s`` format prints nothing), and an
attached exception is pre-rendered without its message into ``exc_text`` with ``exc_info`` cleared, so the stdlib
``Formatter`` appends the safe rendering instead of ``traceback.format_exception``. The filter masks, it never
drops: it always returns True.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final

from server.logging.fields import ALLOWED_FIELDS
from server.logging.redact import REDACTED, redact
from server.logging.tracebacks import format_exception, type_name

# Attributes every LogRecord has. They come from code (names, paths, numbers) or are handled one by one below;
# anything else on a record arrived through ``extra=`` or a library and is treated as data.
_RECORD_ATTRIBUTES: Final = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)))
# Written onto the record by Formatter.format (the formatted message, the time); redacted, since they hold text.
_SET_BY_FORMATTERS: Final = frozenset({"message", "asctime"})
# Standard attributes that are names given at run time (a thread named after a mailbox would be data).
_NAMED_AT_RUN_TIME: Final = frozenset({"threadName", "processName", "taskName"})
# Set on a record once its exc_text is our safe rendering, so a second filter pass (one per handler) leaves it be
# and a rendering put there by some other formatter is recognised as unsafe.
_SAFE_EXC_TEXT: Final = "_mailbroker_safe_exc_text"
WITHHELD: Final = "[WITHHELD]"
WITHHELD_TRACEBACK: Final = "[traceback withheld: rendered outside the redacting filter]"
_UNFORMATTABLE: Final = " [arguments withheld: message could not be formatted]"


class _ExceptionStandIn:
    """Formats as ``<ValueError>`` wherever an exception was passed to a log call, so its message never is."""

    __slots__ = ("_text",)

    def __init__(self, exc: BaseException) -> None:
        self._text = f"<{type_name(type(exc))}>"

    def __str__(self) -> str:
        return self._text

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return self._text


def _neutralise(value: object) -> object:
    return _ExceptionStandIn(value) if isinstance(value, BaseException) else value


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:  # a broken __str__ must not break logging
        return f"<unprintable {type(value).__name__}>"


def safe_message(record: logging.LogRecord) -> str:
    """The record's message, formatted with exception arguments reduced to their type, then redacted."""
    template = _safe_str(_neutralise(record.msg))
    args = record.args
    if not args:
        return redact(template)
    try:
        if isinstance(args, Mapping):
            return redact(template % {key: _neutralise(value) for key, value in args.items()})
        return redact(template % tuple(_neutralise(value) for value in args))
    except Exception:  # the stdlib would print msg and args to stderr here; keep the template only
        return redact(template) + _UNFORMATTABLE


def safe_exc_text(record: logging.LogRecord) -> str | None:
    """The record's exception rendered without messages, or None; never an unchecked ``exc_text``."""
    if record.exc_info:
        rendered = format_exception(record.exc_info)
        return redact(rendered) if rendered is not None else None
    if record.exc_text:
        return record.exc_text if getattr(record, _SAFE_EXC_TEXT, None) == record.exc_text else WITHHELD_TRACEBACK
    return None


def _safe_value(value: object) -> object:
    """A redacted form of an ``extra`` value; numbers, booleans and None pass (formats such as %(n)d need them)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value)
    return redact(_safe_str(_neutralise(value)))


def scrub(record: logging.LogRecord) -> None:
    """Mask ``record`` in place (see the module docstring); raises only if the record is broken beyond repair."""
    record.msg = safe_message(record)
    record.args = None
    exc_text = safe_exc_text(record)
    record.exc_info = None
    record.exc_text = exc_text
    setattr(record, _SAFE_EXC_TEXT, exc_text)
    for key, value in list(vars(record).items()):
        if key in ALLOWED_FIELDS or key in _NAMED_AT_RUN_TIME or key in _SET_BY_FORMATTERS:
            setattr(record, key, _safe_value(value))
        elif key not in _RECORD_ATTRIBUTES and key != _SAFE_EXC_TEXT:
            # Not on the allow-list: a shape check cannot tell a subject from a status, so the value goes.
            setattr(record, key, WITHHELD)


class RedactingFilter(logging.Filter):
    """Mask every record that reaches the handler this is attached to; see the module docstring."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            scrub(record)
        except Exception:  # fail closed: keep the line's existence, not its content
            record.msg, record.args, record.exc_info, record.exc_text = REDACTED, None, None, None
            for key in list(vars(record)):
                if key not in _RECORD_ATTRIBUTES:
                    setattr(record, key, WITHHELD)
        return True
