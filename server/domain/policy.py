"""Which caller identities may call which methods, and which tenant an identity acts for. Deny by default."""

from __future__ import annotations

from dataclasses import dataclass

from server.config import PolicyConfig

# Health and reflection reveal nothing about any account; every authenticated (mTLS) caller may use them.
ALWAYS_ALLOWED_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
)


def _matches(pattern: str, value: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("/*"):
        return value.startswith(pattern[:-1])
    return pattern == value


@dataclass(frozen=True)
class Policy:
    """An immutable, compiled policy; ``allows`` is called on every RPC."""

    rules: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]

    @classmethod
    def from_config(cls, config: PolicyConfig) -> Policy:
        return cls(rules=tuple((rule.identities, tuple(m.lstrip("/") for m in rule.methods)) for rule in config.rules))

    def allows(self, identity: str, method: str) -> bool:
        """Whether ``identity`` may call ``method`` (``/pkg.Service/Method`` or ``pkg.Service/Method``)."""
        method = method.lstrip("/")
        if method.partition("/")[0] in ALWAYS_ALLOWED_SERVICES:
            return True
        return any(
            any(_matches(i, identity) for i in identities) and any(_matches(m, method) for m in methods)
            for identities, methods in self.rules
        )

    def knows(self, identity: str) -> bool:
        return any(_matches(i, identity) for identities, _ in self.rules for i in identities)

    def tenant_of(self, identity: str) -> str:
        """The tenant an identity acts for: for now the identity itself."""
        return identity
