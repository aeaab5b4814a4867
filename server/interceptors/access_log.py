"""Access log: one line per call with request id, method, caller, account id, status and duration — nothing else."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from typing import TYPE_CHECKING, Any

import grpc

from server.interceptors.context import CallInfo, current_call
from server.interceptors.wrapping import HandlerInterceptor

if TYPE_CHECKING:
    from server.metrics import Metrics

log = logging.getLogger("mailbroker.access")

# A caller-supplied request id is echoed only when it is a short token; anything else could carry data.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


def _incoming_request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return None


class AccessLogInterceptor(HandlerInterceptor):
    """Outermost interceptor: sets up the call's CallInfo and logs it when the call ends; with ``metrics``, also counts
    the call and its duration there (one measurement for both, no second wrapper per call)."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        super().__init__()
        self._metrics = metrics

    def unhandled(self) -> None:
        if self._metrics is not None:
            self._metrics.observe_unimplemented()

    async def enter(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[CallInfo, float]:
        call = CallInfo(request_id=_incoming_request_id(context) or secrets.token_hex(8), method=method)
        current_call.set(call)
        context.set_trailing_metadata((("x-request-id", call.request_id),))
        return call, time.perf_counter()

    async def leave(
        self,
        method: str,
        context: grpc.aio.ServicerContext[Any, Any],
        entered: tuple[CallInfo, float],
        error: BaseException | None,
    ) -> None:
        call, started = entered
        elapsed = time.perf_counter() - started
        if error is None:
            code = context.code()
            status = "OK" if code is None else _status_name(code)
        elif isinstance(error, grpc.aio.AbortError):
            status = _status_name(context.code())
        elif isinstance(error, asyncio.CancelledError):
            status = "CANCELLED"
        else:
            status = "UNKNOWN"
        # Written before the call is over: a caller that has its answer can count on the line being there
        # (deferring it to the loop's next turn raced a status already sent by context.abort).
        log.info(
            "rpc",
            extra={
                "request_id": call.request_id,
                "method": method,
                "caller": call.caller,
                "account": call.account,
                "status": status,
                "duration_ms": round(elapsed * 1000, 3),
            },
        )
        if self._metrics is not None:
            self._metrics.observe_rpc(method, status, elapsed)


def _status_name(code: Any) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for member in grpc.StatusCode:
            if member.value[0] == code:
                return member.name
    return "UNKNOWN"
