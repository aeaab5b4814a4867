"""BeginOAuth / CompleteOAuth for every OAuth provider: single-use states bound to the caller, the narrowest scopes,
capabilities from the scopes actually granted, the refresh token stored sealed, a consent record for every grant.

Provider specifics (URLs, PKCE, the code exchange, what identifies the mailbox) live behind :class:`OAuthClient`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from server.domain.accounts import Accounts
from server.domain.blocking import BlockingPool
from server.domain.models import Account, AccountProfile, AccountState, Capability, Provider
from server.domain.principal import Principal
from server.errors import BrokerError, FailedPrecondition, FieldViolation, InvalidArgument
from server.store.ids import new_account_id
from server.store.repository import Store

log = logging.getLogger("mailbroker.oauth")

MAX_STATE_CHARS = 128
MAX_CODE_CHARS = 4096
MAX_LOGIN_HINT_CHARS = 320


@dataclass(frozen=True)
class Grant:
    """What a token endpoint gave: the access token (memory only), maybe a refresh token, the scopes granted,
    and (for a code exchange) who the mailbox is."""

    access_token: str
    expire_time: datetime
    refresh_token: str | None = None
    scopes: frozenset[str] = frozenset()
    subject: str = ""
    email_address: str = ""


class OAuthClient(Protocol):
    """One provider's OAuth client (blocking methods run in the provider thread pool)."""

    provider: Provider
    redirect_uris: tuple[str, ...]

    def scopes_for(self, capabilities: Iterable[Capability]) -> list[str]: ...

    def capabilities_for(self, scopes: Iterable[str]) -> frozenset[Capability]: ...

    def begin(self, scopes: list[str], redirect_uri: str, state: str, login_hint: str) -> tuple[str, dict[str, Any]]:
        """The authorization URL and the private flow data the exchange will need (sealed in the store)."""
        ...

    def exchange(self, flow: Mapping[str, Any], code: str) -> Grant: ...

    def refresh(self, refresh_token: str) -> Grant:
        """Raises Unauthenticated PROVIDER_AUTH_FAILED when the provider refuses the grant for good."""
        ...

    def revoke(self, token: str) -> None: ...

    def close(self) -> None:
        """Close kept-alive connections (at shutdown)."""
        ...


@dataclass(frozen=True)
class BeginResult:
    authorization_uri: str
    state: str
    expire_time: datetime
    scopes: list[str]


def _state_id(state: str) -> str:
    return hashlib.sha256(state.encode("utf-8")).hexdigest()


def _invalid_state() -> InvalidArgument:
    # One answer for unknown, used, expired and other callers' states: nothing about a state leaks.
    return InvalidArgument(
        "state is not a pending authorization of this caller (unknown, used or expired)",
        reason="INVALID_OAUTH_STATE",
        field_violations=[FieldViolation("state", "not a pending authorization of this caller")],
    )


