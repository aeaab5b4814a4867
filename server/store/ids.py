"""Random, URL-safe identifiers for stored records."""

from __future__ import annotations

import base64
import secrets


def new_account_id() -> str:
    """Return a new account id: "a" and 24 lowercase base32 characters (120 random bits)."""
    return "a" + _random_base32()


def new_event_id() -> str:
    """Return a new audit event id: "e" and 24 lowercase base32 characters (120 random bits)."""
    return "e" + _random_base32()


def _random_base32() -> str:
    # 15 bytes encode to exactly 24 base32 characters, so there is no padding to strip.
    return base64.b32encode(secrets.token_bytes(15)).decode("ascii").lower()
