"""Everything the emulator knows — tenants, app registrations, users, grants, codes, tokens, mailboxes, faults,
counters — behind one lock. Handlers and the test-control API both go through :class:`MicrosoftState`."""

from __future__ import annotations

import secrets
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tests.emulators.google.clock import Clock
from tests.emulators.microsoft.mailbox import Mailbox
from tests.emulators.microsoft.signing import SigningKey

CODE_LIFETIME = 600  # "Authorization codes are short lived, typically they expire after about 10 minutes."
REFRESH_TOKEN_LIFETIME = 90 * 24 * 3600  # refresh-tokens: "90 days for all other scenarios" (not SPA)
ID_TOKEN_LIFETIME = 3600
GRAPH = "https://graph.microsoft.com/"
# The tenant id the identity platform uses for personal Microsoft accounts (not emulated; named for refusals).
MSA_TENANT = "9188040d-6c67-4c5b-b112-36a304b66dad"


@dataclass(frozen=True)
class Policy:
    """Switches a test may want to vary. The defaults are Microsoft's, except where marked stricter."""

    # Stricter than Microsoft (which accepts plain and, for confidential clients, no PKCE): S256 is required.
    require_pkce_s256: bool = True
    # Stricter than Microsoft (which only recommends it): state is required.
    require_state: bool = True
    # How `scope` in a token response names Graph permissions: "short" ("Mail.Read", what work and school
    # accounts get back for Graph, the default resource) or "url" ("https://graph.microsoft.com/Mail.Read").
    scope_style: str = "short"
    # Microsoft "doesn't revoke old refresh tokens when used to fetch new access tokens": a rotated-out refresh
    # token lives out its own lifetime (None). A number of seconds ends it that long after its rotation.
    rotated_refresh_token_lifetime: float | None = None
    # Outlook: "4 concurrent requests" per app per mailbox; the fifth gets 429 ApplicationThrottled.
    mailbox_concurrency: int = 4
    concurrency_retry_after: int = 1
    # Access token lifetime: the platform picks 60-90 minutes at random; fixed here so tests can step the clock.
    access_token_lifetime: int = 4499


@dataclass
class Tenant:
    id: str
    domain: str


@dataclass
class App:
    """An app registration (a confidential web client)."""

    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...]
    display_name: str
    # The Graph permissions configured on the registration (what /.default asks for), short names.
    api_permissions: tuple[str, ...]


@dataclass
class User:
    email: str
    oid: str
    tenant_id: str
    display_name: str
    mailbox: Mailbox
    sessions_revoked_at: float = -1.0  # revokeSignInSessions: refresh tokens issued before this fail
    interaction_required: bool = False  # e.g. MFA now required: refresh fails until the user signs in again


@dataclass
class Grant:
    """A user's consent to one app; revoking it ends every refresh token issued under it."""

    user: str
    client_id: str
    scopes: set[str] = field(default_factory=set)  # canonical: "openid", ..., "https://graph.microsoft.com/Mail.Read"
    revoked: bool = False


@dataclass
class AuthCode:
    code: str
    client_id: str
    user: str
    tenant_path: str
    redirect_uri: str
    scopes: frozenset[str]
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None
    expires_at: float
    grant: Grant
    used: bool = False


@dataclass
class AccessToken:
    token: str
    grant: Grant
    scopes: frozenset[str]  # canonical Graph scopes only (the token's scp)
    expires_at: float


@dataclass
class RefreshToken:
    token: str
    grant: Grant
    issued_at: float
    expires_at: float
    rotated_at: float | None = None


@dataclass
class Consent:
    """What the simulated user does on the consent screen."""

    user: str
    untick: frozenset[str]
    deny: bool


@dataclass
class Throttle:
    """A throttling answer, or any error a test injects (``fail_next_requests``)."""

    remaining: int
    status: int
    code: str
    message: str
    retry_after: int | None
    user: str | None
    endpoints: frozenset[str] = frozenset()  # graph.<endpoint> names without the prefix; empty: every endpoint
    details: tuple[dict[str, str], ...] = ()
    html: str | None = None  # an HTML page instead of the JSON error


@dataclass
class TokenFault:
    remaining: int
    status: int
    error: str
    aadsts: int
    description: str
    suberror: str | None
    retry_after: int | None = None
    html: str | None = None  # an HTML page instead of the JSON error


@dataclass(frozen=True)
class SentMessage:
    """A message sent through /me/sendMail, as transmitted (Bcc removed), and its envelope recipients."""

    user: str
    raw: bytes
    recipients: tuple[str, ...]  # To, Cc and Bcc addresses
    saved_to_sent_items: bool
    kind: str  # "json" or "mime"


@dataclass(frozen=True)
class SeenRequest:
    """One request the emulator received (kept in memory only; tests read it, nothing prints it)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    status: int


class MicrosoftState:
    def __init__(self, policy: Policy) -> None:
        self.lock = threading.RLock()
        self.clock = Clock()
        self.policy = policy
        self.signing_key = SigningKey()
        default = Tenant(str(uuid.uuid4()), "emulator.onmicrosoft.test")
        self.default_tenant = default.id
        self.tenants: dict[str, Tenant] = {default.id: default}
        self.apps: dict[str, App] = {}
        self.users: dict[str, User] = {}
        self.grants: dict[tuple[str, str], Grant] = {}
        self.codes: dict[str, AuthCode] = {}
        self.access_tokens: dict[str, AccessToken] = {}
        self.refresh_tokens: dict[str, RefreshToken] = {}
        self.consents: dict[str, Consent] = {}
        self.throttles: list[Throttle] = []
        self.token_faults: list[TokenFault] = []
        self.counters: Counter[str] = Counter()
        self.requests: list[SeenRequest] = []
        self.authorization_requests: list[dict[str, str]] = []
        self.sent: list[SentMessage] = []
        self.internal_errors: list[str] = []
        self.delta_tokens: dict[str, Any] = {}  # skip and delta tokens -> graph.DeltaState
        self.base_url = ""  # set when the server starts (the issuer names it)
        # Graph requests in flight per (client id, user), and the gate that holds them open in a test.
        self.flight = threading.Condition(threading.Lock())
        self.in_flight: Counter[tuple[str, str]] = Counter()
        self.gate: threading.Event | None = None
        self._seed = 0

    def next_seed(self) -> int:
        self._seed += 1
        return self._seed

    def new_token(self, prefix: str) -> str:
        return prefix + secrets.token_urlsafe(64)

    def live_grant(self, user: str, client_id: str) -> Grant:
        grant = self.grants.get((user, client_id))
        if grant is None or grant.revoked:
            grant = Grant(user=user, client_id=client_id)
            self.grants[(user, client_id)] = grant
        return grant

    def access_token(self, token: str) -> AccessToken | None:
        """The live access token, or None if unknown or expired. Like Microsoft's JWT access tokens, it stays
        valid until it expires even after consent is revoked (only refresh stops)."""
        record = self.access_tokens.get(token)
        if record is None or record.expires_at <= self.clock.now():
            return None
        return record

    def snapshot_counters(self) -> dict[str, Any]:
        return dict(self.counters)
