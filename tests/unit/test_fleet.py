"""Messages between replicas (server.store.fleet): what they carry, and that a token opens only where it was meant."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

import pytest

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


def test_messages_round_trip_and_their_payload_holds_no_plaintext_token() -> None:
    dek = secrets.token_bytes(32)
    token = f"canary-access-{secrets.token_hex(8)}"
    for message in (
        fleet.Erased("acct-1"),
        fleet.Regranted("acct-1"),
        fleet.seal_token(dek, "acct-1", 1, token, EXPIRY),
    ):
        payload = fleet._encode(message)
        assert token not in payload
        assert fleet.decode(payload) == message


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "not json",
        "[]",
        '{"t": "erased"}',
        '{"t": "erased", "a": 7}',
        '{"t": "token", "a": "x", "g": "one", "s": ""}',
        '{"t": "token", "a": "x", "g": 1, "s": "***"}',
        '{"t": "something new", "a": "x"}',
    ],
)
def test_a_payload_this_version_does_not_understand_is_ignored(payload: str) -> None:
    assert fleet.decode(payload) is None
