"""Run one broker replica in this process: ``python -m tests.fleet.replica CONFIG.pickle``.

The config is a pickled :class:`server.config.Config` (tests build it in Python). The replica prints
``port <n> <metrics port or 0>`` on stdout once it serves, and stops gracefully on SIGTERM.
"""

from __future__ import annotations

import asyncio
import pickle
import signal
import sys
from pathlib import Path

from server.app import start
from server.config import Config
from server.logging.setup import configure_logging


async def main(config: Config) -> None:
    configure_logging(config.logging.level, stream=sys.stderr)
    broker = await start(config, environ={})
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    print(f"port {broker.port} {broker.metrics_port or 0}", flush=True)
    await stopping.wait()
    await broker.stop()


if __name__ == "__main__":
    asyncio.run(main(pickle.loads(Path(sys.argv[1]).read_bytes())))  # noqa: S301 - the test just wrote it
