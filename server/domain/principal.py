"""Who is calling: the identity proven by the client certificate, the tenant it acts for, and what it may do."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from server.errors import PermissionDenied


class Action(StrEnum):
    """What a policy cap may allow: the three mail capabilities, connecting accounts, deleting them."""

    METADATA = "METADATA"
    READ = "READ"
    SEND = "SEND"
    CONNECT = "CONNECT"  # BeginOAuth, CompleteOAuth, ConnectImapAccount
    DELETE = "DELETE"  # DeleteAccount


ALL_ACTIONS = frozenset(Action)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``tenant`` scopes every account it can see; ``actions`` caps what it may do
    (every action unless the policy caps the identity); ``auditor`` may list every tenant's audit events."""

    identity: str
    tenant: str
    actions: frozenset[Action] = ALL_ACTIONS
    auditor: bool = False

    def require(self, action: Action) -> None:
        """PERMISSION_DENIED (POLICY_CAPABILITY_CAPPED) unless the policy lets this caller do ``action``.

        Checked before any account is looked up, so the answer is the same for any account, whoever's it is.
        """
        if action not in self.actions:
            raise PermissionDenied(
                "the policy does not allow this caller this capability",
                reason="POLICY_CAPABILITY_CAPPED",
                metadata={"capability": action.value},
            )
