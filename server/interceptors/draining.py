"""Graceful shutdown for server streams: when the broker starts draining, every open stream ends at once with
UNAVAILABLE (reason SERVER_SHUTTING_DOWN), so its client resumes from its last token on another replica instead of
hanging until the shutdown grace runs out."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server.errors import ShuttingDown
from server.interceptors.errors import abort_with


class DrainingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Races each server-streaming handler against ``draining``."""

    def __init__(self, draining: asyncio.Event) -> None:
        self._draining = draining
        # Per method, the handler wrapped last and its racing wrapper (see HandlerInterceptor): made once.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

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

    def _racing(
        self, handler: grpc.RpcMethodHandler[Any, Any], inner: Callable[..., AsyncGenerator[Any, None]]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        draining = self._draining

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            responses = inner(request, context)
            stop = asyncio.ensure_future(draining.wait())
            following: asyncio.Future[Any] | None = None
            try:
                while True:
                    following = asyncio.ensure_future(anext(responses))
                    await asyncio.wait({following, stop}, return_when=asyncio.FIRST_COMPLETED)
                    if not following.done():
                        await _cancel(following)
                        following = None
                        await abort_with(context, ShuttingDown())
                    try:
                        response = following.result()
                    except StopAsyncIteration:
                        return
                    following = None
                    yield response
            finally:
                stop.cancel()
                # The generator may still be running in ``following`` (the client went away mid-wait): stop it
                # there before closing it, or aclose() finds it running.
                if following is not None:
                    await _cancel(following)
                await responses.aclose()

        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)


async def _cancel(future: asyncio.Future[Any]) -> None:
    future.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
        await future
