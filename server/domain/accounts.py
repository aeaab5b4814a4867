"""Looking up a tenant's accounts: get, list, and the checks every mail call makes first."""

from __future__ import annotations

from server.crypto.opaque import OpaqueTokens
from server.domain import paging
from server.domain.blocking import BlockingPool
from server.domain.models import Account, AccountState, Capability
from server.domain.principal import Action, Principal
from server.errors import FailedPrecondition, NotFound, PermissionDenied
from server.store.repository import Store


class Accounts:
    """The accounts a principal may see: only its own tenant's; anything else does not exist for it."""

    def __init__(self, store: Store, blocking: BlockingPool, tokens: OpaqueTokens) -> None:
        self._store = store
        self._blocking = blocking
        self._pages = paging.PageTokens(tokens, "accounts")

    async def get(self, principal: Principal, account_id: str) -> Account:
        account = self._store.cached_account(principal.tenant, account_id) or await self._blocking.run(
            self._store.get_account, principal.tenant, account_id
        )
        if account is None:
            # The same answer whether the account is missing or another tenant's: existence never leaks.
            raise NotFound("account not found", reason="ACCOUNT_NOT_FOUND")
        return account

    async def require(self, principal: Principal, account_id: str, capability: Capability) -> Account:
        """The account, usable and granted ``capability``; otherwise the error that says why not."""
        # The policy's cap first, before any lookup: a capped caller gets the same answer for every account id.
        principal.require(Action(capability.name))
        account = await self.get(principal, account_id)
        if account.state is AccountState.NEEDS_REAUTH:
            raise FailedPrecondition("the account needs the user to consent again", reason="ACCOUNT_NEEDS_REAUTH")
        if capability not in account.capabilities:
            raise PermissionDenied(
                "the account was not granted the capability this call needs",
                reason="CAPABILITY_NOT_GRANTED",
                metadata={"capability": capability.name},
            )
        return account

    async def list(self, principal: Principal, page_size: int, page_token: str) -> tuple[list[Account], str]:
        size = paging.page_size(page_size, paging.ACCOUNTS)
        binding = [principal.tenant]
        position = self._pages.position(binding, page_token)
        after = str(position["after"]) if position else None
        # One extra row tells whether another page exists without a second query.
        rows = await self._blocking.run(self._store.list_accounts, principal.tenant, size + 1, after)
        page = rows[:size]
        next_token = self._pages.issue(binding, {"after": page[-1].id}) if len(rows) > size else ""
        return page, next_token
