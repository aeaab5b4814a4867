"""Authorization: the policy decides which identities may call which methods, and caps what each may do; deny by
default."""

from __future__ import annotations

from typing import Any

import grpc

from server.domain.policy import METHOD_ACTIONS, LivePolicy, Policy
from server.errors import BrokerError, PermissionDenied
from server.interceptors.authentication import call_policy
from server.interceptors.context import current_principal
from server.interceptors.errors import abort_with
from server.interceptors.wrapping import HandlerInterceptor


class AuthorizationInterceptor(HandlerInterceptor):
    """Ends the call with PERMISSION_DENIED unless the policy allows the caller this method and, for a capped
    identity, the least capability the method needs (POLICY_CAPABILITY_CAPPED)."""

    def __init__(self, policy: Policy | LivePolicy) -> None:
        super().__init__()
        self._policy = policy if isinstance(policy, LivePolicy) else LivePolicy(policy)

    def set_policy(self, policy: Policy) -> None:
        self._policy.replace(policy)

    async def enter(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        policy = call_policy.get(None) or self._policy.current
        principal = current_principal.get()
        identity = principal.identity
        if not policy.allows(identity, method):
            reason = "METHOD_NOT_ALLOWED" if policy.knows(identity) else "IDENTITY_NOT_ALLOWED"
            await abort_with(
                context,
                PermissionDenied("the caller may not call this method", reason=reason, metadata={"method": method}),
            )
        action = METHOD_ACTIONS.get(method.lstrip("/"))
        if action is not None:
            try:
                principal.require(action)
            except BrokerError as error:
                await abort_with(context, error)
