"""Several broker replicas, each in its own process, on one PostgreSQL database."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from server.config import Config, StoreConfig

READY_SECONDS = 60


@dataclasses.dataclass
class Replica:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    metrics_port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_replica(name: str, config: Config, directory: Path) -> Replica:
    """Start ``python -m tests.fleet.replica`` with ``config`` in its own data directory under ``directory``."""
    data_dir = directory / name
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    config = dataclasses.replace(config, data_dir=data_dir)
    config_file = data_dir / "config.pickle"
    config_file.write_bytes(pickle.dumps(config))
    log = data_dir / "replica.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.fleet.replica", str(config_file)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env={k: v for k, v in os.environ.items() if not k.startswith("MAILBROKER_")},
        )
    assert process.stdout is not None
    deadline = time.monotonic() + READY_SECONDS
    line = b""
    while time.monotonic() < deadline and process.poll() is None:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline()
            break
    if not line.startswith(b"port "):
        process.kill()
        process.wait()
        raise RuntimeError(f"replica {name} did not start; its log is {log}")
    _, port, metrics_port = line.split()
    return Replica(name, process, int(port), log, int(metrics_port))


@contextlib.contextmanager
def replicas(config: Config, directory: Path, count: int = 2) -> Iterator[list[Replica]]:
    """``count`` replicas of ``config`` (whose store must be PostgreSQL), stopped at the end."""
    assert config.store.url.startswith("postgresql"), "replicas share a PostgreSQL store"
    started: list[Replica] = []
    try:
        for index in range(count):
            started.append(start_replica(f"replica-{index}", config, directory))
        yield started
    finally:
        for replica in started:
            replica.stop()


def on_postgres(config: Config, url: str) -> Config:
    return dataclasses.replace(config, store=StoreConfig(url=url))
