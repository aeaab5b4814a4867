"""Everything the emulator knows — OAuth clients, users, grants, codes, tokens, mailboxes, faults, counters —
behind one lock. Handlers and the test-control API both go through :class:`GoogleState`."""

from __future__ import annotations

import secrets
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tests.emulators.google.clock import Clock
from tests.emulators.google.mailbox import Mailbox
from tests.emulators.google.signing import SigningKey

ACCESS_TOKEN_LIFETIME = 3599  # seconds, what Google's token endpoint says in expires_in
CODE_LIFETIME = 600  # RFC 6749 4.1.2: "A maximum authorization code lifetime of 10 minutes is RECOMMENDED"


@dataclass(frozen=True)
class Policy:
    """Switches for behaviour a test may want to vary. The defaults are Google's, except where marked stricter."""

    # Stricter than Google (which also accepts plain and no PKCE): the broker must use S256.
    require_pkce_s256: bool = True
    # Stricter than Google (which only recommends it): the broker must send state.
    require_state: bool = True
    # Google keeps the refresh token on refresh (none in the response); True issues a new one each time and
    # invalidates the old, to test "persist the new refresh token before relying on it".
    rotate_refresh_tokens: bool = False
    # Google: access_type=offline yields a refresh token "the first time your application exchanges an
    # authorization code" for that user (again only after prompt=consent). True hands one out on every exchange.
    refresh_token_on_every_exchange: bool = False


@dataclass
class Client:
    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...]


@dataclass
class User:
    email: str
    sub: str
    mailbox: Mailbox


@dataclass
class Grant:
    """A user's authorization of one client; revoking it ends every token issued under it."""

    user: str
    client_id: str
    scopes: set[str] = field(default_factory=set)
    revoked: bool = False
    refresh_issued: bool = False


@dataclass
class AuthCode:
    code: str
    client_id: str
    user: str
    redirect_uri: str
    scopes: frozenset[str]
    code_challenge: str | None
    code_challenge_method: str | None
    access_type: str
    prompt: frozenset[str]
    nonce: str | None
    expires_at: float
    grant: Grant
    used: bool = False
    issued: list[str] = field(default_factory=list)  # tokens made from it, revoked if it is replayed


@dataclass
class AccessToken:
    token: str
    grant: Grant
    scopes: frozenset[str]
    expires_at: float
    revoked: bool = False


@dataclass
class RefreshToken:
    token: str
    grant: Grant
    scopes: frozenset[str]
    revoked: bool = False


@dataclass
class Consent:
    """What the simulated user does on the consent screen."""

    user: str
    untick: frozenset[str]
    deny: bool


@dataclass
class Throttle:
    remaining: int
    status: int
    reason: str
    retry_after: int | None
    user: str | None


@dataclass
class ApiFault:
    """An error a test asked the Gmail API to answer with: any 4xx/5xx, Google's JSON error shape, the test's text."""

    remaining: int
    status: int
    message: str
    reason: str
    domain: str
    error_info: dict[str, Any] | None
    retry_after: int | None
    methods: frozenset[str]  # Gmail method ids; empty: every method
    user: str | None
    html: str | None = None  # an HTML page instead of the JSON error


@dataclass
class TokenFault:
    remaining: int
    status: int
    body: dict[str, Any]
    retry_after: int | None
    html: str | None = None  # an HTML page instead of the JSON error


@dataclass(frozen=True)
class SentMessage:
    """A message the broker sent through users.messages.send, as Gmail stored it (Bcc removed), and to whom."""

    user: str
    message_id: str
    raw: bytes
    recipients: tuple[str, ...]  # envelope: To, Cc and Bcc addresses


@dataclass(frozen=True)
class SeenRequest:
    """One request the emulator received (kept in memory only; tests read it, nothing prints it)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    status: int


class GoogleState:
    def __init__(self, policy: Policy, issuer: str) -> None:
        self.lock = threading.RLock()
        self.clock = Clock()
        self.policy = policy
        self.issuer = issuer
        self.signing_key = SigningKey()
        self.clients: dict[str, Client] = {}
        self.users: dict[str, User] = {}
        self.grants: dict[tuple[str, str], Grant] = {}
        self.codes: dict[str, AuthCode] = {}
        self.access_tokens: dict[str, AccessToken] = {}
        self.refresh_tokens: dict[str, RefreshToken] = {}
        self.consents: dict[str, Consent] = {}
        self.throttles: list[Throttle] = []
        self.api_faults: list[ApiFault] = []
        self.token_faults: list[TokenFault] = []
        self.counters: Counter[str] = Counter()
        self.requests: list[SeenRequest] = []
        self.authorization_requests: list[dict[str, str]] = []
        self.gmail_responses: list[tuple[str, str | None, Any]] = []  # (method id, response schema, JSON)
        self.sent: list[SentMessage] = []
        self.page_tokens: dict[str, tuple[Any, int]] = {}
        self.internal_errors: list[str] = []
        self._seed = 0

    def next_seed(self) -> int:
        self._seed += 1
        return self._seed

    def new_token(self, prefix: str) -> str:
        return prefix + secrets.token_urlsafe(48)

    def live_grant(self, user: str, client_id: str) -> Grant:
        """The user's current grant to the client, a fresh one if there is none or it was revoked."""
        grant = self.grants.get((user, client_id))
        if grant is None or grant.revoked:
            grant = Grant(user=user, client_id=client_id)
            self.grants[(user, client_id)] = grant
        return grant

    def revoke_grant(self, grant: Grant) -> None:
        grant.revoked = True
        for table in (self.access_tokens, self.refresh_tokens):
            for record in table.values():
                if record.grant is grant:
                    record.revoked = True

    def access_token(self, token: str) -> AccessToken | None:
        """The live access token, or None if unknown, expired or revoked."""
        record = self.access_tokens.get(token)
        if record is None or record.revoked or record.grant.revoked or record.expires_at <= self.clock.now():
            return None
        return record
