"""Load from a separate process: ``python -m bench.load unary|watch``, with its settings as one JSON line on stdin.

The figures that measure the broker under load (GetAccount throughput, 10,000 WatchMailbox streams) run their
clients here, in processes of their own, so the client's CPU and memory are not the broker's and the bench's own
process stays free to deliver mail and sample /proc. Each child speaks JSON lines on stdout.

``unary``: GetAccount on ``account`` (Health/Check without one) over ``channels`` mTLS connections with
``concurrency`` calls in flight on each, from now until ``end`` (time.time()); it counts the calls that completed
between ``start`` and ``end`` and prints ``{"ok": n, "errors": n, "latency_ms": [sample]}``.

``watch``: ``streams`` WatchMailbox streams spread over ``accounts`` (Health/Watch without any) and ``channels``
connections; prints
``{"up": n, "retried": {reason: n}}`` once every stream has sent its first event (a heartbeat; a stream cancelled
before that is opened again, and counted), then for each ``{"expect": K, "timeout": T}``
line read from stdin waits until every stream has read K MessageAdded events (or T seconds pass) and prints
``{"received": {count: streams}, "ended": n}``; an empty line or EOF ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import uvloop
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import account_service_pb2_grpc, mail_service_pb2_grpc
from mailbroker.v1 import mail_service_pb2 as mpb

# Every channel its own TCP connection: grpc otherwise shares one subchannel between channels with equal arguments.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)]


def _channel(settings: dict[str, Any]) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(settings["ca"]).read_bytes(),
        private_key=Path(settings["key"]).read_bytes(),
        certificate_chain=Path(settings["cert"]).read_bytes(),
    )
    return grpc.aio.secure_channel(settings["target"], credentials, options=CHANNEL_OPTIONS)


def _say(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


Call = Callable[[grpc.aio.Channel], Callable[[], Awaitable[object]]]


def _get_account(name: str) -> Call:
    request = apb.GetAccountRequest(name=name)

    def bind(channel: grpc.aio.Channel) -> Callable[[], Awaitable[object]]:
        stub = account_service_pb2_grpc.AccountServiceStub(channel)  # type: ignore[no-untyped-call]
        return lambda: stub.GetAccount(request, timeout=10)

    return bind


def _health_check() -> Call:
    request = health_pb2.HealthCheckRequest()

    def bind(channel: grpc.aio.Channel) -> Callable[[], Awaitable[object]]:
        stub = health_pb2_grpc.HealthStub(channel)
        return lambda: stub.Check(request, timeout=10)

    return bind


async def unary(settings: dict[str, Any]) -> None:
    channels = [_channel(settings) for _ in range(settings["channels"])]
    start, end = settings["start"], settings["end"]
    # Without an account, the floor: Health/Check on a bare grpc.aio server (bench/floor.py) under the same load.
    call = _get_account(settings["account"]) if settings.get("account") else _health_check()
    ok = errors = 0
    latencies: list[float] = []

    async def caller(channel: grpc.aio.Channel) -> None:
        nonlocal ok, errors
        one = call(channel)
        while (now := time.time()) < end:
            try:
                await one()
            except grpc.aio.AioRpcError:
                done, failed = time.time(), True
            else:
                done, failed = time.time(), False
            if start <= done <= end:
                if failed:
                    errors += 1
                else:
                    ok += 1
                    if len(latencies) < 20_000 and random.random() < 0.1:  # noqa: S311 - sampling, not crypto
                        latencies.append((done - now) * 1000)

    try:
        await asyncio.gather(*(caller(channel) for channel in channels for _ in range(settings["concurrency"])))
    finally:
        for channel in channels:
            await channel.close(None)
    _say({"ok": ok, "errors": errors, "latency_ms": latencies})


async def watch(settings: dict[str, Any]) -> None:
    accounts: list[str] = settings["accounts"]
    channels = [_channel(settings) for _ in range(settings["channels"])]
    stubs = [mail_service_pb2_grpc.MailServiceStub(c) for c in channels]  # type: ignore[no-untyped-call]
    heartbeat = duration_pb2.Duration(seconds=settings["heartbeat_seconds"])
    count = settings["streams"]
    received = [0] * count
    up = [asyncio.Event() for _ in range(count)]
    changed = asyncio.Event()
    ended: list[str] = []

    health = [health_pb2_grpc.HealthStub(c) for c in channels]

    retried: list[str] = []

    async def follow(index: int) -> None:
        while True:
            call: Any
            if accounts:
                request = mpb.WatchMailboxRequest(account=accounts[index % len(accounts)], heartbeat_interval=heartbeat)
                call = stubs[index % len(stubs)].WatchMailbox(request)
            else:  # the floor: Health/Watch on a bare grpc.aio server, which answers at once and then waits
                call = health[index % len(health)].Watch(health_pb2.HealthCheckRequest())
            try:
                async for event in call:
                    up[index].set()
                    if event.WhichOneof("event") == "message_added":
                        received[index] += 1
                        changed.set()
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"[:100]
                if not up[index].is_set() and exc.code() == grpc.StatusCode.CANCELLED:
                    # Cancelled by gRPC before the broker took the call (see below): a client retries, so does this.
                    retried.append(reason)
                    await asyncio.sleep(random.uniform(1.0, 5.0))  # noqa: S311 - jitter, not crypto
                    continue
                ended.append(reason)
            else:
                ended.append("OK")
            changed.set()
            return

    # Streams open at ``open_per_second``: a burst of thousands of calls at once overflows gRPC's queue of calls the
    # server has not yet picked up (grpc.server_max_pending_requests, 1,000), and gRPC cancels the excess.
    readers = []
    began = time.monotonic()
    for index in range(count):
        readers.append(asyncio.create_task(follow(index)))
        if index % 50 == 49:
            await asyncio.sleep(max(0.0, began + (index + 1) / settings["open_per_second"] - time.monotonic()))
    try:
        waiting = asyncio.gather(*(event.wait() for event in up))
        deadline = time.monotonic() + count / settings["open_per_second"] + 3 * settings["heartbeat_seconds"] + 60
        while not waiting.done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{sum(not e.is_set() for e in up)} streams not up; retried {len(retried)} times")
            if ended:
                raise RuntimeError(f"{len(ended)} streams ended before they were up: {Counter(ended).most_common(3)}")
            await asyncio.wait({waiting}, timeout=0.5)
        _say({"up": count, "retried": dict(Counter(retried))})
        loop = asyncio.get_running_loop()
        while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            order = json.loads(line)
            deadline = time.monotonic() + order["timeout"]
            while min(received) < order["expect"] and time.monotonic() < deadline:
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 0.5)
            _say({"received": dict(Counter(received)), "ended": dict(Counter(ended))})
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for channel in channels:
            await channel.close(None)


def main() -> None:
    mode = sys.argv[1]
    settings = json.loads(sys.stdin.readline())
    # uvloop, as the broker: the load processes share the machine with it, so the less CPU they spend the better.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run({"unary": unary, "watch": watch}[mode](settings))


if __name__ == "__main__":
    main()
