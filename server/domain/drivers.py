"""One live driver per account, made on first use from the account's sealed credentials and kept for reuse
(its connection pool with it)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from server.domain.blocking import BlockingPool
from server.domain.models import Account, Provider
from server.domain.tokens import AccessTokens, AccountTokenSource
from server.errors import FailedPrecondition
from server.providers.base import MailDriver
from server.providers.imap.driver import ImapDriver, ImapSettings
from server.providers.imap.pool import ImapPool
from server.store.repository import Store

if TYPE_CHECKING:  # the drivers themselves are imported when first needed (see Drivers.get)
    from server.providers.google.gmail import GmailSettings
    from server.providers.microsoft.graph import GraphSettings


class Drivers:
    """The driver cache. A driver is replaced when the account changed (new credentials, capabilities)."""

    def __init__(
        self,
        store: Store,
        blocking: BlockingPool,
        providers: BlockingPool,
        imap: ImapSettings,
        *,
        tokens: AccessTokens | None = None,
        gmail: GmailSettings | None = None,
        graph: GraphSettings | None = None,
    ) -> None:
        self._tokens = tokens
        self._gmail = gmail
        self._graph = graph
        self._store = store
        self._blocking = blocking
        self._providers = providers
        self._imap = imap
        self._drivers: dict[str, tuple[Any, MailDriver]] = {}
        self._lock = asyncio.Lock()

    def account_ids(self) -> set[str]:
        """The accounts with a live driver (a copy taken in one C call: safe from another thread)."""
        return set(list(self._drivers))

    async def get(self, account: Account) -> MailDriver:
        cached = self._drivers.get(account.id)
        if cached is not None and cached[0] == account.update_time:
            return cached[1]  # the common case, without queueing behind another account's driver being built
        async with self._lock:
            cached = self._drivers.get(account.id)
            if cached is not None and cached[0] == account.update_time:
                return cached[1]
            if account.provider is Provider.MICROSOFT:
                if self._tokens is None or self._graph is None:
                    raise FailedPrecondition(
                        "this provider is not configured on this broker", reason="PROVIDER_NOT_CONFIGURED"
                    )
                # Imported here: googleapiclient, msal and requests cost tens of MiB that a broker without these
                # providers never needs (server.app imports their OAuth clients the same way).
                from server.providers.microsoft.graph import GraphDriver

                graph: MailDriver = GraphDriver(AccountTokenSource(self._tokens, account), self._providers, self._graph)
                self._drivers[account.id] = (account.update_time, graph)
                if cached is not None:
                    await cached[1].close()
                return graph
            if account.provider is Provider.GOOGLE:
                if self._tokens is None or self._gmail is None:
                    raise FailedPrecondition(
                        "this provider is not configured on this broker", reason="PROVIDER_NOT_CONFIGURED"
                    )
                from server.providers.google.gmail import GmailDriver

                gmail: MailDriver = GmailDriver(AccountTokenSource(self._tokens, account), self._providers, self._gmail)
                self._drivers[account.id] = (account.update_time, gmail)
                if cached is not None:
                    await cached[1].close()
                return gmail
            password = await self._blocking.run(self._store.read_secret, account.id, "imap_password")
            if password is None:
                raise FailedPrecondition("the account has no stored credential", reason="ACCOUNT_NEEDS_REAUTH")
            from server.providers.imap.connection import Credentials

            # Typed as the Protocol, so mypy proves the driver implements it.
            driver: MailDriver = ImapDriver(
                account.profile,
                Credentials(account.profile.username, password.decode("utf-8")),
                self._providers,
                self._imap,
            )
            self._drivers[account.id] = (account.update_time, driver)
        if cached is not None:
            await cached[1].close()
        return driver

    def imap_pools(self) -> list[ImapPool]:
        """The connection pools of the IMAP accounts in use (for metrics, from the scrape's thread: the values are
        copied in one C call)."""
        return [driver.pool for _, driver in list(self._drivers.values()) if isinstance(driver, ImapDriver)]

    async def evict(self, account_id: str) -> None:
        """Close and forget an account's driver (erasure, re-authentication)."""
        # Forgotten at once, so that ``get`` stops handing it out; then once more after any driver being built
        # meanwhile for the account (``get`` holds the lock while it builds one).
        evicted = [self._drivers.pop(account_id, None)]
        async with self._lock:
            evicted.append(self._drivers.pop(account_id, None))
        for cached in evicted:
            if cached is not None:
                await cached[1].close()

    async def close(self) -> None:
        async with self._lock:
            drivers, self._drivers = self._drivers, {}
        for _, driver in drivers.values():
            await driver.close()
