"""Authentication: the caller's identity from its verified client certificate (URI SAN, else CN), and the
Principal the policy in force makes of it (tenant, capability caps, auditor)."""

from __future__ import annotations

from collections import OrderedDict
from contextvars import ContextVar
from typing import Any

import grpc

from server.domain.policy import LivePolicy, Policy
from server.errors import PermissionDenied, Unauthenticated
from server.interceptors.context import current_call, current_principal
from server.interceptors.errors import abort_with
from server.interceptors.wrapping import HandlerInterceptor
from server.pki import identity_from_certificate

_CACHE_SIZE = 1024

# The policy a call was authenticated under: authorization reads the same one, so a reload landing between the two
# cannot give a call one policy's tenant and another's method rules.
call_policy: ContextVar[Policy] = ContextVar("mailbroker_call_policy")


class AuthenticationInterceptor(HandlerInterceptor):
    """Puts a Principal in ``current_principal``, or ends the call with UNAUTHENTICATED.

    TLS has already verified the certificate against the client CA; this only reads who it names. Parsed
    identities are cached by certificate, since a consumer presents the same one on every call.
    """

    def __init__(self, policy: Policy | LivePolicy) -> None:
        super().__init__()
        self._policy = policy if isinstance(policy, LivePolicy) else LivePolicy(policy)
        self._identities: OrderedDict[bytes, str | None] = OrderedDict()

    def set_policy(self, policy: Policy) -> None:
        self._policy.replace(policy)

    def _identity(self, pem: bytes) -> str | None:
        if pem in self._identities:
            self._identities.move_to_end(pem)
            return self._identities[pem]
        identity = identity_from_certificate(pem)
        self._identities[pem] = identity
        if len(self._identities) > _CACHE_SIZE:
            self._identities.popitem(last=False)
        return identity

    async def enter(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        certs = list(context.auth_context().get("x509_pem_cert") or [])
        identity = self._identity(certs[0]) if certs else None
        if identity is None:
            await abort_with(context, Unauthenticated("a client certificate is required", reason="NO_CLIENT_IDENTITY"))
        policy = self._policy.current
        call_policy.set(policy)
        call = current_call.get(None)
        if call is not None:
            call.caller = identity
        principal = policy.principal(identity)
        if principal is None:
            await abort_with(
                context,
                PermissionDenied(
                    "the caller's identity is also the name of a tenant it is not mapped to",
                    reason="IDENTITY_TENANT_CONFLICT",
                ),
            )
        current_principal.set(principal)
