"""AES-256-GCM sealing into self-describing blobs: format byte, random nonce, ciphertext and tag."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.errors import Internal

KEY_BYTES = 32
FORMAT_AES256GCM = 0x01
NONCE_BYTES = 12
TAG_BYTES = 16
_HEADER_BYTES = 1 + NONCE_BYTES


class DecryptionError(Internal):
    """A sealed value did not open: wrong key, wrong AAD, tampered, truncated or of an unknown format."""

    default_reason = "DECRYPTION_FAILED"
    default_message = "decryption failed"


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext`` bound to ``aad``; returns format byte + nonce + ciphertext||tag."""
    if len(key) != KEY_BYTES:
        raise ValueError("seal needs a 256-bit key")
    # A random 96-bit nonce is safe here: each key seals far fewer than the 2**32 values NIST allows per key.
    nonce = os.urandom(NONCE_BYTES)
    return bytes([FORMAT_AES256GCM]) + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Decrypt a blob made by :func:`seal` with the same key and AAD, or raise :class:`DecryptionError`."""
    if len(key) != KEY_BYTES or len(blob) < _HEADER_BYTES + TAG_BYTES or blob[0] != FORMAT_AES256GCM:
        raise DecryptionError()
    try:
        return AESGCM(key).decrypt(blob[1:_HEADER_BYTES], blob[_HEADER_BYTES:], aad)
    except InvalidTag:
        # No cause chained: the caller learns only that it failed, never anything about the bytes.
        raise DecryptionError() from None
