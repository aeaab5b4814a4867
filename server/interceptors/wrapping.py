"""Running async context managers around every kind of gRPC method handler.

The aio ``ServerInterceptor`` sees only the method name; wrapping the handler's behaviour gives each interceptor
the request's ``ServicerContext`` (auth context, metadata, abort). Streaming behaviours come in two shapes (async
generators, and coroutines that call ``context.write``, as the health service's Watch does); both are kept.

Each :class:`HandlerInterceptor` works alone, but the broker chains them in one :class:`Pipeline`: one wrapper
per call instead of one per interceptor. A stream then holds one wrapping generator rather than five nested ones,
and each response passes one wrapper, not five (at 10,000 open WatchMailbox streams the nested wrappers were a
good part of the broker's memory: bench watch_streams_10000).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

Around = Callable[[str, grpc.aio.ServicerContext[Any, Any]], AbstractAsyncContextManager[None]]
if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]


class HandlerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Base class: subclasses implement :meth:`around`, entered for the whole life of every call.

    The wrapped handler is made once per method and reused while the handler it wraps is the same object (the
    registered handler, or the previous interceptor's cached wrapper), so a call builds no closures or handlers.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    def around(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> AbstractAsyncContextManager[None]:
        raise NotImplementedError

    def unhandled(self) -> None:
        """A call to a path the server has no method for (gRPC answers UNIMPLEMENTED; no handler runs)."""

    def prepare(self, method: str, handler: Handler) -> None:
        """Called once per method with its handler, before any call of it runs."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            self.unhandled()
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        self.prepare(method, handler)
        wrapped = wrap_handler(handler, method, self.around)
        # Keyed by the methods the server has registered (an unknown one has no handler): a bounded set.
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class Pipeline(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Several HandlerInterceptors as one: their ``around``s, first outermost, entered by a single wrapper."""

    def __init__(self, steps: Sequence[HandlerInterceptor]) -> None:
        self._steps = tuple(steps)
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            for step in self._steps:
                step.unhandled()
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        for step in self._steps:
            step.prepare(method, handler)
        wrapped = wrap_handler(handler, method, _chain(tuple(step.around for step in self._steps)))
        self._wrapped[method] = (handler, wrapped)  # registered methods only: a bounded set
        return wrapped


def _chain(arounds: tuple[Around, ...]) -> Around:
    """One Around entering ``arounds`` in order and leaving them in reverse, as nested ``async with`` would."""
    if len(arounds) == 1:
        return arounds[0]

    @asynccontextmanager
    async def chained(method: str, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for around in arounds:
                await stack.enter_async_context(around(method, context))
            yield

    return chained


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, around: Around
) -> grpc.RpcMethodHandler[Any, Any]:
    """Return a handler equal to ``handler`` whose behaviour runs inside ``around(method, context)``."""
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_wrap(handler.unary_unary, method, around), des, ser)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_wrap(handler.unary_stream, method, around), des, ser)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_wrap(handler.stream_unary, method, around), des, ser)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(_wrap(handler.stream_stream, method, around), des, ser)


def _wrap(behavior: Callable[..., Any], method: str, around: Around) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            async with around(method, context):
                async for response in behavior(request, context):
                    yield response

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async with around(method, context):
            return await behavior(request, context)

    return call
