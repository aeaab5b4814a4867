"""A keyring that follows its key file (online rotation and retirement), and the audit anchor file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from server.crypto.datakeys import new_data_key, unwrap_data_key, wrap_data_key
from server.crypto.keyring import (
    KeyFileKeyring,
    KeyringError,
    add_key_version,
    generate_key_file,
    load_keyring,
    remove_key_version,
)
from server.errors import ConfigurationError
from server.store.audit_anchor import AnchorError, AuditAnchor


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.json"
    generate_key_file(path)
    return path


def _replace(path: Path, text: str) -> None:
    """Replace the file the way every writer of it does: a new file renamed over it."""
    temporary = path.with_name("replacement.tmp")
    temporary.write_text(text)
    temporary.chmod(0o600)
    os.replace(temporary, path)


def test_a_loaded_keyring_follows_rotation_and_retirement_of_its_file(
    key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(KeyFileKeyring, "check_interval_seconds", 0.0)  # see the next test for the interval
    keyring = load_keyring(key_file, {})
    assert isinstance(keyring, KeyFileKeyring)
    dek = new_data_key()
    old = wrap_data_key(keyring, "acct", dek)
    assert old[0] == 1

    assert add_key_version(key_file) == 2
    assert keyring.current()[0] == 2  # no restart, no signal
    new = wrap_data_key(keyring, "acct", dek)
    assert new[0] == 2
    assert unwrap_data_key(keyring, "acct", *old) == dek == unwrap_data_key(keyring, "acct", *new)

    remove_key_version(key_file, 1)
    with pytest.raises(KeyringError):
        unwrap_data_key(keyring, "acct", *old)
    assert unwrap_data_key(keyring, "acct", *new) == dek


def test_the_key_file_is_looked_at_no_more_than_once_per_interval(
    key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("server.crypto.keyring.time.monotonic", lambda: clock[0])
    keyring = load_keyring(key_file, {})
    assert isinstance(keyring, KeyFileKeyring)
    stats: list[Path] = []
    real_stat = os.stat
    monkeypatch.setattr("server.crypto.keyring.os.stat", lambda path: stats.append(Path(path)) or real_stat(path))

    assert add_key_version(key_file) == 2
    for _ in range(100):
        assert keyring.current()[0] == 1  # within the interval: no stat, the old current version
    assert stats == []
    clock[0] += KeyFileKeyring.check_interval_seconds
    assert keyring.current()[0] == 2
    assert len(stats) == 1
    # A version the keyring does not hold is looked up at once, whatever the interval.
    assert add_key_version(key_file) == 3
    assert keyring.kek(3)


def test_the_current_version_and_unknown_versions_cannot_be_removed(key_file: Path) -> None:
    with pytest.raises(ConfigurationError, match="current"):
        remove_key_version(key_file, 1)
    with pytest.raises(ConfigurationError, match="no version 7"):
        remove_key_version(key_file, 7)
    assert [entry["version"] for entry in json.loads(key_file.read_text())["keys"]] == [1]


def test_a_broken_replacement_file_keeps_the_last_good_keys_until_it_is_fixed(
    key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(KeyFileKeyring, "check_interval_seconds", 0.0)
    keyring = load_keyring(key_file, {})
    good = key_file.read_text()
    kek = keyring.kek(1)
    _replace(key_file, "{not json")
    assert keyring.kek(1) == kek  # still serving
    assert keyring.current()[0] == 1
    add_target = json.loads(good)
    _replace(key_file, json.dumps(add_target))
    add_key_version(key_file)
    assert keyring.current()[0] == 2


def test_the_environment_keyring_does_not_follow_any_file(key_file: Path) -> None:
    import base64

    keyring = load_keyring(key_file, {"MAILBROKER_KEKS": "3:" + base64.b64encode(bytes(32)).decode()})
    assert not isinstance(keyring, KeyFileKeyring)
    assert keyring.current()[0] == 3


def test_the_audit_anchor_only_moves_forward_and_detects_an_edit(key_file: Path, tmp_path: Path) -> None:
    anchor = AuditAnchor(tmp_path / "audit-anchor.json", load_keyring(key_file, {}))
    assert anchor.read() is None
    anchor.record(5, "a" * 64)
    anchor.record(3, "b" * 64)  # an older head written late (another process) never replaces a newer one
    head = anchor.read()
    assert head is not None and (head.sequence, head.digest) == (5, "a" * 64)
    assert oct(anchor.path.stat().st_mode & 0o777) == oct(0o600)

    document = json.loads(anchor.path.read_text())
    anchor.path.write_text(json.dumps({**document, "sequence": 4}))
    with pytest.raises(AnchorError, match="valid MAC"):
        anchor.read()

    # Under another key (someone else's key file) the MAC does not check out either.
    other = tmp_path / "other-keys.json"
    generate_key_file(other)
    anchor.path.write_text(json.dumps(document))
    with pytest.raises(AnchorError, match="valid MAC"):
        AuditAnchor(anchor.path, load_keyring(other, {})).read()
