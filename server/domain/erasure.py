"""DeleteAccount as an erasure: revoke, stop feeds, purge every row, scrub the disk, audit, and hand back a receipt.

Each step records its own outcome; a failed step is reported, never hidden, and never stops the local purge.

Erasing an account that no longer exists is NOT_FOUND, exactly like any unknown account: the receipt is handed back
once, and the audit log keeps the PII-free record of it (``ListAuditEvents`` with the account's name). Returning
the same receipt again would need the receipt kept after the account is gone, keyed by its id; NOT_FOUND keeps
nothing and cannot tell a tenant whether another tenant's id ever existed.

The receipt tells the truth about its own audit step: RECORD_AUDIT is DONE only once the audit event is committed
(the event itself lists it as DONE, which its existence proves); if every attempt to write it fails, the receipt
says FAILED with the reason AUDIT_WRITE_FAILED and carries no audit event name.

Revocation at the provider is pluggable per provider (``revokers``): a revoker gets the account before anything is
purged (so it can still read the refresh token), must bound its own retries, and returns a :class:`RevokeResult`.
A revoker that raises is reported as FAILED, REVOCATION_ERROR; the purge goes on.

:class:`AutoEraser` is the background task of a running broker that erases accounts that stayed NEEDS_REAUTH
for ``[erasure] needs_reauth_erase_after_days``, through this same path, as the actor ``system``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from server.domain.accounts import Accounts
from server.domain.blocking import BlockingPool
from server.domain.drivers import Drivers
from server.domain.feeds import FeedHub
from server.domain.models import Account, Provider
from server.domain.periodic import Periodic
from server.domain.principal import Principal
from server.errors import BrokerError, NotFound
from server.store.repository import Store

log = logging.getLogger("mailbroker.erasure")

SYSTEM_ACTOR = "system"
AUDIT_ATTEMPTS = 3


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ErasureReceipt:
    account_id: str
    steps: list[dict[str, Any]]
    start_time: datetime
    complete_time: datetime
    audit_event_id: str  # "" when the audit event could not be written (RECORD_AUDIT is then FAILED)


@dataclass(frozen=True)
class RevokeResult:
    """How revocation at the provider ended: outcome DONE, NOT_APPLICABLE, NOT_SUPPORTED_BY_PROVIDER or FAILED."""

    outcome: str
    reason: str = ""
    detail: str = ""


Revoker = Callable[[Account], Awaitable[RevokeResult]]


async def _imap_revoke(_account: Account) -> RevokeResult:
    return RevokeResult(
        "NOT_APPLICABLE",
        "PASSWORD_CREDENTIAL",
        "an IMAP password cannot be revoked by the broker; the user can change it at the mail provider",
    )


def _step(kind: str, outcome: str, reason: str = "", detail: str = "") -> dict[str, Any]:
    return {"kind": kind, "outcome": outcome, "reason": reason, "detail": detail, "complete_time": _now().isoformat()}


class Erasure:
    """Runs the erasure steps in order for one account of the caller's tenant."""

    def __init__(
        self,
        store: Store,
        accounts: Accounts,
        blocking: BlockingPool,
        drivers: Drivers,
        feeds: FeedHub,
        scrub: Callable[[], bool],
        revokers: Mapping[Provider, Revoker] | None = None,
        scrub_detail: str = "",
    ) -> None:
        self._drivers = drivers
        self._feeds = feeds
        self._store = store
        self._accounts = accounts
        self._blocking = blocking
        self._scrub = scrub
        self._scrub_detail = scrub_detail  # what a DONE scrub means on this store
        self._revokers: dict[Provider, Revoker] = {Provider.IMAP: _imap_revoke, **(revokers or {})}

    async def erase(self, principal: Principal, account_id: str) -> ErasureReceipt:
        """Erase an account of the principal's tenant (NOT_FOUND if it has none by that id)."""
        account = await self._accounts.get(principal, account_id)
        return await self.erase_account(account, principal.identity)

    async def erase_account(self, account: Account, actor: str) -> ErasureReceipt:
        """Erase ``account`` (already looked up within its tenant) on behalf of ``actor``."""
        account_id = account.id
        started = _now()
        steps = [await self._revoke(account)]
        stopped = await self._feeds.close_account(
            account_id, NotFound("the account was erased", reason="ACCOUNT_ERASED")
        )
        await self._drivers.evict(account_id)
        steps.append(_step("STOP_WATCHES", "DONE", detail=f"{stopped} feed watcher(s) stopped, connections closed"))

        existed = await self._blocking.run(self._store.delete_account, account_id)
        steps.append(_step("PURGE_ROWS", "DONE" if existed else "FAILED", "" if existed else "ACCOUNT_VANISHED"))

        clean = await self._blocking.run(self._scrub)
        steps.append(
            _step("SCRUB_STORAGE", "DONE", detail=self._scrub_detail)
            if clean
            else _step("SCRUB_STORAGE", "FAILED", "CHECKPOINT_BUSY", "a reader kept the write-ahead log open")
        )

        # The event lists RECORD_AUDIT as DONE: if it exists at all, it was recorded. The receipt says DONE only
        # once the write has returned.
        recorded = _step("RECORD_AUDIT", "DONE")
        event_id = await self._record(account, actor, [*steps, recorded])
        steps.append(
            recorded if event_id else _step("RECORD_AUDIT", "FAILED", "AUDIT_WRITE_FAILED", "the audit log refused")
        )
        return ErasureReceipt(account_id, steps, started, _now(), event_id)

    async def _record(self, account: Account, actor: str, steps: list[dict[str, Any]]) -> str:
        details = {"provider": account.provider.value, "erasure_steps": steps}
        for attempt in range(1, AUDIT_ATTEMPTS + 1):
            try:
                event = await self._blocking.run(
                    self._store.append_audit_event, "account_erased", account.tenant, actor, account.id, details
                )
            except Exception:  # the erasure is done; the receipt must still come back, saying so
                log.warning(
                    "audit write failed",
                    extra={"event": "erasure_audit_failed", "account": account.id, "attempt": attempt},
                )
                continue
            return event.event_id
        return ""

    async def _revoke(self, account: Account) -> dict[str, Any]:
        revoker = self._revokers.get(account.provider)
        if revoker is None:
            return _step(
                "REVOKE_AT_PROVIDER", "FAILED", "REVOCATION_NOT_IMPLEMENTED", "no revocation for this provider yet"
            )
        try:
            result = await revoker(account)
        except Exception as exc:  # a failed revocation is reported and never blocks the purge
            reason = exc.reason if isinstance(exc, BrokerError) else "REVOCATION_ERROR"
            return _step("REVOKE_AT_PROVIDER", "FAILED", reason, "the provider could not be asked to revoke")
        return _step("REVOKE_AT_PROVIDER", result.outcome, result.reason, result.detail)


class AutoEraser(Periodic):
    """Erases accounts that have needed re-authorisation for ``after`` or longer, every ``interval`` seconds (the
    first sweep at start-up)."""

    name = "auto-erase"

    def __init__(
        self,
        store: Store,
        erasure: Erasure,
        blocking: BlockingPool,
        *,
        after: timedelta,
        interval: float,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        super().__init__(interval)
        self._store = store
        self._erasure = erasure
        self._blocking = blocking
        self._after = after
        self._clock = clock

    async def sweep(self) -> int:
        """Erase every account NEEDS_REAUTH since before now - ``after``; return how many were erased."""
        cutoff = self._clock() - self._after
        due = await self._blocking.run(self._store.accounts_needing_reauth_since, cutoff)
        erased = 0
        for tenant, account_id in due:
            account = await self._blocking.run(self._store.get_account, tenant, account_id)
            if account is None:  # erased meanwhile by its tenant
                continue
            receipt = await self._erasure.erase_account(account, SYSTEM_ACTOR)
            erased += 1
            log.info(
                "account erased after needing re-authorisation too long",
                extra={"event": "auto_erased", "account": receipt.account_id},
            )
        return erased
