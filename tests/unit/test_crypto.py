"""Tests for server.crypto: AES-256-GCM sealing, the KEK keyring and its key file, per-account data keys and AAD.

Keys are made at test time. Failure messages never echo key material: each check computes a boolean first, so
pytest's assertion rewriting has nothing secret to print.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.crypto.aead import NONCE_BYTES, TAG_BYTES, DecryptionError, open_sealed, seal
from server.crypto.datakeys import new_data_key, secret_aad, unwrap_data_key, wrap_data_key
from server.crypto.keyring import (
    ENV_VAR,
    KEY_FILE_FORMAT,
    Keyring,
    KeyringError,
    add_key_version,
    generate_key_file,
    load_keyring,
)
from server.errors import ConfigurationError, Internal

AAD = b"test-aad"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def forms(key: bytes) -> list[str]:
    """Ways a key could show up in text: base64, hex, and Python's bytes repr."""
    return [b64(key), key.hex(), repr(key)]


def assert_leaks_nothing(exc: BaseException, keys: list[bytes]) -> None:
    """The exception's message and full traceback hold none of ``keys``, and no chained cause shows up."""
    shown = str(exc) + repr(exc) + "".join(traceback.format_exception(exc))
    leaked = any(form in shown for key in keys for form in forms(key))
    assert not leaked, "key material appears in the error or its traceback"
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__


