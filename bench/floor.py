"""The floor under every broker call: a bare grpc.aio server (Health only, no interceptors) with the same mutual TLS,
on the broker's event loop.

Started as ``python -m bench.floor PKI_DIR EVENT_LOOP`` in its own process, it prints its port and serves until
terminated. A figure that times Health/Check on it and on the broker learns what Python gRPC over mTLS costs by
itself, and so what part of a broker call is the broker's own.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from bench.report import REPO
from server.cli import event_loop_factory
from tests.pki import TestPki


async def serve(pki_dir: Path) -> None:
    credentials = grpc.ssl_server_credentials(
        [((pki_dir / "server-key.pem").read_bytes(), (pki_dir / "server.pem").read_bytes())],
        root_certificates=(pki_dir / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    server = grpc.aio.server()
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    print(port, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


class BareServer:
    """The bare server in its own process, on a free loopback port (``with`` block)."""

    def __init__(self, pki: TestPki, event_loop: str) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.floor", str(pki.directory), event_loop],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError("the bare gRPC server did not start")
        self.target = f"127.0.0.1:{int(line)}"

    @property
    def pid(self) -> int:
        return self._process.pid

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            self._process.wait(10)
        if self._process.stdout is not None:
            self._process.stdout.close()

    def __enter__(self) -> BareServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def health_check(channel: grpc.Channel) -> Callable[[], object]:
    """A callable that makes one Health/Check call on ``channel``."""
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest()
    return lambda: stub.Check(request, timeout=10)


if __name__ == "__main__":
    # On the broker's event loop, so that the floor differs from the broker by the broker alone.
    with asyncio.Runner(loop_factory=event_loop_factory(sys.argv[2])) as runner:
        runner.run(serve(Path(sys.argv[1])))
