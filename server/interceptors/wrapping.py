"""Running the broker's per-call steps (access log, authentication, authorization, limits, error mapping) around
every kind of gRPC method handler.

The aio ``ServerInterceptor`` sees only the method name; wrapping the handler's behaviour gives each step the
request's ``ServicerContext`` (auth context, metadata, abort). Streaming behaviours come in two shapes (async
generators, and coroutines that call ``context.write``, as the health service's Watch does); both are kept.

A step is a :class:`HandlerInterceptor` with two plain coroutines, :meth:`~HandlerInterceptor.enter` before the
call and :meth:`~HandlerInterceptor.leave` after it, not a context manager: an open stream then holds no
generator per step. Each step works alone as an interceptor, but the broker chains them in one :class:`Pipeline`:
one wrapper per call, entering the steps in order and leaving them in reverse. At 10,000 open WatchMailbox streams
the nested wrappers and context managers were a good part of the broker's memory (bench watch_streams_10000).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class HandlerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Base class of a step: subclasses implement :meth:`enter` and, when they have something to do afterwards,
    :meth:`leave`.

    The wrapped handler is made once per method and reused while the handler it wraps is the same object (the
    registered handler, or the previous interceptor's cached wrapper), so a call builds no closures or handlers.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def enter(self, method: str, context: Context) -> Any:
        """Before the call; may end it (``abort_with``). Returns what :meth:`leave` will be given."""
        return None

    async def leave(self, method: str, context: Context, entered: Any, error: BaseException | None) -> None:
        """After the call (also when a later step's ``enter`` ended it), with the exception it ended with, if any.
        Returning lets ``error`` go on; raising replaces it."""

    def unhandled(self) -> None:
        """A call to a path the server has no method for (gRPC answers UNIMPLEMENTED; no handler runs)."""

    def prepare(self, method: str, handler: Handler) -> None:
        """Called once per method with its handler, before any call of it runs."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        return await _intercept(self._wrapped, (self,), continuation, handler_call_details)


class Pipeline(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Several steps as one interceptor, first outermost, run by a single wrapper per call."""

    def __init__(self, steps: Sequence[HandlerInterceptor]) -> None:
        self._steps = tuple(steps)
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        return await _intercept(self._wrapped, self._steps, continuation, handler_call_details)


async def _intercept(
    cache: dict[str, tuple[Handler, Handler]],
    steps: tuple[HandlerInterceptor, ...],
    continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
    handler_call_details: grpc.HandlerCallDetails,
) -> Handler:
    handler = await continuation(handler_call_details)
    if handler is None:
        for step in steps:
            step.unhandled()
        return handler
    method = handler_call_details.method
    cached = cache.get(method)
    if cached is not None and cached[0] is handler:
        return cached[1]
    for step in steps:
        step.prepare(method, handler)
    wrapped = wrap_handler(handler, method, steps)
    cache[method] = (handler, wrapped)  # keyed by the methods the server has registered: a bounded set
    return wrapped


def wrap_handler(handler: Handler, method: str, steps: tuple[HandlerInterceptor, ...]) -> Handler:
    """Return a handler equal to ``handler`` whose behaviour runs between the steps' ``enter`` and ``leave``."""
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_wrap(handler.unary_unary, method, steps), des, ser)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_wrap(handler.unary_stream, method, steps), des, ser)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_wrap(handler.stream_unary, method, steps), des, ser)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(_wrap(handler.stream_stream, method, steps), des, ser)


async def _enter(steps: tuple[HandlerInterceptor, ...], method: str, context: Context, entered: list[Any]) -> None:
    for step in steps:
        entered.append(await step.enter(method, context))


async def _leave(
    steps: tuple[HandlerInterceptor, ...],
    method: str,
    context: Context,
    entered: list[Any],
    error: BaseException | None,
) -> None:
    """Leave the entered steps in reverse, each seeing the error as the steps inside it left it; then raise it."""
    for index in range(len(entered) - 1, -1, -1):
        try:
            await steps[index].leave(method, context, entered[index], error)
        except BaseException as replaced:  # a step turned the error into another (a status), or failed itself
            error = replaced
    if error is not None:
        raise error


def _wrap(behavior: Callable[..., Any], method: str, steps: tuple[HandlerInterceptor, ...]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            entered: list[Any] = []
            error: BaseException | None = None
            try:
                await _enter(steps, method, context, entered)
                responses = behavior(request, context)
                try:
                    async for response in responses:
                        yield response
                finally:
                    await responses.aclose()
            except BaseException as exc:  # GeneratorExit and CancelledError too: every step must leave
                error = exc
            await _leave(steps, method, context, entered, error)

        return stream

    async def call(request: Any, context: Context) -> Any:
        entered: list[Any] = []
        try:
            await _enter(steps, method, context, entered)
            result = await behavior(request, context)
        except BaseException as exc:
            await _leave(steps, method, context, entered, exc)
            raise  # unreachable: _leave raises the error, or what a step replaced it with
        await _leave(steps, method, context, entered, None)
        return result

    return call
