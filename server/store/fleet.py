"""Word between broker replicas that share one PostgreSQL database: LISTEN/NOTIFY on one channel.

Three messages travel, each sent by the store once the transaction that makes it true has committed, best effort
(a NOTIFY that fails must never roll back the change it announces; a replica that misses one falls back on
refreshing, on the 2 s account cache and on its periodic reconciliation):

- :class:`Erased`: an account was erased. Every other replica ends the account's feeds, closes its connections and
  forgets its access token.
- :class:`Regranted`: the user consented again (new scopes, a new refresh token). The others drop the account's
  access token and connections, which carry the old grant's scopes.
- :class:`Token`: a replica refreshed an account's access token. The token goes to the others sealed with the
  account's data key (AES-256-GCM, AAD naming the account and the refresh generation), so that one refresh serves
  the whole fleet. PostgreSQL keeps notifications in memory (spilling to ``pg_notify`` when the queue is long) and
  never in its write-ahead log; nothing here writes a token to a table.

On SQLite (one process) :func:`send` does nothing and no listener runs.

Payloads carry an account id, a generation and ciphertext: no address, no name, no plaintext token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import text
from sqlalchemy.engine import URL, Connection

from server.crypto.aead import open_sealed, seal
from server.crypto.datakeys import secret_aad
from server.crypto.keyring import Keyring, KeyringError

log = logging.getLogger("mailbroker.fleet")

_MAC_INFO = b"mailbroker fleet notice v1"

CHANNEL = "mailbroker_fleet"
# How long the listener waits for a notification before checking whether it should stop.
POLL_SECONDS = 0.5
RECONNECT_SECONDS = 1.0
# The listening connection only receives; it asks the server something this often, so that a connection a
# firewall or a failover dropped silently is noticed (and TCP keepalives back that up).
PING_SECONDS = 15.0
RECONCILE_SECONDS = 60.0
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
# PostgreSQL refuses a NOTIFY payload of 8,000 bytes or more.
MAX_PAYLOAD_BYTES = 7_900


@dataclass(frozen=True)
class Erased:
    account_id: str


@dataclass(frozen=True)
class Regranted:
    account_id: str


@dataclass(frozen=True)
class Token:
    account_id: str
    generation: int
    sealed: bytes


Message = Erased | Regranted | Token


def send(connection: Connection, message: Message, keyring: Keyring) -> None:
    """NOTIFY the other replicas of ``message`` on a PostgreSQL ``connection`` (the store's, in autocommit)."""
    payload = encode(message, keyring)
    if len(payload.encode()) > MAX_PAYLOAD_BYTES:
        # Only a token can be this long, and PostgreSQL would refuse it: the other replicas refresh for themselves.
        return
    connection.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": payload})


def _token_aad(account_id: str, generation: int) -> bytes:
    return secret_aad("fleet", f"access_token/{generation}", account_id, 1)


def seal_token(dek: bytes, account_id: str, generation: int, access_token: str, expire_time: datetime) -> Token:
    plaintext = json.dumps({"token": access_token, "expire": expire_time.astimezone(UTC).isoformat()}).encode()
    return Token(account_id, generation, seal(dek, plaintext, _token_aad(account_id, generation)))


def open_token(dek: bytes, message: Token) -> tuple[str, datetime] | None:
    """The token and its expiry, or None if the ciphertext does not open for this account and generation."""
    try:
        document = json.loads(open_sealed(dek, message.sealed, _token_aad(message.account_id, message.generation)))
        return str(document["token"]), datetime.fromisoformat(document["expire"])
    except Exception:  # any tampering or mix-up reads as "no token": the replica refreshes instead
        return None


def _mac_key(kek: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_MAC_INFO).derive(kek)


def _mac(key: bytes, fields: Mapping[str, object]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()


def encode(message: Message, keyring: Keyring) -> str:
    """The NOTIFY payload: the message's fields and an HMAC-SHA256 over them keyed from the current KEK (``v``
    names its version), so that only a holder of the broker's keys can send what replicas act on."""
    fields: dict[str, object]
    if isinstance(message, Erased):
        fields = {"t": "erased", "a": message.account_id}
    elif isinstance(message, Regranted):
        fields = {"t": "regranted", "a": message.account_id}
    else:
        fields = {
            "t": "token",
            "a": message.account_id,
            "g": message.generation,
            "s": base64.b64encode(message.sealed).decode(),
        }
    version, kek = keyring.current()
    return json.dumps({**fields, "v": version, "m": _mac(_mac_key(kek), fields)})


def decode(payload: str, keyring: Keyring) -> Message | None:
    """Parse a notification; None for one whose MAC does not check out under the keyring (forged, or from a broker
    with other keys) and for anything this version does not understand."""
    try:
        document = json.loads(payload)
        mac = document.pop("m")
        version = document.pop("v")
        if not isinstance(mac, str) or not isinstance(version, int):
            return None
        if not hmac.compare_digest(mac, _mac(_mac_key(keyring.kek(version)), document)):
            return None
        account_id = document["a"]
        if not isinstance(account_id, str):
            return None
        if document["t"] == "erased":
            return Erased(account_id)
        if document["t"] == "regranted":
            return Regranted(account_id)
        if document["t"] == "token":
            return Token(account_id, int(document["g"]), base64.b64decode(document["s"], validate=True))
    except (ValueError, KeyError, TypeError, AttributeError, KeyringError):
        return None
    return None


class Listener:
    """A thread holding one ``LISTEN`` connection, handing every message to ``deliver`` (on that thread).

    ``reconcile(reconnected)`` runs after every (re)connection and every ``RECONCILE_SECONDS``: messages sent
    while it was not listening are lost, so the receiver re-checks what it holds (which accounts still exist)
    rather than trusting the silence.
    """

    def __init__(
        self,
        url: URL,
        deliver: Callable[[Message], None],
        reconcile: Callable[[bool], None],
        keyring: Keyring,
    ) -> None:
        self._keyring = keyring
        # Connection arguments, not a rendered URL: a password with spaces or other specials stays intact.
        self._connect_args: dict[str, Any] = {
            **{k: v for k, v in url.translate_connect_args(username="user", database="dbname").items() if v},
            **dict(url.query),
            **KEEPALIVES,
        }
        self._deliver = deliver
        self._reconcile = reconcile
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mailbroker-fleet", daemon=True)
        self.connected = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        import psycopg  # only replicas on PostgreSQL get here

        connections = 0
        while not self._stop.is_set():
            try:
                with psycopg.connect(autocommit=True, connect_timeout=10, **self._connect_args) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    self._reconcile(connections > 0)
                    connections += 1
                    self.connected.set()
                    pinged = reconciled = time.monotonic()
                    while not self._stop.is_set():
                        for notification in connection.notifies(timeout=POLL_SECONDS):
                            message = decode(notification.payload, self._keyring)
                            if message is not None:
                                self._dispatch(message)
                        if time.monotonic() - pinged > PING_SECONDS:
                            connection.execute("SELECT 1")
                            pinged = time.monotonic()
                        if time.monotonic() - reconciled > RECONCILE_SECONDS:
                            self._reconcile(False)
                            reconciled = time.monotonic()
            except Exception as exc:  # the connection, its server or a callback: never the thread
                self.connected.clear()
                log.warning(
                    "fleet listener lost its database connection; reconnecting",
                    extra={"component": "fleet", "event": "fleet_reconnect", "reason": type(exc).__name__},
                )
                self._stop.wait(RECONNECT_SECONDS)
        self.connected.clear()

    def _dispatch(self, message: Message) -> None:
        try:
            self._deliver(message)
        except Exception:  # one bad message must not stop the listener
            log.error("fleet message failed", exc_info=True, extra={"component": "fleet"})
