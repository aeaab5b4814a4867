"""The versioned keyring of 256-bit key-encryption keys (KEKs), loaded from a key file or the environment.

Key file (JSON, mode 0600)::

    {"format": "mailbroker-keyring/1", "current": 2,
     "keys": [{"version": 1, "key": "<base64 of 32 bytes>", "created": "<ISO 8601>"}, ...]}

``MAILBROKER_KEKS`` overrides the file: comma-separated ``VERSION:BASE64KEY`` entries, the highest version current.

Loading fails closed with a one-line :class:`~server.errors.ConfigurationError` that names the file or setting and
never the key material. No parsing exception is chained onto it, because some (``JSONDecodeError.doc``) carry it.

Online rotation: a keyring loaded from a file is a :class:`KeyFileKeyring`, which follows its file. A use
``stat``s the file at most once per ``check_interval_seconds`` (1 s) and reloads it when its identity (device,
inode, size, mtime) changed; the file is only ever replaced by an atomic rename, so a reload sees a whole old or a
whole new file. So a running broker wraps new data keys with a version within a second of ``mailbroker keys
rotate`` making it current (the command waits that long before it rewraps), unwraps keys rewrapped under it, and
can no longer use a version within a second of ``mailbroker keys retire`` removing it. A version it does not hold
forces a reload at once, in case the file changed within the interval or the stat's time resolution. A file
that becomes unreadable or invalid keeps the last good keyring in use (logged once): rotation must never take a
serving broker down. Keys from ``MAILBROKER_KEKS`` are fixed for the life of the process.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
import stat
import threading
import time
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

log = logging.getLogger("mailbroker.keys")


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


_FileIdentity = tuple[int, int, int, int]


def _identity(path: Path) -> _FileIdentity | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


class KeyFileKeyring(Keyring):
    """A keyring that follows its key file (see the module docstring): reloaded whenever the file is replaced."""

    # The key file is looked at no more often than this (a stat on every seal and unwrap cost the event loop GIL
    # waits under load): a rotation or retirement reaches a running broker within this time. A version the
    # keyring does not hold is looked up at once.
    check_interval_seconds = 1.0

    # Not dataclass fields: set once here or swapped whole under the lock, with object.__setattr__.
    path: Path
    _snapshot: Keyring
    _identity: _FileIdentity | None
    _refused: _FileIdentity | None
    _lock: threading.Lock
    _checked: float

    def __init__(self, path: Path) -> None:
        identity = _identity(path)
        snapshot = _keyring_from_document(path, _read_key_file(path))
        super().__init__(current_version=snapshot.current_version, keys=snapshot.keys)
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "_snapshot", snapshot)
        object.__setattr__(self, "_identity", identity)
        object.__setattr__(self, "_refused", None)  # the identity of a file that failed to load, not retried
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_checked", time.monotonic())

    def kek(self, version: int) -> bytes:
        """Return the KEK of ``version`` as the key file holds it now; raise KeyringError if it does not."""
        snapshot = self._refresh()
        if version not in snapshot.keys:
            snapshot = self._refresh(force=True)
        return snapshot.kek(version)

    def current(self) -> tuple[int, bytes]:
        """Return the key file's current version and its KEK."""
        return self._refresh().current()

    def _refresh(self, *, force: bool = False) -> Keyring:
        snapshot: Keyring = self._snapshot
        now = time.monotonic()
        if not force and now - self._checked < self.check_interval_seconds:
            return snapshot
        object.__setattr__(self, "_checked", now)
        identity = _identity(self.path)
        if identity is None or (identity == self._identity and not force):
            return snapshot
        with self._lock:
            if identity == self._refused and not force:
                return snapshot
            try:
                fresh = _keyring_from_document(self.path, _read_key_file(self.path))
            except ConfigurationError:
                if identity != self._refused:
                    log.warning(
                        "the key file changed but cannot be loaded; the previous keys stay in use",
                        extra={"event": "keyring_reload_failed", "path": self.path},
                    )
                object.__setattr__(self, "_refused", identity)
                return snapshot
            object.__setattr__(self, "_snapshot", fresh)
            object.__setattr__(self, "_identity", identity)
            object.__setattr__(self, "current_version", fresh.current_version)
            object.__setattr__(self, "keys", fresh.keys)
            if fresh.keys != snapshot.keys or fresh.current_version != snapshot.current_version:
                log.info("key file reloaded", extra={"event": "keyring_reloaded", "kek_version": fresh.current_version})
            return fresh


def load_keyring(key_file: Path | None, environ: Mapping[str, str]) -> Keyring:
    """Load the keyring from ``MAILBROKER_KEKS`` if non-empty, else from ``key_file``; fail closed if neither works."""
    env_value = environ.get(ENV_VAR, "").strip()
    if env_value:
        return _keyring_from_env(env_value)
    if key_file is None:
        raise ConfigurationError(f"no key-encryption key: set {ENV_VAR} or configure a key file")
    return KeyFileKeyring(key_file)


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
    _replace_file(path, document)
    return version


def remove_key_version(path: Path, version: int) -> None:
    """Remove KEK ``version`` from the key file at ``path`` (atomically, as :func:`add_key_version`).

    Refuses the current version and a version the file does not hold. Whether anything is still wrapped by it is
    the caller's check (``mailbroker keys retire``): after this, nothing wrapped by it can be opened again.
    """
    document = _read_key_file(path)
    keyring = _keyring_from_document(path, document)
    if version not in keyring.keys:
        raise ConfigurationError(f"key file {path} holds no version {version}")
    if version == keyring.current_version:
        raise ConfigurationError(f"version {version} is the current key-encryption key; rotate first")
    document["keys"] = [entry for entry in document["keys"] if entry.get("version") != version]
    _replace_file(path, document)


def _replace_file(path: Path, document: Mapping[str, Any]) -> None:
    """Replace the key file atomically (write a 0600 sibling, fsync, rename), so a crash leaves old or new."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        _write_new_file(temporary, _encode_document(document))
        os.replace(temporary, path)
        _fsync_directory(path.parent)  # make the rename itself durable
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise ConfigurationError(f"cannot rewrite key file {path}: {exc.strerror}") from None


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
