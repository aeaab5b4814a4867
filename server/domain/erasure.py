"""DeleteAccount as an erasure: revoke, stop feeds, purge every row, scrub the disk, audit, and hand back a receipt.

Each step records its own outcome; a failed step is reported, never hidden, and never stops the local purge.
Erasing an account that no longer exists is NOT_FOUND (the receipt is handed back once; the audit log keeps the
record of it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from server.domain.accounts import Accounts
from server.domain.blocking import BlockingPool
from server.domain.drivers import Drivers
from server.domain.feeds import FeedHub
from server.domain.models import Provider
from server.domain.principal import Principal
from server.errors import NotFound
from server.store.repository import Store


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ErasureReceipt:
    account_id: str
    steps: list[dict[str, Any]]
    start_time: datetime
    complete_time: datetime
    audit_event_id: str


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
    ) -> None:
        self._drivers = drivers
        self._feeds = feeds
        self._store = store
        self._accounts = accounts
        self._blocking = blocking
        self._scrub = scrub

    async def erase(self, principal: Principal, account_id: str) -> ErasureReceipt:
        account = await self._accounts.get(principal, account_id)
        started = _now()
        steps = [self._revoke(account.provider)]
        stopped = await self._feeds.close_account(
            account_id, NotFound("the account was erased", reason="ACCOUNT_ERASED")
        )
        await self._drivers.evict(account_id)
        steps.append(_step("STOP_WATCHES", "DONE", detail=f"{stopped} feed watcher(s) stopped, connections closed"))

        existed = await self._blocking.run(self._store.delete_account, account_id)
        steps.append(_step("PURGE_ROWS", "DONE" if existed else "FAILED", "" if existed else "ACCOUNT_VANISHED"))

        clean = await self._blocking.run(self._scrub)
        steps.append(
            _step("SCRUB_STORAGE", "DONE")
            if clean
            else _step("SCRUB_STORAGE", "FAILED", "CHECKPOINT_BUSY", "a reader kept the write-ahead log open")
        )

        steps.append(_step("RECORD_AUDIT", "DONE"))
        event = await self._blocking.run(
            self._store.append_audit_event,
            "account_erased",
            account.tenant,
            principal.identity,
            account_id,
            {"provider": account.provider.value, "erasure_steps": steps},
        )
        return ErasureReceipt(account_id, steps, started, _now(), event.event_id)

    @staticmethod
    def _revoke(provider: Provider) -> dict[str, Any]:
        if provider is Provider.IMAP:
            return _step(
                "REVOKE_AT_PROVIDER",
                "NOT_APPLICABLE",
                "PASSWORD_CREDENTIAL",
                "an IMAP password cannot be revoked by the broker; the user can change it at the mail provider",
            )
        return _step(
            "REVOKE_AT_PROVIDER", "FAILED", "REVOCATION_NOT_IMPLEMENTED", "no revocation for this provider yet"
        )
