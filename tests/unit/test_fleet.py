"""Messages between replicas (server.store.fleet): what they carry, and that a token opens only where it was meant."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime

import pytest

from server.crypto.keyring import Keyring
from server.store import fleet

EXPIRY = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def test_a_sealed_token_opens_for_its_account_and_generation_only() -> None:
    dek = secrets.token_bytes(32)
    token = f"canary-access-{secrets.token_hex(8)}"
    message = fleet.seal_token(dek, "acct-1", 3, token, EXPIRY)
    assert token.encode() not in message.sealed
    assert fleet.open_token(dek, message) == (token, EXPIRY)
    assert fleet.open_token(dek, fleet.Token("acct-2", 3, message.sealed)) is None
    assert fleet.open_token(dek, fleet.Token("acct-1", 4, message.sealed)) is None
    assert fleet.open_token(secrets.token_bytes(32), message) is None


KEYRING = Keyring(current_version=2, keys={1: secrets.token_bytes(32), 2: secrets.token_bytes(32)})


def test_messages_round_trip_and_their_payload_holds_no_plaintext_token() -> None:
    dek = secrets.token_bytes(32)
    token = f"canary-access-{secrets.token_hex(8)}"
    for message in (
        fleet.Erased("acct-1"),
        fleet.Regranted("acct-1"),
        fleet.seal_token(dek, "acct-1", 1, token, EXPIRY),
    ):
        payload = fleet.encode(message, KEYRING)
        assert token not in payload
        assert fleet.decode(payload, KEYRING) == message


def test_a_notice_without_the_brokers_keys_is_ignored() -> None:
    """Anyone who can connect to the database can NOTIFY on the channel: only notices MACed with the broker's KEK
    count, and one edited in transit (another account, another kind) does not."""
    genuine = json.loads(fleet.encode(fleet.Erased("acct-1"), KEYRING))
    forged = [
        {"t": "erased", "a": "acct-1"},  # no MAC at all
        {**genuine, "a": "acct-2"},  # the MAC of another account's notice
        {**genuine, "t": "regranted"},
        {**genuine, "v": 1},  # checked under another key version
        {**genuine, "v": 9},  # a version the keyring does not have
        {**genuine, "m": "0" * 64},
    ]
    assert [fleet.decode(json.dumps(notice), KEYRING) for notice in forged] == [None] * len(forged)
    other_broker = Keyring(current_version=2, keys={2: secrets.token_bytes(32)})
    assert fleet.decode(json.dumps(genuine), other_broker) is None
    assert fleet.decode(json.dumps(genuine), KEYRING) == fleet.Erased("acct-1")


@pytest.mark.parametrize(
    "fields",
    [
        {"t": "erased"},
        {"t": "erased", "a": 7},
        {"t": "token", "a": "x", "g": "one", "s": ""},
        {"t": "token", "a": "x", "g": 1, "s": "***"},
        {"t": "something new", "a": "x"},
    ],
)
def test_a_payload_this_version_does_not_understand_is_ignored(fields: dict[str, object]) -> None:
    """Even correctly MACed (a newer broker's notice, say)."""
    version, kek = KEYRING.current()
    signed = {**fields, "v": version, "m": fleet._mac(fleet._mac_key(kek), fields)}
    assert fleet.decode(json.dumps(signed), KEYRING) is None


@pytest.mark.parametrize("payload", ["", "not json", "[]", "{}", '{"m": 1, "v": 2}', '{"m": "x", "v": "2"}'])
def test_a_payload_that_is_not_a_notice_is_ignored(payload: str) -> None:
    assert fleet.decode(payload, KEYRING) is None