def assert_one_line_config_error(exc: pytest.ExceptionInfo[ConfigurationError], names: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    assert names in message


@pytest.fixture
def key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """A permissive umask, so that only the code under test can make a file 0600."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def write_key_file(path: Path, document: object, mode: int = 0o600) -> Path:
    path.write_text(json.dumps(document))
    path.chmod(mode)
    return path


def key_document(*entries: tuple[int, bytes], current: int | None = None) -> dict[str, object]:
    return {
        "format": KEY_FILE_FORMAT,
        "current": current if current is not None else max(v for v, _ in entries),
        "keys": [{"version": v, "key": b64(k), "created": "2025-01-01T00:00:00+00:00"} for v, k in entries],
    }


# --- aead ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plaintext", [b"", b"x", b"refresh-token " * 200])
def test_seal_then_open_returns_the_plaintext(key: bytes, plaintext: bytes) -> None:
    blob = seal(key, plaintext, AAD)
    assert blob[0] == 0x01
    assert len(blob) == 1 + NONCE_BYTES + len(plaintext) + TAG_BYTES
    assert open_sealed(key, blob, AAD) == plaintext


def test_seal_uses_a_fresh_nonce_each_time(key: bytes) -> None:
    first, second = seal(key, b"same", AAD), seal(key, b"same", AAD)
    assert first[1 : 1 + NONCE_BYTES] != second[1 : 1 + NONCE_BYTES]
    assert first != second


def test_seal_refuses_a_key_that_is_not_256_bits() -> None:
    with pytest.raises(ValueError, match="256-bit"):
        seal(secrets.token_bytes(16), b"x", AAD)


def _flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0x01]) + blob[index + 1 :]


Tampering = Callable[[bytes, bytes], tuple[bytes, bytes, bytes]]

TAMPERINGS: dict[str, Tampering] = {
    "wrong key": lambda key, blob: (secrets.token_bytes(32), blob, AAD),
    "short key": lambda key, blob: (key[:16], blob, AAD),
    "wrong aad": lambda key, blob: (key, blob, AAD + b"x"),
    "empty aad": lambda key, blob: (key, blob, b""),
    "flipped format byte": lambda key, blob: (key, _flip(blob, 0), AAD),
    "flipped nonce bit": lambda key, blob: (key, _flip(blob, 1), AAD),
    "flipped ciphertext bit": lambda key, blob: (key, _flip(blob, 1 + NONCE_BYTES), AAD),
    "flipped tag bit": lambda key, blob: (key, _flip(blob, len(blob) - 1), AAD),
    "truncated by one byte": lambda key, blob: (key, blob[:-1], AAD),
    "only header and tag": lambda key, blob: (key, blob[: 1 + NONCE_BYTES + TAG_BYTES - 1], AAD),
    "empty blob": lambda key, blob: (key, b"", AAD),
    "unknown format byte": lambda key, blob: (key, b"\x02" + blob[1:], AAD),
    "extra byte appended": lambda key, blob: (key, blob + b"\x00", AAD),
}


@pytest.mark.parametrize("tampering", TAMPERINGS.values(), ids=TAMPERINGS.keys())
def test_open_sealed_raises_decryption_error_on_any_mismatch(key: bytes, tampering: Tampering) -> None:
    plaintext = b"canary-" + secrets.token_hex(8).encode()
    blob = seal(key, plaintext, AAD)
    with pytest.raises(DecryptionError) as caught:
        open_sealed(*tampering(key, blob))
    assert caught.value.reason == "DECRYPTION_FAILED"
    assert isinstance(caught.value, Internal)
    leaked = plaintext.decode() in str(caught.value) or blob.hex() in str(caught.value)
    assert not leaked, "the error message carries the plaintext or the blob"
    assert_leaks_nothing(caught.value, [key])


# --- keyring: environment ------------------------------------------------------------------------------------------


def test_env_override_makes_the_highest_version_current_and_beats_the_key_file(tmp_path: Path) -> None:
    k1, k2, k3, file_key = (secrets.token_bytes(32) for _ in range(4))
    key_file = write_key_file(tmp_path / "keys.json", key_document((7, file_key)))
    environ = {ENV_VAR: f"3:{b64(k3)}, 1:{b64(k1)},2:{b64(k2)}"}

    keyring = load_keyring(key_file, environ)

    assert keyring.current() == (3, k3)
    assert (keyring.kek(1), keyring.kek(2)) == (k1, k2)
    with pytest.raises(KeyringError):
        keyring.kek(7)  # the file's key is not used at all


def test_an_empty_env_value_falls_back_to_the_key_file(tmp_path: Path, key: bytes) -> None:
    key_file = write_key_file(tmp_path / "keys.json", key_document((1, key)))
    assert load_keyring(key_file, {ENV_VAR: "  "}).current() == (1, key)


@pytest.mark.parametrize(
    "make_value",
    [
        pytest.param(lambda k: f"1:{b64(k[:31])}", id="short key"),
        pytest.param(lambda k: f"1:{b64(k + b'x')}", id="long key"),
        pytest.param(lambda k: f"1:{b64(k)},1:{b64(k)}", id="duplicate version"),
        pytest.param(lambda k: f"0:{b64(k)}", id="version zero"),
        pytest.param(lambda k: f"v1:{b64(k)}", id="version not a number"),
        pytest.param(lambda k: f"\u00b2:{b64(k)}", id="version a non-ascii digit"),
        pytest.param(lambda k: b64(k), id="no version"),
        pytest.param(lambda k: f"1:{b64(k)}!!", id="not base64"),
        pytest.param(lambda k: f"1:{b64(k)},", id="empty entry"),
    ],
)
def test_a_bad_env_value_is_a_one_line_configuration_error_without_key_material(
    key: bytes, make_value: Callable[[bytes], str]
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_keyring(None, {ENV_VAR: make_value(key)})
    assert_one_line_config_error(caught, ENV_VAR)
    assert_leaks_nothing(caught.value, [key, key[:31]])


def test_keyring_repr_and_kek_errors_show_no_key(key: bytes) -> None:
    keyring = Keyring(current_version=1, keys={1: key})
    leaked = any(form in repr(keyring) for form in forms(key))
    assert not leaked, "the keyring's repr shows a key"
    with pytest.raises(KeyringError) as caught:
        keyring.kek(2)
    assert caught.value.reason == "KEK_UNAVAILABLE"


def test_keyring_rejects_a_current_version_it_does_not_hold(key: bytes) -> None:
    with pytest.raises(ValueError, match="current"):
        Keyring(current_version=2, keys={1: key})


# --- keyring: key file ---------------------------------------------------------------------------------------------


def test_no_key_file_and_no_env_fails_closed() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_keyring(None, {})
    assert_one_line_config_error(caught, ENV_VAR)


def test_key_file_loads_with_its_current_version(tmp_path: Path) -> None:
    k1, k2 = secrets.token_bytes(32), secrets.token_bytes(32)
    key_file = write_key_file(tmp_path / "keys.json", key_document((1, k1), (2, k2), current=1))
    keyring = load_keyring(key_file, {})
    assert keyring.current() == (1, k1)
    assert keyring.kek(2) == k2


def _bad_documents(key: bytes) -> dict[str, object]:
    return {
        "short key": key_document((1, key[:31])),
        "duplicate versions": key_document((1, key), (1, key)),
        "current not held": key_document((1, key), current=2),
        "wrong format": {**key_document((1, key)), "format": "something-else/1"},
        "keys not a list": {**key_document((1, key)), "keys": {"1": b64(key)}},
        "boolean version": {**key_document((1, key)), "keys": [{"version": True, "key": b64(key)}], "current": 1},
        "key not a string": {**key_document((1, key)), "keys": [{"version": 1, "key": list(key)}]},
        "not an object": [b64(key)],
    }


@pytest.mark.parametrize("case", list(_bad_documents(b"\x00" * 32)))
def test_a_bad_key_file_is_a_one_line_configuration_error_without_key_material(
    tmp_path: Path, key: bytes, case: str
) -> None:
    key_file = write_key_file(tmp_path / "keys.json", _bad_documents(key)[case])
    with pytest.raises(ConfigurationError) as caught:
        load_keyring(key_file, {})
    assert_one_line_config_error(caught, str(key_file))
    assert_leaks_nothing(caught.value, [key, key[:31]])


def test_a_key_file_that_is_not_json_names_the_file_and_shows_none_of_it(tmp_path: Path, key: bytes) -> None:
    key_file = tmp_path / "keys.json"
    key_file.write_text('{"format": "mailbroker-keyring/1", "keys": [{"key": "' + b64(key) + '"')
    key_file.chmod(0o600)
    with pytest.raises(ConfigurationError) as caught:
        load_keyring(key_file, {})
    assert_one_line_config_error(caught, str(key_file))
    assert_leaks_nothing(caught.value, [key])


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_a_group_or_world_accessible_key_file_is_refused(tmp_path: Path, key: bytes, mode: int) -> None:
    key_file = write_key_file(tmp_path / "keys.json", key_document((1, key)), mode=mode)
    with pytest.raises(ConfigurationError, match="readable by group or others") as caught:
        load_keyring(key_file, {})
    assert_one_line_config_error(caught, str(key_file))
    assert_leaks_nothing(caught.value, [key])


def test_a_missing_key_file_is_a_configuration_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "keys.json"
    with pytest.raises(ConfigurationError) as caught:
        load_keyring(missing, {})
    assert_one_line_config_error(caught, str(missing))


def test_a_directory_is_not_a_key_file(tmp_path: Path) -> None:
    directory = tmp_path / "keys.d"
    directory.mkdir(mode=0o700)
    with pytest.raises(ConfigurationError) as caught:
        load_keyring(directory, {})
    assert_one_line_config_error(caught, str(directory))


def test_generate_key_file_writes_a_0600_file_with_one_fresh_key(tmp_path: Path, umask_022: None) -> None:
    key_file = tmp_path / "keys.json"
    generate_key_file(key_file)

    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    document = json.loads(key_file.read_text())
    assert document["format"] == KEY_FILE_FORMAT
    assert document["current"] == 1
    assert [entry["version"] for entry in document["keys"]] == [1]
    version, kek = load_keyring(key_file, {}).current()
    assert version == 1
    assert len(kek) == 32


def test_generate_key_file_makes_a_different_key_each_time(tmp_path: Path) -> None:
    generate_key_file(tmp_path / "a.json")
    generate_key_file(tmp_path / "b.json")
    different = load_keyring(tmp_path / "a.json", {}).kek(1) != load_keyring(tmp_path / "b.json", {}).kek(1)
    assert different


def test_generate_key_file_refuses_to_overwrite(tmp_path: Path) -> None:
    key_file = tmp_path / "keys.json"
    generate_key_file(key_file)
    before = key_file.read_bytes()
    with pytest.raises(ConfigurationError, match="already exists") as caught:
        generate_key_file(key_file)
    assert_one_line_config_error(caught, str(key_file))
    unchanged = key_file.read_bytes() == before
    assert unchanged


def test_add_key_version_appends_a_current_key_and_keeps_the_old_ones(tmp_path: Path, umask_022: None) -> None:
    key_file = tmp_path / "keys.json"
    generate_key_file(key_file)
    old = load_keyring(key_file, {}).kek(1)

    assert add_key_version(key_file) == 2
    assert add_key_version(key_file) == 3

    keyring = load_keyring(key_file, {})
    assert keyring.current_version == 3
    assert keyring.kek(1) == old
    assert len({keyring.kek(1), keyring.kek(2), keyring.kek(3)}) == 3
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]  # no temporary file left behind


def test_add_key_version_refuses_an_exposed_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "keys.json"
    generate_key_file(key_file)
    key_file.chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by group or others"):
        add_key_version(key_file)


# --- data keys and AAD ---------------------------------------------------------------------------------------------


@pytest.fixture
def keyring() -> Keyring:
    return Keyring(current_version=2, keys={1: secrets.token_bytes(32), 2: secrets.token_bytes(32)})


def test_a_data_key_wraps_with_the_current_kek_and_unwraps(keyring: Keyring) -> None:
    dek = new_data_key()
    version, wrapped = wrap_data_key(keyring, "a1", dek)
    assert version == 2
    assert dek not in wrapped
    assert unwrap_data_key(keyring, "a1", version, wrapped) == dek


def test_new_data_keys_are_256_bit_and_distinct() -> None:
    keys = {new_data_key() for _ in range(16)}
    assert len(keys) == 16
    assert {len(k) for k in keys} == {32}


def test_a_data_key_wrapped_for_one_account_does_not_unwrap_for_another(keyring: Keyring) -> None:
    version, wrapped = wrap_data_key(keyring, "a1", new_data_key())
    with pytest.raises(DecryptionError):
        unwrap_data_key(keyring, "a2", version, wrapped)


def test_a_data_key_does_not_unwrap_under_another_claimed_kek_version(keyring: Keyring) -> None:
    version, wrapped = wrap_data_key(keyring, "a1", new_data_key())
    assert version == 2
    with pytest.raises(DecryptionError):
        unwrap_data_key(keyring, "a1", 1, wrapped)
    with pytest.raises(KeyringError):
        unwrap_data_key(keyring, "a1", 9, wrapped)


def test_a_data_key_wrapped_before_rotation_still_unwraps_after_it(keyring: Keyring) -> None:
    old = Keyring(current_version=1, keys={1: keyring.kek(1)})
    dek = new_data_key()
    version, wrapped = wrap_data_key(old, "a1", dek)
    assert unwrap_data_key(keyring, "a1", version, wrapped) == dek


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("a|b", "c", "acct", 1), ("a", "b|c", "acct", 1)),
        (("t", "c", "a,1", 1), ("t", "c,a", "1", 1)),
        (("t", 'c"', "a", 1), ("t", "c", '"a', 1)),
        (("t", "c", "a", 1), ("t", "c", "a", 2)),
        (("t", "c", "a1", 1), ("t", "c", "a", 11)),
        (("account_secrets", "imap_password", "a", 1), ("account_secrets", "refresh_token", "a", 1)),
    ],
)
def test_secret_aad_keeps_different_fields_apart(
    first: tuple[str, str, str, int], second: tuple[str, str, str, int]
) -> None:
    assert secret_aad(*first) != secret_aad(*second)


@pytest.mark.parametrize(
    "elsewhere",
    [
        ("account_secrets", "imap_password", "a2", 1),
        ("account_secrets", "refresh_token", "a1", 1),
        ("accounts", "imap_password", "a1", 1),
        ("account_secrets", "imap_password", "a1", 2),
    ],
)
def test_a_value_sealed_for_one_place_does_not_open_in_another(
    key: bytes, elsewhere: tuple[str, str, str, int]
) -> None:
    blob = seal(key, b"pw", secret_aad("account_secrets", "imap_password", "a1", 1))
    with pytest.raises(DecryptionError):
        open_sealed(key, blob, secret_aad(*elsewhere))


def test_secret_aad_is_deterministic() -> None:
    assert secret_aad("t", "c", "a", 1) == secret_aad("t", "c", "a", 1)
