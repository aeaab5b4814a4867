"""Withhold the provider's response text from the log lines of the client libraries that quote it.

The backstop filter on every handler masks addresses and token shapes, not free text: a library line that quotes a
response body (an HTML error page that names the client's address, a host, a queue id) would pass it. Each line
below keeps its place in the log with the quoted text replaced by :data:`WITHHELD`. The filters sit on the loggers
that create the records, so they apply however logging is configured. (Found by
tests/security/test_provider_error_canaries.py; the imap driver drops imapclient's login echo the same way.)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Final

WITHHELD: Final = "[provider response withheld]"
# A reason a documented Google error carries ("rateLimitExceeded"): worth keeping. Anything else is free text.
_REASON = re.compile(r"[A-Za-z][A-Za-z0-9_.]{0,63}")


def _always(value: object) -> bool:
    return True


def _unless_a_reason(value: object) -> bool:
    return not (isinstance(value, str) and _REASON.fullmatch(value))


# logger -> {message template: whether an argument is to be withheld}
_TEMPLATES: Final[Mapping[str, Mapping[str, Callable[[object], bool]]]] = {
    # googleapiclient.http._should_retry_response, on every 403 (also with num_retries=0): the whole body when it
    # is not JSON; the error's reason, or its status or message when the body has no reason.
    "googleapiclient.http": {
        "Invalid JSON content from response: %s": _always,
        'Encountered 403 Forbidden with reason "%s"': _unless_a_reason,
    },
    # msal's BaseClient._obtain_token, when the token endpoint answers below 500 with something other than JSON.
    "msal.oauth2cli.oauth2": {"Token response is not in json format: %s": _always},
}


class WithholdResponseText(logging.Filter):
    """Replaces the arguments of the given message templates (those ``withhold`` says so of) by WITHHELD."""

    def __init__(self, templates: Mapping[str, Callable[[object], bool]]) -> None:
        super().__init__()
        self._templates = templates

    def filter(self, record: logging.LogRecord) -> bool:
        withhold = self._templates.get(record.msg) if isinstance(record.msg, str) else None
        if withhold is not None and isinstance(record.args, tuple):
            record.args = tuple(WITHHELD if withhold(arg) else arg for arg in record.args)
        return True


def install() -> None:
    """Put the filters on their loggers (once: a logger keeps one filter of this kind)."""
    for name, templates in _TEMPLATES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, WithholdResponseText) for f in logger.filters):
            logger.addFilter(WithholdResponseText(templates))


install()
