"""Access tokens of OAuth accounts: in memory only, refreshed single-flight, the rotated refresh token persisted
before it is relied on, and a refused grant turned into NEEDS_REAUTH.

Nothing here writes an access token anywhere: the cache is a dict in this process, dropped on erasure, on a new
consent and when the provider refuses the token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from server.domain.blocking import BlockingPool
from server.domain.models import Account, AccountState, Provider
from server.domain.oauth import Grant, OAuthClient
from server.errors import FailedPrecondition, Unauthenticated
from server.store.repository import Store

log = logging.getLogger("mailbroker.tokens")


@dataclass
class _Cached:
    token: str
    expire_time: datetime


def needs_reauth() -> FailedPrecondition:
    return FailedPrecondition("the account needs the user to consent again", reason="ACCOUNT_NEEDS_REAUTH")


class AccessTokens:
    """Per-account access tokens for every OAuth provider."""

    def __init__(
        self,
        store: Store,
        blocking: BlockingPool,
        providers: BlockingPool,
        clients: Mapping[Provider, OAuthClient],
        *,
        refresh_margin_seconds: float,
        on_reauth_needed: Callable[[str], Awaitable[None]],
    ) -> None:
        self._store = store
        self._blocking = blocking
        self._providers = providers
        self._clients = dict(clients)
        self._margin = timedelta(seconds=refresh_margin_seconds)
        self._on_reauth_needed = on_reauth_needed
        self._cache: dict[str, _Cached] = {}
        self._inflight: dict[str, asyncio.Future[str]] = {}
        self.refreshes = 0  # token-endpoint requests made (for tests and metrics)

    async def get(self, account: Account) -> str:
        """A live access token for ``account``; at most one refresh per account is in flight at any time."""
        cached = self._cache.get(account.id)
        if cached is not None and cached.expire_time - self._margin > datetime.now(UTC):
            return cached.token
        inflight = self._inflight.get(account.id)
        if inflight is None:
            inflight = asyncio.ensure_future(self._refresh(account))
            self._inflight[account.id] = inflight
            inflight.add_done_callback(lambda _: self._inflight.pop(account.id, None))
        # Shielded: one caller going away must not cancel the refresh the others wait for.
        return await asyncio.shield(inflight)

    def invalidate(self, account_id: str, token: str) -> None:
        """The provider refused ``token`` (401): the next call refreshes."""
        cached = self._cache.get(account_id)
        if cached is not None and cached.token == token:
            del self._cache[account_id]

    def forget(self, account_id: str) -> None:
        """Drop the account's token (erasure, a new consent)."""
        self._cache.pop(account_id, None)

    async def _refresh(self, account: Account) -> str:
        client = self._clients.get(account.provider)
        if client is None:
            raise FailedPrecondition("this provider is not configured on this broker", reason="PROVIDER_NOT_CONFIGURED")
        secret = await self._blocking.run(self._store.read_secret, account.id, "refresh_token")
        if secret is None:
            raise needs_reauth()
        self.refreshes += 1
        try:
            grant: Grant = await self._providers.run(client.refresh, secret.decode("utf-8"))
        except Unauthenticated:
            await self._mark_needs_reauth(account)
            raise needs_reauth() from None
        if grant.refresh_token:
            # Rotated: the new token is stored before the new access token is used, so a crash now cannot leave
            # the broker holding only a refresh token the provider has already retired.
            await self._blocking.run(
                self._store.write_secret, account.id, "refresh_token", grant.refresh_token.encode("utf-8")
            )
        self._cache[account.id] = _Cached(grant.access_token, grant.expire_time)
        return grant.access_token

    async def _mark_needs_reauth(self, account: Account) -> None:
        self._cache.pop(account.id, None)
        changed = await self._blocking.run(self._store.update_account_state, account.id, AccountState.NEEDS_REAUTH)
        log.warning("the provider refused an account's grant", extra={"account": account.id, "component": "tokens"})
        if changed:
            await self._blocking.run(
                self._store.append_audit_event,
                "account_state_changed",
                account.tenant,
                "system",
                account.id,
                {"provider": account.provider.value, "state": AccountState.NEEDS_REAUTH.value},
            )
        await self._on_reauth_needed(account.id)


class AccountTokenSource:
    """What a driver of one OAuth account sees of :class:`AccessTokens`."""

    def __init__(self, tokens: AccessTokens, account: Account) -> None:
        self._tokens = tokens
        self._account = account

    async def access_token(self) -> str:
        return await self._tokens.get(self._account)

    def invalidate(self, token: str) -> None:
        self._tokens.invalidate(self._account.id, token)
