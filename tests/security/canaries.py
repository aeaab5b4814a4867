"""Canary values and every encoding in which a leak of one could show up."""

from __future__ import annotations

import base64
import secrets
import urllib.parse


def canary(kind: str) -> str:
    return f"canary-{kind}-{secrets.token_hex(6)}"


def encoded_forms(value: str) -> set[str]:
    """The value raw, URL-encoded, hex, and base64 (standard and URL-safe) at each of the three alignments."""
    raw = value.encode()
    forms = {value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value), raw.hex(), raw.hex().upper()}
    for pad in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * pad + raw).decode()
            # Drop the characters that also depend on the padding bytes or on what follows the value.
            start = (pad * 4 + 2) // 3 + (1 if pad else 0)
            core = encoded[start : len(encoded) - 4]
            if len(core) >= 8:
                forms.add(core)
    return forms


def leaks(text: str, values: dict[str, str]) -> list[str]:
    """The names (never the values) of the canaries found in ``text`` in any encoded form."""
    return sorted(name for name, value in values.items() if any(form in text for form in encoded_forms(value)))
