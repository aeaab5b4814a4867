"""Access tokens of OAuth accounts: in memory only, refreshed single-flight, the rotated refresh token persisted
before it is relied on, and a refused grant turned into NEEDS_REAUTH.

Nothing here writes an access token anywhere: the cache is a dict in this process, dropped on erasure, on a new
consent and when the provider refuses the token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from server.domain.blocking import BlockingPool
from server.domain.models import Account, AccountState, Provider
from server.domain.oauth import Grant, OAuthClient
from server.errors import FailedPrecondition, Unauthenticated
from server.store.repository import Store

log = logging.getLogger("mailbroker.tokens")


# A replica that waited for another's refresh of the same account waits this long for the token to arrive
# (it comes by NOTIFY as the other's transaction commits) before refreshing itself.
FLEET_WAIT_SECONDS = 3.0
# A refresh by another replica this recent may still be on its way; an older one was missed (say, this replica
# started after it) and waiting would gain nothing.
FLEET_RECENT_SECONDS = 10.0
# How long a refresh waits for another replica's lease on the same account before giving up (TOKEN_REFRESH_BUSY).
LEASE_WAIT_SECONDS = 30.0


@dataclass
class _Cached:
    token: str
    expire_time: datetime
    generation: int = 0


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
        # The newest refresh generation of each account this process has held a token of (kept when the token is
        # dropped): a newer generation in the store means another replica refreshed since.
        self._seen: dict[str, int] = {}
        self.refreshes = 0  # token-endpoint requests made (for tests and metrics)
        # (provider, outcome) -> refreshes: "ok", "refused" (the grant is gone: NEEDS_REAUTH), "failed" (anything
        # else). Changed by provider threads under the lock; the metrics endpoint reads a copy when scraped.
        self.refresh_outcomes: dict[tuple[str, str], int] = {}
        self._counting = threading.Lock()

    async def get(self, account: Account) -> str:
        """A live access token for ``account``; at most one refresh per account is in flight at any time."""
        cached = self._cache.get(account.id)
        if cached is not None and self._fresh(cached):
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

    def forget_all(self) -> None:
        """Drop every token (this replica may have missed a notice of a new consent). Safe from any thread."""
        self._cache.clear()

    def forget(self, account_id: str) -> None:
        """Drop the account's token (erasure, a new consent)."""
        self._cache.pop(account_id, None)
        self._seen.pop(account_id, None)

    def wants(self, account_id: str) -> bool:
        """Whether a token another replica refreshed is of use here: for an account this replica has used or is
        refreshing (it does not collect the tokens of every account in the fleet). Safe from any thread."""
        return account_id in self._seen or account_id in self._inflight

    def accept(self, account_id: str, generation: int, token: str, expire_time: datetime) -> None:
        """Take a token another replica refreshed (newer generations only, and only if :meth:`wants`)."""
        if not self.wants(account_id):
            return
        if self._seen.get(account_id, 0) < generation:
            self._seen[account_id] = generation
            self._cache[account_id] = _Cached(token, expire_time, generation)

    async def _refresh(self, account: Account) -> str:
        client = self._clients.get(account.provider)
        if client is None:
            raise FailedPrecondition("this provider is not configured on this broker", reason="PROVIDER_NOT_CONFIGURED")
        force = False
        while True:
            try:
                outcome = await self._providers.run(self._refresh_under_lease, client, account, force)
            except Unauthenticated:
                await self._mark_needs_reauth(account)
                raise needs_reauth() from None
            if isinstance(outcome, _Cached):
                if outcome.generation >= 0:
                    self._cache[account.id] = outcome
                    self._seen[account.id] = max(self._seen.get(account.id, 0), outcome.generation)
                return outcome.token
            # Another replica refreshed while this one waited for the lease: its token is on the way.
            arrived = await self._await_generation(account.id, outcome)
            if arrived is not None:
                return arrived
            force = True

    def _refresh_under_lease(self, client: OAuthClient, account: Account, force: bool) -> _Cached | int:
        """In a provider thread: refresh holding the account's lease, unless another replica has just done it.
        Returns the new token, or the generation to wait for."""
        # A fixed bound, not the caller's deadline: this refresh is shared by every caller waiting on it.
        with self._store.refresh_lease(account.id, LEASE_WAIT_SECONDS) as lease:
            if lease.refresh_token is None:
                raise needs_reauth()
            cached = self._cache.get(account.id)
            if cached is not None and cached.generation >= lease.generation and self._fresh(cached):
                return cached  # it arrived while this replica waited for the lease
            newer = lease.generation > self._seen.get(account.id, 0)
            if lease.shared and not force and newer and self._recent(lease.refreshed_ago):
                return lease.generation
            outcome = "failed"
            try:
                grant: Grant = client.refresh(lease.refresh_token.decode("utf-8"))
                outcome = "ok"
            except Unauthenticated:
                outcome = "refused"
                raise
            finally:
                self._count(account.provider.value, outcome)
            # A rotated refresh token is stored (committed with the lease) before the new access token is used: a
            # crash now cannot leave the broker holding only a refresh token the provider has already retired.
            rotated = grant.refresh_token.encode("utf-8") if grant.refresh_token else None
            generation = lease.save(rotated, grant.access_token, grant.expire_time)
            if generation is None:  # a new consent landed meanwhile: use this token once, keep the new grant's
                return _Cached(grant.access_token, grant.expire_time, -1)
            return _Cached(grant.access_token, grant.expire_time, generation)

    def _count(self, provider: str, outcome: str) -> None:
        with self._counting:  # provider threads count concurrently
            self.refreshes += 1
            key = (provider, outcome)
            self.refresh_outcomes[key] = self.refresh_outcomes.get(key, 0) + 1

    async def _await_generation(self, account_id: str, generation: int) -> str | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FLEET_WAIT_SECONDS
        while loop.time() < deadline:
            cached = self._cache.get(account_id)
            if cached is not None and cached.generation >= generation and self._fresh(cached):
                return cached.token
            await asyncio.sleep(0.01)
        return None

    def _fresh(self, cached: _Cached) -> bool:
        return cached.expire_time - self._margin > datetime.now(UTC)

    @staticmethod
    def _recent(refreshed_ago: timedelta | None) -> bool:
        return refreshed_ago is not None and refreshed_ago < timedelta(seconds=FLEET_RECENT_SECONDS)

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
