"""The one place where the broker's exception tree becomes a gRPC status (google.rpc.Status + ErrorInfo)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.domain import deadline
from server.errors import BrokerError, DeadlineExceeded, Internal
from server.interceptors.context import request_id
from server.interceptors.wrapping import HandlerInterceptor

ERROR_DOMAIN = "mailbroker.v1"

log = logging.getLogger("mailbroker.errors")


def to_rpc_status(error: BrokerError) -> status_pb2.Status:
    """google.rpc.Status for an error: ErrorInfo always, BadRequest and RetryInfo when they apply."""
    details = [_pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata))]
    if error.field_violations:
        violations = [
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.field_violations
        ]
        details.append(_pack(error_details_pb2.BadRequest(field_violations=violations)))
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after * 1000))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    code = getattr(code_pb2, error.code)
    return status_pb2.Status(code=code, message=error.message, details=details)


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: BrokerError) -> NoReturn:
    """End the call with ``error``'s status; raises grpc.aio.AbortError like ``context.abort``."""
    status = rpc_status.to_status(to_rpc_status(error))
    trailing = (*status.trailing_metadata, ("x-request-id", request_id()))
    await context.abort(status.code, status.details, trailing_metadata=trailing)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


class StreamAwareInterceptor(HandlerInterceptor):
    """A HandlerInterceptor that knows, in ``around``, whether the method streams (learnt from its handler, once
    per method, before any call of it runs)."""

    def __init__(self) -> None:
        super().__init__()
        self._streaming: dict[str, bool] = {}

    def prepare(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> None:
        # Registered methods only: a bounded set.
        self._streaming[method] = bool(handler.request_streaming or handler.response_streaming)

    def streams(self, method: str) -> bool:
        return self._streaming.get(method, False)


class ErrorMappingInterceptor(StreamAwareInterceptor):
    """Maps BrokerError to its status; anything unexpected becomes a generic INTERNAL with a logged traceback.

    It also records the caller's deadline for the code below (server.domain.deadline): provider calls are capped
    by it. A unary call without one gets ``default_deadline`` seconds, enforced here (DEADLINE_EXCEEDED); streams
    get none (a feed is meant to stay open).
    """

    def __init__(self, default_deadline: float | None = None) -> None:
        super().__init__()
        self._default_deadline = default_deadline

    async def enter(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> asyncio.Timeout | None:
        remaining = context.time_remaining()
        imposed = None
        if remaining is None and self._default_deadline is not None and not self.streams(method):
            remaining = imposed = self._default_deadline
        deadline.set_from_remaining(remaining)  # so provider calls and retries stop in time
        if imposed is None:
            return None
        timer = asyncio.timeout(imposed)
        await timer.__aenter__()
        return timer

    async def leave(
        self,
        method: str,
        context: grpc.aio.ServicerContext[Any, Any],
        entered: asyncio.Timeout | None,
        error: BaseException | None,
    ) -> None:
        timer = entered
        if timer is not None:
            try:  # the timer turns the cancellation it caused into TimeoutError
                await timer.__aexit__(type(error) if error else None, error, error.__traceback__ if error else None)
            except TimeoutError as expired:
                error = expired
        if error is None or isinstance(error, grpc.aio.AbortError | asyncio.CancelledError):
            return
        if isinstance(error, BrokerError):
            if isinstance(error, Internal):
                log.error("internal error", exc_info=error, extra={"method": method, "reason": error.reason})
            await abort_with(context, error)
        if not isinstance(error, Exception):
            return  # GeneratorExit, KeyboardInterrupt: not an error of the call's
        if isinstance(error, TimeoutError) and timer is not None and timer.expired():
            await abort_with(
                context,
                DeadlineExceeded(
                    "the call took longer than the server's default deadline", reason="DEFAULT_DEADLINE_EXCEEDED"
                ),
            )
        # The traceback is rendered without exception messages (server.logging), so no data leaks into it.
        log.error("unhandled error", exc_info=error, extra={"method": method, "reason": "INTERNAL"})
        await abort_with(context, Internal())