class OAuthFlows:
    def __init__(
        self,
        store: Store,
        blocking: BlockingPool,
        providers: BlockingPool,
        accounts: Accounts,
        clients: Mapping[Provider, OAuthClient],
        *,
        state_ttl_seconds: float,
        on_grant: Callable[[str], Awaitable[None]],
    ) -> None:
        self._store = store
        self._blocking = blocking
        self._providers = providers
        self._accounts = accounts
        self._clients = dict(clients)
        self._ttl = timedelta(seconds=state_ttl_seconds)
        self._on_grant = on_grant  # drops what was cached for the account's old grant

    def _client(self, provider: Provider) -> OAuthClient:
        if provider is Provider.IMAP:
            raise InvalidArgument(
                "IMAP accounts connect with ConnectImapAccount",
                reason="INVALID_PROVIDER",
                field_violations=[FieldViolation("provider", "must be GOOGLE or MICROSOFT")],
            )
        client = self._clients.get(provider)
        if client is None:
            raise FailedPrecondition(
                "this provider is not configured on this broker",
                reason="PROVIDER_NOT_CONFIGURED",
                metadata={"provider": provider.name},
            )
        return client

    async def begin(
        self,
        principal: Principal,
        provider: Provider,
        capabilities: frozenset[Capability],
        redirect_uri: str,
        account_id: str | None,
        login_hint: str,
    ) -> BeginResult:
        client = self._client(provider)
        violations = []
        if not capabilities:
            violations.append(FieldViolation("capabilities", "at least one capability is required"))
        if redirect_uri not in client.redirect_uris:
            violations.append(FieldViolation("redirect_uri", "must be one of the redirect URIs the broker registered"))
        if len(login_hint) > MAX_LOGIN_HINT_CHARS or not login_hint.isprintable():
            violations.append(FieldViolation("login_hint", f"at most {MAX_LOGIN_HINT_CHARS} printable characters"))
        if violations:
            reason = "REDIRECT_URI_NOT_REGISTERED" if violations[0].field == "redirect_uri" else "INVALID_ARGUMENT"
            raise InvalidArgument("the authorization request is not valid", reason=reason, field_violations=violations)
        wanted = set(capabilities)
        if account_id is not None:
            account = await self._accounts.get(principal, account_id)
            if account.provider is not provider:
                raise FailedPrecondition("the account is not with this provider", reason="ACCOUNT_PROVIDER_MISMATCH")
            wanted |= account.capabilities  # incremental: keep what the account has, add what is asked
        scopes = client.scopes_for(wanted)
        state = secrets.token_urlsafe(32)
        url, flow = client.begin(scopes, redirect_uri, state, login_hint)
        expire_time = datetime.now(UTC) + self._ttl
        payload = json.dumps({"flow": flow, "scopes": scopes}).encode("utf-8")
        await self._blocking.run(
            lambda: self._store.put_oauth_state(
                _state_id(state),
                tenant=principal.tenant,
                caller=principal.identity,
                provider=provider,
                account_id=account_id,
                payload=payload,
                expire_time=expire_time,
            )
        )
        return BeginResult(url, state, expire_time, scopes)

    async def complete(self, principal: Principal, state: str, code: str) -> Account:
        if not state or len(state) > MAX_STATE_CHARS:
            raise _invalid_state()
        if not code or len(code) > MAX_CODE_CHARS or not code.isprintable():
            raise InvalidArgument(
                "code must be the authorization code from the redirect",
                reason="INVALID_ARGUMENT",
                field_violations=[FieldViolation("code", f"1-{MAX_CODE_CHARS} printable characters")],
            )
        pending = await self._blocking.run(
            self._store.take_oauth_state, _state_id(state), principal.tenant, principal.identity
        )
        if pending is None or pending["expire_time"] <= datetime.now(UTC):
            raise _invalid_state()
        provider: Provider = pending["provider"]
        client = self._client(provider)
        saved = json.loads(pending["payload"])
        grant = await self._providers.run(client.exchange, saved["flow"], code)
        capabilities = client.capabilities_for(grant.scopes)
        if not capabilities:
            await self._revoke_quietly(client, grant)
            raise FailedPrecondition(
                "the user granted none of the scopes the broker needs", reason="NO_USABLE_SCOPES_GRANTED"
            )
        if not grant.refresh_token:
            await self._revoke_quietly(client, grant)
            raise FailedPrecondition(
                "the provider returned no refresh token; start the authorization again", reason="NO_REFRESH_TOKEN"
            )
        now = datetime.now(UTC)
        account_id: str | None = pending["account_id"]
        if account_id is None:
            account = Account(
                id=new_account_id(),
                tenant=principal.tenant,
                provider=provider,
                state=AccountState.ACTIVE,
                capabilities=capabilities,
                profile=AccountProfile(email_address=grant.email_address, subject=grant.subject),
                create_time=now,
                update_time=now,
            )
            await self._blocking.run(
                self._store.create_account, account, {"refresh_token": grant.refresh_token.encode("utf-8")}
            )
            await self._audit(principal, account.id, "account_connected", provider, capabilities, None)
        else:
            existing = await self._accounts.get(principal, account_id)
            if existing.profile.subject != grant.subject:
                raise FailedPrecondition(
                    "a different mailbox consented than the account's; nothing was changed",
                    reason="OAUTH_ACCOUNT_MISMATCH",
                )
            refreshed = await self._blocking.run(
                self._store.replace_grant, account_id, grant.refresh_token.encode("utf-8"), capabilities
            )
            if not refreshed:
                raise (await self._gone(principal, account_id))
            await self._on_grant(account_id)
            account = await self._accounts.get(principal, account_id)
        await self._blocking.run(
            self._store.record_consent, account.id, principal.tenant, provider, grant.scopes, capabilities, now
        )
        await self._audit(principal, account.id, "consent_granted", provider, capabilities, sorted(grant.scopes))
        return account

    async def _gone(self, principal: Principal, account_id: str) -> BrokerError:
        try:
            await self._accounts.get(principal, account_id)
        except BrokerError as exc:
            return exc
        return FailedPrecondition("the account changed during the authorization", reason="ACCOUNT_CHANGED")

    async def _audit(
        self,
        principal: Principal,
        account_id: str,
        action: str,
        provider: Provider,
        capabilities: frozenset[Capability],
        scopes: list[str] | None,
    ) -> None:
        details: dict[str, object] = {
            "provider": provider.value,
            "capabilities": sorted(c.value for c in capabilities),
        }
        if scopes is not None:
            details["scopes"] = scopes
        await self._blocking.run(
            self._store.append_audit_event, action, principal.tenant, principal.identity, account_id, details
        )

    async def _revoke_quietly(self, client: OAuthClient, grant: Grant) -> None:
        """Give back a grant the broker will not use (best effort: the user can also remove the app)."""
        try:
            await self._providers.run(client.revoke, grant.refresh_token or grant.access_token)
        except BrokerError as exc:
            log.info("revoking an unused grant failed", extra={"reason": exc.reason, "component": "oauth"})


REVOKE_ATTEMPTS = 3


def provider_revoker(
    store: Store, blocking: BlockingPool, providers: BlockingPool, client: OAuthClient, tokens: Any
) -> Callable[[Account], Awaitable[Any]]:
    """The erasure step that revokes an OAuth account's grant at the provider, with bounded retries.

    ``tokens`` (AccessTokens) drops the account's access token from memory whatever happens.
    """
    from server.domain.erasure import RevokeResult

    async def revoke(account: Account) -> RevokeResult:
        tokens.forget(account.id)
        secret = await blocking.run(store.read_secret, account.id, "refresh_token")
        if secret is None:
            return RevokeResult("NOT_APPLICABLE", "NO_GRANT_HELD", "the broker held no grant for this account")
        reason = ""
        for attempt in range(REVOKE_ATTEMPTS):
            try:
                await providers.run(client.revoke, secret.decode("utf-8"))
                return RevokeResult("DONE")
            except BrokerError as exc:
                reason = exc.reason
                if attempt + 1 < REVOKE_ATTEMPTS:
                    await asyncio.sleep(0.2 * 2**attempt)
        return RevokeResult(
            "FAILED", reason or "REVOCATION_FAILED", "the user can remove the app in their provider account settings"
        )

    return revoke
