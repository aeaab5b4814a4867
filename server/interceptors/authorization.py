"""Authorization: the policy decides which identities may call which methods; deny by default."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from server.domain.policy import Policy
from server.errors import PermissionDenied
from server.interceptors.context import current_principal
from server.interceptors.errors import abort_with
from server.interceptors.wrapping import HandlerInterceptor


class AuthorizationInterceptor(HandlerInterceptor):
    """Ends the call with PERMISSION_DENIED unless the policy allows the caller this method."""

    def __init__(self, policy: Policy) -> None:
        super().__init__()
        self._policy = policy

    def set_policy(self, policy: Policy) -> None:
        self._policy = policy

    @asynccontextmanager
    async def around(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        identity = current_principal.get().identity
        if not self._policy.allows(identity, method):
            reason = "METHOD_NOT_ALLOWED" if self._policy.knows(identity) else "IDENTITY_NOT_ALLOWED"
            await abort_with(
                context,
                PermissionDenied("the caller may not call this method", reason=reason, metadata={"method": method}),
            )
        yield
