"""The Gmail backend of the conformance suite: ``GmailDriver`` against the local Google emulator.

One emulator serves the whole session (``google_emulator_session`` in conftest.py); every ``new_driver`` makes a
fresh user on it and gets a real refresh token through the broker's own consent flow (``GoogleOAuth.begin`` →
the emulator's consent screen → ``GoogleOAuth.exchange``). The provider's side is the emulator's test API: mail is
delivered with labels, flags are labels (READ is the absence of UNREAD, FLAGGED is STARRED), deletion removes the
message for good, and what was sent is what ``users.messages.send`` accepted.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

from server.config import GoogleConfig
from server.domain.blocking import BlockingPool
from server.domain.mail import FolderRole
from server.domain.models import Capability
from server.providers.base import MailDriver
from server.providers.google.gmail import GmailDriver, GmailSettings
from server.providers.google.oauth import GoogleOAuth
from tests.conformance.backends import ALL_CAPABILITIES, Backend, Flag, SentMessage
from tests.emulators.google.server import GoogleEmulator
from tests.emulators.google.state import Client

REDIRECT_URI = "https://broker.test/oauth/google/callback"
DOMAIN = "gmail-conformance.example.test"
_CLOSED_PORT = 1  # nothing listens there on a test machine: connections are refused at once
_ROLE_LABELS = {
    FolderRole.INBOX: "INBOX",
    FolderRole.SENT: "SENT",
    FolderRole.DRAFTS: "DRAFT",
    FolderRole.TRASH: "TRASH",
    FolderRole.JUNK: "SPAM",
}
# The emulator answers in milliseconds: short retry windows make a failing test fail quickly.
POLL_SECONDS = 0.2
MAX_RETRY_SECONDS = 2.0
TIMEOUT_SECONDS = 10.0


class RefreshingTokens:
    """A driver's TokenSource: the access token from the exchange, then refreshed through ``GoogleOAuth.refresh``
    (as the broker's token manager does, without its store)."""

    def __init__(
        self, oauth: GoogleOAuth, pool: BlockingPool, refresh_token: str, token: str | None, expire: datetime
    ) -> None:
        self._oauth = oauth
        self._pool = pool
        self._refresh_token = refresh_token
        self._token = token
        self._expire = expire
        self._lock = asyncio.Lock()

    async def access_token(self) -> str:
        async with self._lock:
            if self._token is None or self._expire - timedelta(seconds=60) <= datetime.now(UTC):
                grant = await self._pool.run(self._oauth.refresh, self._refresh_token)
                if grant.refresh_token:
                    self._refresh_token = grant.refresh_token
                self._token, self._expire = grant.access_token, grant.expire_time
            return self._token

    def invalidate(self, token: str) -> None:
        if self._token == token:
            self._token = None


class GmailBackend(Backend):
    """Fresh users on the session's Google emulator; ``GmailDriver`` with tokens from the real consent flow."""

    name = "gmail"
    has_folders = False  # labels; the driver cannot create or delete them (no gmail.labels scope is asked for)
    # messages.list pages with Gmail's own nextPageToken, whose behaviour under concurrent change is undocumented;
    # the broker does not pretend otherwise (paging by `before:` would need the query that gmail.metadata forbids).
    exact_paging_under_change = False

    def __init__(self, emulator: GoogleEmulator, client: Client) -> None:
        self._emulator = emulator
        self._client = client
        self._blocking = BlockingPool(8, name="conformance-gmail")
        config = emulator.broker_config(client, timeout_seconds=TIMEOUT_SECONDS)
        self._oauths: list[GoogleOAuth] = []
        self._oauth = self._oauth_client(config)
        self._settings = GmailSettings(
            api_endpoint=emulator.gmail_api_endpoint,
            ca_file=emulator.ca_path,
            timeout_seconds=TIMEOUT_SECONDS,
            max_retry_seconds=MAX_RETRY_SECONDS,
            history_poll_seconds=POLL_SECONDS,
        )
        self._drivers: list[GmailDriver] = []
        self._emulator_errors = len(emulator.internal_errors())
        self._user: str | None = None
        self._refresh_token: str | None = None

    def _oauth_client(self, config: GoogleConfig) -> GoogleOAuth:
        oauth = GoogleOAuth(config)
        self._oauths.append(oauth)
        return oauth

    # -- drivers --------------------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return self._current()

    @property
    def inbox_id(self) -> str:
        return "INBOX"

    def _current(self) -> str:
        if self._user is None:
            raise RuntimeError("no mailbox yet: call new_driver() first")
        return self._user

    def _driver(self, tokens: RefreshingTokens, settings: GmailSettings | None = None) -> GmailDriver:
        driver = GmailDriver(tokens, self._blocking, settings or self._settings)
        self._drivers.append(driver)
        return driver

    def _consent(self, user: str, capabilities: frozenset[Capability]) -> tuple[str, str, datetime]:
        """The broker's consent flow for ``user``: (refresh token, access token, its expiry)."""
        url, flow = self._oauth.begin(
            self._oauth.scopes_for(capabilities), REDIRECT_URI, secrets.token_urlsafe(16), user
        )
        location = self._emulator.authorize(url, user=user)
        (code,) = parse_qs(urlsplit(location).query)["code"]
        grant = self._oauth.exchange(flow, code)
        assert grant.refresh_token, "the consent flow gave no refresh token"
        return grant.refresh_token, grant.access_token, grant.expire_time

    async def _new_user(self, capabilities: frozenset[Capability]) -> RefreshingTokens:
        user = f"conformance-{secrets.token_hex(6)}@{DOMAIN}"
        self._emulator.add_user(user)
        refresh, access, expire = await asyncio.to_thread(self._consent, user, capabilities)
        self._user, self._refresh_token = user, refresh
        return RefreshingTokens(self._oauth, self._blocking, refresh, access, expire)

    async def new_driver(self, capabilities: frozenset[Capability] = ALL_CAPABILITIES) -> MailDriver:
        return self._driver(await self._new_user(capabilities))

    async def another_driver(self) -> MailDriver:
        self._current()
        assert self._refresh_token is not None
        # As after a broker restart: only the stored refresh token survives.
        return self._driver(RefreshingTokens(self._oauth, self._blocking, self._refresh_token, None, datetime.now(UTC)))

    async def driver_with_bad_credentials(self) -> MailDriver:
        if self._user is None:
            await self._new_user(ALL_CAPABILITIES)
        # A refresh token the emulator never issued: the token endpoint answers invalid_grant.
        bogus = "1//0" + secrets.token_urlsafe(40)
        return self._driver(RefreshingTokens(self._oauth, self._blocking, bogus, None, datetime.now(UTC)))

    async def unreachable_driver(self) -> MailDriver:
        closed = f"https://127.0.0.1:{_CLOSED_PORT}/"
        unreachable = self._oauth_client(
            GoogleConfig(
                client_id=self._client.client_id,
                client_secret=self._client.client_secret,
                redirect_uris=(REDIRECT_URI,),
                token_endpoint=closed + "token",
                revoke_endpoint=closed + "revoke",
                certs_url=closed + "oauth2/v3/certs",
                api_endpoint=closed,
                ca_file=self._emulator.ca_path,
                timeout_seconds=TIMEOUT_SECONDS,
            )
        )
        settings = GmailSettings(
            api_endpoint=closed,
            ca_file=self._emulator.ca_path,
            timeout_seconds=TIMEOUT_SECONDS,
            max_retry_seconds=MAX_RETRY_SECONDS,
            history_poll_seconds=POLL_SECONDS,
        )
        # A live-looking access token, so the driver's own calls to the API endpoint are what fails.
        tokens = RefreshingTokens(
            unreachable,
            self._blocking,
            "1//0unused",
            "ya29.unused-" + secrets.token_urlsafe(8),
            datetime.now(UTC) + timedelta(hours=1),
        )
        return self._driver(tokens, settings)

    # -- the provider's side --------------------------------------------------------------------------------------

    def _message_id(self, internet_message_id: str) -> str:
        """The emulator's id of the current user's message with this Message-ID header."""
        state = self._emulator.state
        with state.lock:
            mailbox = state.users[self._current()].mailbox
            found = [
                stored.id
                for stored in mailbox.messages.values()
                if str(stored.parsed.get("Message-ID", "")).strip() == internet_message_id
            ]
        if not found:
            raise LookupError("the test message is not in the mailbox")
        return found[0]

    async def seed(
        self,
        raw_message: bytes,
        folder_role: FolderRole = FolderRole.INBOX,
        *,
        folder_name: str | None = None,
        flags: Iterable[Flag] = (),
    ) -> None:
        if folder_name is not None:
            raise NotImplementedError("gmail has no folders")
        wanted = set(flags)
        labels = [_ROLE_LABELS[folder_role]]
        if Flag.READ not in wanted:
            labels.append("UNREAD")
        if Flag.FLAGGED in wanted:
            labels.append("STARRED")
        self._emulator.deliver(self._current(), raw_message, labels)

    async def set_flag(self, internet_message_id: str, flag: Flag, value: bool = True) -> None:
        message_id = self._message_id(internet_message_id)
        if flag is Flag.READ:
            add, remove = ([], ["UNREAD"]) if value else (["UNREAD"], [])
        else:
            add, remove = (["STARRED"], []) if value else ([], ["STARRED"])
        self._emulator.modify_labels(self._current(), message_id, add, remove)

    async def flags(self, internet_message_id: str) -> frozenset[Flag]:
        labels = self._emulator.message_labels(self._current(), self._message_id(internet_message_id))
        found = set()
        if "UNREAD" not in labels:
            found.add(Flag.READ)
        if "STARRED" in labels:
            found.add(Flag.FLAGGED)
        return frozenset(found)

    async def delete(self, internet_message_id: str) -> None:
        self._emulator.delete_message(self._current(), self._message_id(internet_message_id))

    async def sent_messages(self) -> list[SentMessage]:
        if self._user is None:
            return []
        return [SentMessage(sent.user, sent.recipients, sent.raw) for sent in self._emulator.sent_messages(self._user)]

    async def aclose(self) -> None:
        drivers, self._drivers = self._drivers, []
        try:
            for driver in drivers:
                await driver.close()
        finally:
            await asyncio.to_thread(self._blocking.shutdown)
            for oauth in self._oauths:
                oauth.close()
        # An emulator bug must not pass for a Google fault (the emulator records its own exceptions).
        broke = self._emulator.internal_errors()[self._emulator_errors :]
        assert not broke, broke[0]
