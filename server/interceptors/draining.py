"""Graceful shutdown for server streams: when the broker starts draining, every open stream ends at once with
UNAVAILABLE (reason SERVER_SHUTTING_DOWN), so its client resumes from its last token on another replica instead of
hanging until the shutdown grace runs out."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server.errors import ShuttingDown
from server.interceptors.errors import abort_with


class DrainingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Ends each server-streaming handler once ``draining`` is set.

    No task per stream (at 10,000 open WatchMailbox streams, two tasks each were a good part of the broker's own
    memory per stream; bench watch_streams_10000): a stream registers its own task while it waits for its next
    response, and one watcher task, started with the first stream, cancels the registered ones when draining begins;
    each turns that cancellation into SERVER_SHUTTING_DOWN. A stream that is sending a response meanwhile sees
    ``draining`` before it asks for the next one.
    """

    def __init__(self, draining: asyncio.Event) -> None:
        self._draining = draining
        # Per method, the handler wrapped last and its racing wrapper (see HandlerInterceptor): made once.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}
        self._waiting: set[asyncio.Task[Any]] = set()  # streams awaiting their next response
        self._drained: set[asyncio.Task[Any]] = set()  # streams the watcher cancelled
        self._watcher: asyncio.Task[None] | None = None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_stream is None or not inspect.isasyncgenfunction(handler.unary_stream):
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._racing(handler, handler.unary_stream)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _watch(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        await self._draining.wait()
        for task in list(self._waiting):
            self._drained.add(task)
            task.cancel()

    def _racing(
        self, handler: grpc.RpcMethodHandler[Any, Any], inner: Callable[..., AsyncGenerator[Any, None]]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        draining, waiting, drained = self._draining, self._waiting, self._drained

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            task = asyncio.current_task()
            assert task is not None
            self._watch()
            responses = inner(request, context)
            try:
                while True:
                    if draining.is_set():
                        await abort_with(context, ShuttingDown())
                    waiting.add(task)
                    try:
                        response = await anext(responses)
                    except StopAsyncIteration:
                        return
                    except asyncio.CancelledError:
                        if task not in drained:  # the client went away, or the server is stopping
                            raise
                        drained.discard(task)
                        task.uncancel()
                        await abort_with(context, ShuttingDown())
                    finally:
                        waiting.discard(task)
                    yield response
            finally:
                drained.discard(task)
                await responses.aclose()

        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
