"""The versioned keyring of 256-bit key-encryption keys (KEKs), loaded from a key file or the environment.

Key file (JSON, mode 0600)::

    {"format": "mailbroker-keyring/1", "current": 2,
     "keys": [{"version": 1, "key": "<base64 of 32 bytes>", "created": "<ISO 8601>"}, ...]}

``MAILBROKER_KEKS`` overrides the file: comma-separated ``VERSION:BASE64KEY`` entries, the highest version current.

Loading fails closed with a one-line :class:`~server.errors.ConfigurationError` that names the file or setting and
never the key material. No parsing exception is chained onto it, because some (``JSONDecodeError.doc``) carry it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from server.crypto.aead import KEY_BYTES
from server.errors import ConfigurationError, Internal

KEY_FILE_FORMAT = "mailbroker-keyring/1"
ENV_VAR = "MAILBROKER_KEKS"


class KeyringError(Internal):
    """The keyring holds no key-encryption key of the version a stored value was wrapped with."""

    default_reason = "KEK_UNAVAILABLE"
    default_message = "key-encryption key unavailable"


@dataclass(frozen=True)
class Keyring:
    """KEKs by version, with the version new values are wrapped with."""

    current_version: int
    keys: Mapping[int, bytes] = field(repr=False)

    def __post_init__(self) -> None:
        if self.current_version not in self.keys:
            raise ValueError("the current KEK version is not in the keyring")
        if any(len(key) != KEY_BYTES for key in self.keys.values()):
            raise ValueError("every KEK must be 32 bytes")
        # A private read-only copy, so that nobody can swap a key under a frozen keyring.
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))

    def kek(self, version: int) -> bytes:
        """Return the KEK of ``version``, or raise :class:`KeyringError` if the keyring does not hold it."""
        try:
            return self.keys[version]
        except KeyError:
            raise KeyringError(f"no key-encryption key of version {version}") from None

    def current(self) -> tuple[int, bytes]:
        """Return the current version and its KEK."""
        return self.current_version, self.keys[self.current_version]


def load_keyring(key_file: Path | None, environ: Mapping[str, str]) -> Keyring:
    """Load the keyring from ``MAILBROKER_KEKS`` if non-empty, else from ``key_file``; fail closed if neither works."""
    env_value = environ.get(ENV_VAR, "").strip()
    if env_value:
        return _keyring_from_env(env_value)
    if key_file is None:
        raise ConfigurationError(f"no key-encryption key: set {ENV_VAR} or configure a key file")
    return _keyring_from_document(key_file, _read_key_file(key_file))


def generate_key_file(path: Path) -> None:
    """Create a new key file at ``path`` (mode 0600) holding one random KEK; never overwrite an existing file."""
    document = {"format": KEY_FILE_FORMAT, "current": 1, "keys": [_new_key_entry(1)]}
    try:
        _write_new_file(path, _encode_document(document))
    except FileExistsError:
        raise ConfigurationError(f"key file {path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot create key file {path}: {exc.strerror}") from None


def add_key_version(path: Path) -> int:
    """Append a new random KEK to the key file at ``path``, make it current, and return its version.

    The file is replaced atomically (write a 0600 sibling, fsync, rename), so a crash leaves the old or the new file.
    """
    document = _read_key_file(path)
    version = max(_keyring_from_document(path, document).keys) + 1  # validates before we touch anything
    document["keys"].append(_new_key_entry(version))
    document["current"] = version
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        _write_new_file(temporary, _encode_document(document))
        os.replace(temporary, path)
        _fsync_directory(path.parent)  # make the rename itself durable
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise ConfigurationError(f"cannot rewrite key file {path}: {exc.strerror}") from None
    return version


def _keyring_from_env(value: str) -> Keyring:
    keys: dict[int, bytes] = {}
    for position, entry in enumerate(value.split(","), start=1):
        version_text, separator, key_text = entry.strip().partition(":")
        if not separator or not (version_text.isascii() and version_text.isdigit()) or int(version_text) < 1:
            raise ConfigurationError(f"{ENV_VAR}: entry {position} is not VERSION:BASE64KEY with VERSION >= 1")
        version = int(version_text)
        if version in keys:
            raise ConfigurationError(f"{ENV_VAR}: version {version} appears more than once")
        keys[version] = _decode_key(key_text, f"{ENV_VAR}: the key of version {version}")
    return Keyring(current_version=max(keys), keys=keys)


def _read_key_file(path: Path) -> dict[str, Any]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigurationError(f"cannot read key file {path}: {exc.strerror}") from None
    try:
        # fstat on the open descriptor, so the file checked is the file read (a symlink is followed, as for a
        # mounted secret).
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigurationError(f"key file {path} is not a regular file")
        if stat.S_IMODE(mode) & 0o077:
            raise ConfigurationError(
                f"key file {path} is readable by group or others (mode {stat.S_IMODE(mode):04o}); chmod 600 it"
            )
        with open(fd, "rb", closefd=False) as handle:
            raw = handle.read()
    except OSError as exc:
        raise ConfigurationError(f"cannot read key file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ConfigurationError(f"key file {path} is not valid JSON") from None
    if not isinstance(document, dict) or document.get("format") != KEY_FILE_FORMAT:
        raise ConfigurationError(f"key file {path} is not in the {KEY_FILE_FORMAT} format")
    if not isinstance(document.get("keys"), list) or not all(isinstance(e, dict) for e in document["keys"]):
        raise ConfigurationError(f"key file {path}: 'keys' must be a list of objects")
    return document


def _keyring_from_document(path: Path, document: Mapping[str, Any]) -> Keyring:
    keys: dict[int, bytes] = {}
    for position, entry in enumerate(document["keys"], start=1):
        version = entry.get("version")
        if not _is_version(version):
            raise ConfigurationError(f"key file {path}: key {position} has no integer 'version' >= 1")
        if version in keys:
            raise ConfigurationError(f"key file {path}: version {version} appears more than once")
        keys[version] = _decode_key(entry.get("key"), f"key file {path}: the key of version {version}")
    current = document.get("current")
    if not _is_version(current) or current not in keys:
        raise ConfigurationError(f"key file {path}: 'current' must be the version of one of its keys")
    return Keyring(current_version=current, keys=keys)


def _is_version(value: object) -> bool:
    # bool is an int subclass; "true" is not a version.
    return type(value) is int and value >= 1


def _decode_key(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise ConfigurationError(f"{what} is not a base64 string")
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError(f"{what} is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise ConfigurationError(f"{what} is not {KEY_BYTES} bytes long")
    return key


def _new_key_entry(version: int) -> dict[str, Any]:
    return {
        "version": version,
        "key": base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii"),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _encode_document(document: Mapping[str, Any]) -> bytes:
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")


def _write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` exclusively with mode 0600 and write ``data`` durably."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)  # the umask can only narrow the mode; say exactly what we mean
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
