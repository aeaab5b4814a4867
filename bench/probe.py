"""Run the broker with a probe (``python -m bench --probe``): garbage-collector pauses and event-loop stalls,
written as JSON lines with ``time.perf_counter()`` stamps (CLOCK_MONOTONIC on Linux, so comparable with the
bench process's own stamps). Nothing about calls or mail is recorded: only times, durations and GC generations.

    python -m bench.probe OUT.jsonl serve --config FILE     what BrokerProcess runs instead of server.cli
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

STALL_MS = 20.0  # an event-loop tick later than this is recorded
GC_MS = 5.0  # a collection longer than this is recorded
TICK = 0.01


class Probe:
    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._gc_started = 0.0

    def write(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._out.write(json.dumps(record) + "\n")
            self._out.flush()

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._gc_started = now
            return
        took = (now - self._gc_started) * 1000
        if took >= GC_MS:
            self.write({"kind": "gc", "at": self._gc_started, "ms": round(took, 2), "gen": info.get("generation")})

    def watch_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        expected = time.perf_counter() + TICK

        def tick() -> None:
            nonlocal expected
            now = time.perf_counter()
            late = (now - expected) * 1000
            if late >= STALL_MS:
                self.write({"kind": "stall", "at": expected, "ms": round(late, 2)})
            expected = now + TICK
            loop.call_later(TICK, tick)

        loop.call_later(TICK, tick)


def main() -> None:
    out_path, argv = Path(sys.argv[1]), sys.argv[2:]
    probe = Probe(out_path.open("a", encoding="utf-8"))
    gc.callbacks.append(probe.on_gc)

    from server import cli

    configured = cli.event_loop_factory

    def watched_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
        """The configured event loop (uvloop or asyncio's), watched from its first tick."""
        make = configured(name) or asyncio.new_event_loop

        def new_event_loop() -> asyncio.AbstractEventLoop:
            loop = make()
            probe.watch_loop(loop)
            return loop

        return new_event_loop

    cli.event_loop_factory = watched_loop_factory
    sys.exit(cli.main(argv))


if __name__ == "__main__":
    main()
