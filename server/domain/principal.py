"""Who is calling: the identity proven by the client certificate, and the tenant it acts for."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``tenant`` scopes every account it can see."""

    identity: str
    tenant: str
