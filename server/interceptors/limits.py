"""Per-identity resource limits: how many unary calls and how many streams one client identity may have open.

Runs after authorization, so a caller the policy refuses holds no slot. A call over a limit ends at once with
RESOURCE_EXHAUSTED (TOO_MANY_CONCURRENT_CALLS or TOO_MANY_STREAMS); nothing is queued, so one busy identity cannot
hold the server's memory or provider threads for the others. Message sizes are limited by the transport
(``[server] max_receive_message_bytes``); watches per account by the domain (server.domain.mailbox).
"""

from __future__ import annotations

from typing import Any

import grpc

from server.errors import ResourceExhausted
from server.interceptors.context import current_principal
from server.interceptors.errors import StreamAwareInterceptor, abort_with


class LimitsInterceptor(StreamAwareInterceptor):
    def __init__(self, *, max_calls: int, max_streams: int) -> None:
        super().__init__()
        self._limits = {False: max_calls, True: max_streams}
        self._open: dict[bool, dict[str, int]] = {False: {}, True: {}}

    def open_calls(self, identity: str) -> tuple[int, int]:
        """(unary calls, streams) the identity has open now (tests, metrics)."""
        return self._open[False].get(identity, 0), self._open[True].get(identity, 0)

    async def enter(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[dict[str, int], str]:
        principal = current_principal.get(None)
        identity = principal.identity if principal is not None else ""
        streaming = self.streams(method)
        counts = self._open[streaming]
        if counts.get(identity, 0) >= self._limits[streaming]:
            error = (
                ResourceExhausted("too many open streams for this caller", reason="TOO_MANY_STREAMS")
                if streaming
                else ResourceExhausted("too many concurrent calls for this caller", reason="TOO_MANY_CONCURRENT_CALLS")
            )
            await abort_with(context, error)
        counts[identity] = counts.get(identity, 0) + 1
        return counts, identity

    async def leave(
        self,
        method: str,
        context: grpc.aio.ServicerContext[Any, Any],
        entered: tuple[dict[str, int], str],
        error: BaseException | None,
    ) -> None:
        counts, identity = entered
        left = counts[identity] - 1
        if left:
            counts[identity] = left
        else:
            del counts[identity]  # no entry per identity ever seen: the dict stays as small as the open calls
