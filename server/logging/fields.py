"""The structured fields a log line may carry: everything else a record holds is dropped.

A field joins this list only if its values are metadata by construction (ids, names of code paths, counts,
durations, status names). Nothing here may ever hold an address, subject, body, token, password or key; the
redactor still runs over every value, but it is a backstop, not a licence.
"""

from __future__ import annotations

from typing import Final

ALLOWED_FIELDS: Final[frozenset[str]] = frozenset(
    {
        # The access log, one line per RPC: who called what, for which account, and how it ended. `account` is the
        # broker's opaque account id ("a3k..."), never the mailbox address; `caller` is the mTLS identity.
        "request_id",
        "method",
        "caller",
        "account",
        "status",
        "duration_ms",
        "reason",
        # What happened and in which part of the broker, as fixed snake_case names chosen in code.
        "event",
        "component",
        # Talking to a mail provider: which driver, which retry, how many items a call moved.
        "provider",
        "attempt",
        "count",
        # Key management: which key-encryption-key version wrapped or unwrapped a data key (never the key).
        "kek_version",
        # Start-up: the port the server bound, the event loop it runs on ("uvloop", "asyncio") and the paths of files
        # it read (config, keys, certificates).
        "port",
        "event_loop",
        "path",
    }
)

# Keys every JSON line has (``exc`` only when the record carried an exception); they win over extras.
BASE_KEYS: Final[tuple[str, ...]] = ("ts", "level", "logger", "msg", "exc")
