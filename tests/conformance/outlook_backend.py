"""The Outlook backend of the conformance suite: ``GraphDriver`` against the local Microsoft emulator.

One emulator serves the whole session (``microsoft_emulator_session`` in conftest.py); every ``new_driver`` makes a
fresh user on it and gets a real refresh token through the broker's own consent flow (``MicrosoftOAuth.begin`` →
the emulator's consent screen → ``MicrosoftOAuth.exchange``, msal both ways). The provider's side is the emulator's
test API: mail is delivered into folders, READ is isRead, FLAGGED is flagStatus flagged, deletion is for good, and
what was sent is what ``/me/sendMail`` accepted.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from server.config import MicrosoftConfig
from server.domain.blocking import BlockingPool
from server.domain.mail import FolderRole
from server.domain.models import Capability
from server.providers.base import MailDriver
from server.providers.microsoft.graph import GraphDriver, GraphSettings
from server.providers.microsoft.oauth import MicrosoftOAuth, seal_credential
from tests.conformance.backends import ALL_CAPABILITIES, Backend, Flag, SentMessage
from tests.emulators.microsoft import App, MicrosoftEmulator

REDIRECT_URI = "https://broker.test/oauth/microsoft/callback"
DOMAIN = "outlook-conformance.example.test"
_CLOSED_PORT = 1  # nothing listens there on a test machine: connections are refused at once
_ROLE_FOLDERS = {
    FolderRole.INBOX: "inbox",
    FolderRole.SENT: "sentitems",
    FolderRole.DRAFTS: "drafts",
    FolderRole.TRASH: "deleteditems",
    FolderRole.JUNK: "junkemail",
    FolderRole.ARCHIVE: "archive",
}
# The emulator answers in milliseconds: short retry windows make a failing test fail quickly.
POLL_SECONDS = 0.2
MAX_RETRY_SECONDS = 2.0
TIMEOUT_SECONDS = 10.0


def microsoft_config(emulator: MicrosoftEmulator, app: App, **overrides: object) -> MicrosoftConfig:
    values: dict[str, object] = {
        "client_id": app.client_id,
        "client_secret": app.client_secret,
        "redirect_uris": (REDIRECT_URI,),
        "authority_host": emulator.base_url,
        "authority": "common",
        "graph_endpoint": emulator.graph_url,
        "ca_file": emulator.ca_path,
        "timeout_seconds": TIMEOUT_SECONDS,
        "max_retry_seconds": MAX_RETRY_SECONDS,
        "delta_poll_seconds": POLL_SECONDS,
    }
    values.update(overrides)
    return MicrosoftConfig(**values)  # type: ignore[arg-type]


class RefreshingTokens:
    """A driver's TokenSource: the access token from the exchange, then refreshed through ``MicrosoftOAuth.refresh``
    (as the broker's token manager does, without its store), keeping the rotated refresh token."""

    def __init__(
        self, oauth: MicrosoftOAuth, pool: BlockingPool, credential: str, token: str | None, expire: datetime
    ) -> None:
        self._oauth = oauth
        self._pool = pool
        self.credential = credential
        self._token = token
        self._expire = expire
        self._lock = asyncio.Lock()

    async def access_token(self) -> str:
        async with self._lock:
            if self._token is None or self._expire - timedelta(seconds=60) <= datetime.now(UTC):
                grant = await self._pool.run(self._oauth.refresh, self.credential)
                if grant.refresh_token:
                    self.credential = grant.refresh_token
                self._token, self._expire = grant.access_token, grant.expire_time
            return self._token

    def invalidate(self, token: str) -> None:
        if self._token == token:
            self._token = None


class OutlookBackend(Backend):
    """Fresh users on the session's Microsoft emulator; ``GraphDriver`` with tokens from the real consent flow."""

    name = "outlook"
    has_folders = True
    # Graph's @odata.nextLink pages by position ($skip): a deletion between pages shifts what comes next.
    exact_paging_under_change = False
    # Graph v1.0 messages have no size property; PR_MESSAGE_SIZE is an extended property Mail.ReadBasic cannot read.
    reports_message_size = False

    def __init__(self, emulator: MicrosoftEmulator, app: App) -> None:
        self._emulator = emulator
        self._app = app
        self._blocking = BlockingPool(8, name="conformance-outlook")
        self._oauths: list[MicrosoftOAuth] = []
        self._oauth = self._oauth_client(microsoft_config(emulator, app))
        self._settings = GraphSettings(
            graph_endpoint=emulator.graph_url,
            ca_file=emulator.ca_path,
            timeout_seconds=TIMEOUT_SECONDS,
            max_retry_seconds=MAX_RETRY_SECONDS,
            delta_poll_seconds=POLL_SECONDS,
        )
        self._drivers: list[GraphDriver] = []
        self._emulator_errors = len(emulator.internal_errors())
        self._user: str | None = None
        self._credential: str | None = None
        self._folders: dict[str, str] = {}  # display name -> emulator folder id

    def _oauth_client(self, config: MicrosoftConfig) -> MicrosoftOAuth:
        oauth = MicrosoftOAuth(config)
        self._oauths.append(oauth)
        return oauth

    # -- drivers --------------------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return self._current()

    @property
    def inbox_id(self) -> str:
        return "inbox"

    def _current(self) -> str:
        if self._user is None:
            raise RuntimeError("no mailbox yet: call new_driver() first")
        return self._user

    def _driver(self, tokens: RefreshingTokens, settings: GraphSettings | None = None) -> GraphDriver:
        driver = GraphDriver(tokens, self._blocking, settings or self._settings)
        self._drivers.append(driver)
        return driver

    def _consent(self, user: str, capabilities: frozenset[Capability]) -> tuple[str, str, datetime]:
        """The broker's consent flow for ``user``: (stored credential, access token, its expiry)."""
        url, flow = self._oauth.begin(
            self._oauth.scopes_for(capabilities), REDIRECT_URI, secrets.token_urlsafe(16), user
        )
        _, posted = self._emulator.authorize_form_post(url, user=user)
        grant = self._oauth.exchange(flow, posted["code"])
        assert grant.refresh_token, "the consent flow gave no refresh token"
        return grant.refresh_token, grant.access_token, grant.expire_time

    async def _new_user(self, capabilities: frozenset[Capability]) -> RefreshingTokens:
        user = f"conformance-{secrets.token_hex(6)}@{DOMAIN}"
        self._emulator.add_user(user)
        credential, access, expire = await asyncio.to_thread(self._consent, user, capabilities)
        self._user, self._credential, self._folders = user, credential, {}
        return RefreshingTokens(self._oauth, self._blocking, credential, access, expire)

    async def new_driver(self, capabilities: frozenset[Capability] = ALL_CAPABILITIES) -> MailDriver:
        return self._driver(await self._new_user(capabilities))

    async def another_driver(self) -> MailDriver:
        self._current()
        assert self._credential is not None
        # As after a broker restart: only the stored credential survives (refresh rotates it; the old one keeps
        # working for a while, as Microsoft documents).
        return self._driver(RefreshingTokens(self._oauth, self._blocking, self._credential, None, datetime.now(UTC)))

    async def driver_with_bad_credentials(self) -> MailDriver:
        if self._user is None:
            await self._new_user(ALL_CAPABILITIES)
        # A refresh token the emulator never issued: the token endpoint answers invalid_grant.
        bogus = seal_credential("1.AXkA" + secrets.token_urlsafe(40), ["Mail.Read", "Mail.Send", "email"])
        return self._driver(RefreshingTokens(self._oauth, self._blocking, bogus, None, datetime.now(UTC)))

    async def unreachable_driver(self) -> MailDriver:
        closed = f"https://127.0.0.1:{_CLOSED_PORT}"
        unreachable = self._oauth_client(
            microsoft_config(self._emulator, self._app, authority_host=closed, graph_endpoint=closed + "/v1.0")
        )
        settings = GraphSettings(
            graph_endpoint=closed + "/v1.0",
            ca_file=self._emulator.ca_path,
            timeout_seconds=TIMEOUT_SECONDS,
            max_retry_seconds=MAX_RETRY_SECONDS,
            delta_poll_seconds=POLL_SECONDS,
        )
        # A live-looking access token, so the driver's own calls to Graph are what fails.
        tokens = RefreshingTokens(
            unreachable,
            self._blocking,
            seal_credential("1.AXkA-unused", ["Mail.Read"]),
            "eyJ0eXAiOiJKV1Qi.unused-" + secrets.token_urlsafe(8),
            datetime.now(UTC) + timedelta(hours=1),
        )
        return self._driver(tokens, settings)

    # -- the provider's side --------------------------------------------------------------------------------------

    def _message_id(self, internet_message_id: str) -> str:
        """The emulator's id of the current user's message with this Message-ID header."""
        with self._emulator.state.lock:
            box = self._emulator.mailbox(self._current())
            found = [
                message.id
                for message in box.messages.values()
                if str(message.parsed.get("Message-ID", "")).strip() == internet_message_id
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
        wanted = set(flags)
        folder = self._folders[folder_name] if folder_name is not None else _ROLE_FOLDERS[folder_role]
        delivered = self._emulator.deliver(self._current(), raw_message, folder, is_read=Flag.READ in wanted)
        if Flag.FLAGGED in wanted:
            self._emulator.set_flag(self._current(), delivered.id, "flagged")

    async def set_flag(self, internet_message_id: str, flag: Flag, value: bool = True) -> None:
        message_id = self._message_id(internet_message_id)
        if flag is Flag.READ:
            self._emulator.set_read(self._current(), message_id, value)
        else:
            self._emulator.set_flag(self._current(), message_id, "flagged" if value else "notFlagged")

    async def flags(self, internet_message_id: str) -> frozenset[Flag]:
        message_id = self._message_id(internet_message_id)
        with self._emulator.state.lock:
            message = self._emulator.mailbox(self._current()).get(message_id)
            read, flagged = message.is_read, message.flag_status == "flagged"
        return frozenset({flag for flag, on in ((Flag.READ, read), (Flag.FLAGGED, flagged)) if on})

    async def delete(self, internet_message_id: str) -> None:
        self._emulator.delete_message(self._current(), self._message_id(internet_message_id), permanent=True)

    async def create_folder(self, name: str) -> None:
        self._folders[name] = self._emulator.create_folder(self._current(), name)

    async def delete_folder(self, name: str) -> None:
        self._emulator.delete_folder(self._current(), self._folders.pop(name))

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
        # An emulator bug must not pass for a Microsoft fault (the emulator records its own exceptions).
        broke = self._emulator.internal_errors()[self._emulator_errors :]
        assert not broke, broke[0]
