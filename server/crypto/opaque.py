"""Opaque tokens (page tokens, OAuth state, resume tokens): small JSON payloads sealed with AES-256-GCM.

A token is bound to a purpose and a context (tenant, account, query) through the AAD, so a token replayed with
another purpose, by another tenant or for another query fails to open. Keys are derived from the keyring's KEKs
with HKDF; the KEK version travels in the token so tokens survive a key rotation while the old KEK is kept, and
stop opening once that version is retired (``mailbroker keys retire``).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from server.crypto.aead import DecryptionError, open_sealed, seal
from server.crypto.keyring import Keyring, KeyringError

MAX_TOKEN_CHARS = 4096
_INFO = b"mailbroker/opaque-token/v1"


class OpaqueTokens:
    """Seals and opens opaque tokens with keys derived from the keyring."""

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring
        self._keys: dict[bytes, bytes] = {}

    def _key(self, version: int) -> bytes:
        # Ask the keyring every time (it follows the key file): a retired version must stop opening tokens.
        return self._derive(self._keyring.kek(version))

    def _derive(self, kek: bytes) -> bytes:
        if kek not in self._keys:
            self._keys[kek] = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(kek)
        return self._keys[kek]

    @staticmethod
    def _aad(purpose: str, binding: Sequence[str]) -> bytes:
        return json.dumps([purpose, *binding], separators=(",", ":")).encode()

    def seal(self, purpose: str, binding: Sequence[str], payload: Mapping[str, Any]) -> str:
        version, kek = self._keyring.current()
        plaintext = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        blob = version.to_bytes(4, "big") + seal(self._derive(kek), plaintext, self._aad(purpose, binding))
        return base64.urlsafe_b64encode(blob).rstrip(b"=").decode("ascii")

    def open(self, purpose: str, binding: Sequence[str], token: str) -> dict[str, Any] | None:
        """The payload, or None when the token is malformed, tampered, foreign or bound to something else."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        try:
            blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            if len(blob) < 5:
                return None
            key = self._key(int.from_bytes(blob[:4], "big"))
            payload = json.loads(open_sealed(key, blob[4:], self._aad(purpose, binding)))
        except (binascii.Error, ValueError, UnicodeError, DecryptionError, KeyringError):
            return None
        return payload if isinstance(payload, dict) else None
