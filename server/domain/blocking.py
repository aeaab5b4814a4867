"""A bounded thread pool for blocking work (the store, provider client libraries), off the event loop."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class BlockingPool:
    """Runs blocking callables in at most ``threads`` threads and awaits their results."""

    def __init__(self, threads: int, name: str = "mailbroker-blocking") -> None:
        self.threads = threads
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)

    @property
    def queued(self) -> int:
        """Work waiting for a free thread (for metrics: read when scraped, so the calls themselves pay nothing)."""
        return self._executor._work_queue.qsize()

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.submit(fn, *args, **kwargs)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
        """Start ``fn`` in a worker thread now; the future of its result (cancelling it does not stop the thread).
        For callers that need the work as a future (to shield it) without a task around a coroutine."""
        loop = asyncio.get_running_loop()
        # Copy the context so call-scoped values (request id) are visible to logging in the worker thread.
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return loop.run_in_executor(self._executor, call)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
