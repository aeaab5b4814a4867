"""A background task that runs ``sweep()`` at start-up and then every ``interval`` seconds, until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger("mailbroker.periodic")


class Periodic:
    """Subclasses implement :meth:`sweep`. ``sweeps`` counts finished sweeps and ``swept`` is a condition notified
    after each, so a test can wait for one without sleeping. One failed sweep is logged; the next one retries."""

    name = "periodic"

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.sweeps = 0
        self.swept = asyncio.Condition()

    async def sweep(self) -> int:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"mailbroker-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_for_sweeps(self, count: int) -> None:
        """Return once ``count`` sweeps have finished in total."""
        async with self.swept:
            await self.swept.wait_for(lambda: self.sweeps >= count)

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("background sweep failed", extra={"event": "sweep_failed", "component": self.name})
            async with self.swept:
                self.sweeps += 1
                self.swept.notify_all()
            await asyncio.sleep(self._interval)
