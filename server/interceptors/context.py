"""Call-scoped state shared by the interceptors and the servicers, carried in ContextVars.

grpc.aio runs every RPC in its own task, so a value set here is private to that call and needs no reset.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from server.domain.principal import Principal


@dataclass
class CallInfo:
    """What the access log reports about a call; filled in as the call proceeds."""

    request_id: str
    method: str
    caller: str = ""
    account: str = ""


current_call: ContextVar[CallInfo] = ContextVar("mailbroker_call")
current_principal: ContextVar[Principal] = ContextVar("mailbroker_principal")


def note_account(account_id: str) -> None:
    """Record the (opaque) account id the call is about, for the access log."""
    call = current_call.get(None)
    if call is not None:
        call.account = account_id


def request_id() -> str:
    call = current_call.get(None)
    return call.request_id if call is not None else ""
