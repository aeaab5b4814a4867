"""Per-account data keys (DEKs) wrapped by the keyring's KEK, and the AAD that binds each sealed value to its place.

Every AAD names where a value lives (table, column, account id, and a version), so a ciphertext copied to another
row, column or account does not open. The fields are encoded as a JSON array: strings are quoted and escaped, so
``("a|b", "c")`` and ``("a", "b|c")`` cannot encode alike, and ``"1"`` differs from ``1``.
"""

from __future__ import annotations

import json
import secrets

from server.crypto.aead import KEY_BYTES, DecryptionError, open_sealed, seal
from server.crypto.keyring import Keyring


def new_data_key() -> bytes:
    """Return a fresh random 256-bit data key."""
    return secrets.token_bytes(KEY_BYTES)


def secret_aad(table: str, column: str, account_id: str, schema_version: int) -> bytes:
    """Return the AAD for a value sealed with an account's data key in ``table.column``."""
    return _encode("mailbroker/secret", table, column, account_id, schema_version)


def wrap_data_key(keyring: Keyring, account_id: str, dek: bytes) -> tuple[int, bytes]:
    """Wrap ``dek`` for ``account_id`` with the current KEK; return the KEK version and the wrapped blob."""
    version, kek = keyring.current()
    return version, seal(kek, dek, _wrap_aad(account_id, version))


def unwrap_data_key(keyring: Keyring, account_id: str, kek_version: int, wrapped: bytes) -> bytes:
    """Unwrap the data key of ``account_id``; raise DecryptionError if it was wrapped for another account or version."""
    dek = open_sealed(keyring.kek(kek_version), wrapped, _wrap_aad(account_id, kek_version))
    if len(dek) != KEY_BYTES:
        raise DecryptionError()
    return dek


def _wrap_aad(account_id: str, kek_version: int) -> bytes:
    return _encode("mailbroker/data-key", "data_keys", account_id, kek_version)


def _encode(*fields: str | int) -> bytes:
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode("ascii")
