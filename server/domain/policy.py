"""The access policy, compiled: which identities may call which methods, which tenant each acts for, what each may
do at most, and who audits every tenant. Deny by default.

Identity patterns are an exact identity, ``prefix/*`` (every identity under the prefix) or ``*``. For tenants the
most specific pattern wins: exact, then the longest prefix, then ``*``; an identity no entry maps is a tenant of its
own. An unmapped identity whose name is also a mapped tenant's name is refused (it would otherwise see that tenant's
accounts). Caps intersect: an identity keeps the actions every matching cap allows.

A policy that does not hold together raises :class:`~server.errors.ConfigurationError` with one line that names
the entry by its position, never an identity (a CN may be an address). :class:`LivePolicy` holds the policy in force
so that a reload (SIGHUP) swaps it atomically; a call keeps the policy it started with.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from server.config import PolicyConfig
from server.domain.principal import ALL_ACTIONS, Action, Principal
from server.errors import ConfigurationError

# Health and reflection reveal nothing about any account; every authenticated (mTLS) caller may use them.
ALWAYS_ALLOWED_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
)

# The least a method needs from a capped identity. GetMessage (FULL view) and ListMessages (with a query) need READ
# on top; the domain checks that (server.domain.accounts.Accounts.require), since it depends on the request.
METHOD_ACTIONS: dict[str, Action] = {
    "mailbroker.v1.AccountService/BeginOAuth": Action.CONNECT,
    "mailbroker.v1.AccountService/CompleteOAuth": Action.CONNECT,
    "mailbroker.v1.AccountService/ConnectImapAccount": Action.CONNECT,
    "mailbroker.v1.AccountService/DeleteAccount": Action.DELETE,
    "mailbroker.v1.MailService/ListFolders": Action.METADATA,
    "mailbroker.v1.MailService/ListMessages": Action.METADATA,
    "mailbroker.v1.MailService/GetMessage": Action.METADATA,
    "mailbroker.v1.MailService/GetAttachment": Action.READ,
    "mailbroker.v1.MailService/SendMessage": Action.SEND,
    "mailbroker.v1.MailService/WatchMailbox": Action.METADATA,
}

MAX_TENANT_CHARS = 256


def _matches(pattern: str, value: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("/*"):
        return value.startswith(pattern[:-1])
    return pattern == value


def _check_patterns(patterns: Iterable[str], where: str, *, methods: bool = False) -> None:
    kind = "a method, pkg.Service/* or *" if methods else "an identity, a prefix/* pattern or *"
    for i, pattern in enumerate(patterns):
        body = pattern[:-2] if pattern.endswith("/*") else pattern
        if not pattern or not pattern.isprintable() or (pattern != "*" and (not body or "*" in body)):
            raise ConfigurationError(f"config: {where}[{i}] must be {kind}")


@dataclass(frozen=True)
class Policy:
    """An immutable, compiled policy; consulted on every RPC."""

    rules: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]
    auditors: tuple[str, ...] = ()
    exact_tenants: tuple[tuple[str, str], ...] = ()
    # (pattern, tenant), most specific first: longest prefix, ``*`` last.
    pattern_tenants: tuple[tuple[str, str], ...] = ()
    caps: tuple[tuple[tuple[str, ...], frozenset[Action]], ...] = ()

    @classmethod
    def from_config(cls, config: PolicyConfig) -> Policy:
        """Compile and check ``config``; ConfigurationError (one line, positions only) when it does not hold."""
        for i, rule in enumerate(config.rules):
            if not rule.identities or not rule.methods:
                raise ConfigurationError(f"config: policy.rules[{i}] needs identities and methods")
            _check_patterns(rule.identities, f"policy.rules[{i}].identities")
            _check_patterns((m.lstrip("/") for m in rule.methods), f"policy.rules[{i}].methods", methods=True)
        _check_patterns(config.auditors, "policy.auditors")

        exact: dict[str, str] = {}
        patterns: dict[str, str] = {}
        for i, entry in enumerate(config.tenants):
            where = f"policy.tenants[{i}]"
            tenant = entry.tenant
            if not tenant or len(tenant) > MAX_TENANT_CHARS or not tenant.isprintable() or tenant != tenant.strip():
                raise ConfigurationError(
                    f"config: {where}.tenant must be 1-{MAX_TENANT_CHARS} printable characters without outer spaces"
                )
            if not entry.identities:
                raise ConfigurationError(f"config: {where} needs identities")
            _check_patterns(entry.identities, f"{where}.identities")
            for j, pattern in enumerate(entry.identities):
                table = patterns if pattern == "*" or pattern.endswith("/*") else exact
                if table.setdefault(pattern, tenant) != tenant:
                    raise ConfigurationError(
                        f"config: {where}.identities[{j}] is already mapped to another tenant by an earlier entry"
                    )

        caps = []
        for i, cap in enumerate(config.caps):
            where = f"policy.caps[{i}]"
            if not cap.identities:
                raise ConfigurationError(f"config: {where} needs identities")
            _check_patterns(cap.identities, f"{where}.identities")
            for j, name in enumerate(cap.allow):
                if name not in Action.__members__:
                    raise ConfigurationError(f"config: {where}.allow[{j}] must be one of {', '.join(Action)}")
            caps.append((cap.identities, frozenset(Action(name) for name in cap.allow)))

        ordered = sorted(patterns.items(), key=lambda item: (item[0] == "*", -len(item[0])))
        return cls(
            rules=tuple((rule.identities, tuple(m.lstrip("/") for m in rule.methods)) for rule in config.rules),
            auditors=config.auditors,
            exact_tenants=tuple(exact.items()),
            pattern_tenants=tuple(ordered),
            caps=tuple(caps),
        )

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

    def tenant_of(self, identity: str) -> str | None:
        """The tenant ``identity`` acts for, or None when its own name is taken by a mapped tenant."""
        for known, tenant in self.exact_tenants:
            if known == identity:
                return tenant
        for pattern, tenant in self.pattern_tenants:
            if _matches(pattern, identity):
                return tenant
        if any(identity == tenant for _, tenant in (*self.exact_tenants, *self.pattern_tenants)):
            return None
        return identity

    def actions_of(self, identity: str) -> frozenset[Action]:
        actions = ALL_ACTIONS
        for identities, allowed in self.caps:
            if any(_matches(i, identity) for i in identities):
                actions &= allowed
        return actions

    def principal(self, identity: str) -> Principal | None:
        """The Principal for an authenticated ``identity``, or None when it has no tenant it may act for."""
        tenant = self.tenant_of(identity)
        if tenant is None:
            return None
        return Principal(
            identity=identity,
            tenant=tenant,
            actions=self.actions_of(identity),
            auditor=any(_matches(a, identity) for a in self.auditors),
        )


class LivePolicy:
    """The policy in force. ``replace`` swaps it in one assignment; readers take ``current`` once per call."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy

    @property
    def current(self) -> Policy:
        return self._policy

    def replace(self, policy: Policy) -> None:
        self._policy = policy
