"""Reading the tamper-evident audit log: a tenant sees its own events; auditors may see every tenant's."""

from __future__ import annotations

from server.crypto.opaque import OpaqueTokens
from server.domain import paging
from server.domain.blocking import BlockingPool
from server.domain.models import AuditEvent
from server.domain.principal import Principal
from server.errors import PermissionDenied
from server.store.repository import Store


class AuditLog:
    """Lists audit events, oldest first, scoped to the caller's tenant unless the caller is an auditor."""

    def __init__(self, store: Store, blocking: BlockingPool, tokens: OpaqueTokens) -> None:
        self._store = store
        self._blocking = blocking
        self._pages = paging.PageTokens(tokens, "audit-events")

    async def list(
        self, principal: Principal, account_id: str | None, page_size: int, page_token: str, all_tenants: bool
    ) -> tuple[list[AuditEvent], str]:
        # Whether the caller audits every tenant is the policy in force (reloadable), carried by the Principal.
        if all_tenants and not principal.auditor:
            raise PermissionDenied("only auditors may list every tenant's events", reason="AUDITOR_ONLY")
        size = paging.page_size(page_size, paging.AUDIT_EVENTS)
        tenant = None if all_tenants else principal.tenant
        binding = [principal.tenant, account_id or "", "all" if all_tenants else "own"]
        position = self._pages.position(binding, page_token)
        after = int(position["after"]) if position else 0
        rows = await self._blocking.run(self._store.list_audit_events, tenant, account_id, size + 1, after)
        page = rows[:size]
        next_token = self._pages.issue(binding, {"after": page[-1].sequence}) if len(rows) > size else ""
        return page, next_token
