"""Broker figures under load from separate processes (bench/load.py): 10,000 WatchMailbox streams on one process,
and GetAccount unary throughput over mTLS.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

from bench.floor import BareServer
from bench.harness import BrokerProcess, LmtpSender, Run, connect_account
from bench.imap_feeds import HEARTBEAT_SECONDS, note
from bench.proc import CpuWindow, MiB, ProcStatus, Sampler, cpu_seconds, reset_peak, status, thread_names
from bench.report import REPO, FigureResult, Target
from bench.stats import percentile

# New streams per second, all load processes together. The broker takes WatchMailbox calls at a few hundred a
# second (each opens its feed); faster, gRPC's queue of calls not yet picked up (grpc.server_max_pending_requests,
# 1,000) overflows and gRPC cancels the excess (CANCELLED): see the figure's notes.
OPEN_PER_SECOND = 250
# The API's default: what a fleet of consumers would ask for. (The minimum, 5 s, as the other feed figures use, makes
# 2,000 heartbeats a second at 10,000 streams, a load of its own.) The quick pass uses the minimum: up sooner.
STREAM_HEARTBEAT_SECONDS = 30
FLOOR_OPEN_PER_SECOND = 2000
SEPARATE_LOAD = "broker in its own process (python -m server.cli serve); load from separate processes (bench/load.py)"


class LoadProcess:
    """``python -m bench.load MODE`` with ``settings``; JSON lines both ways."""

    def __init__(self, mode: str, settings: dict[str, Any]) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.load", mode],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("GRPC_")},
        )
        self.send(settings)

    @property
    def pid(self) -> int:
        return self._process.pid

    def send(self, record: dict[str, Any] | None) -> None:
        stdin: IO[str] | None = self._process.stdin
        assert stdin is not None
        stdin.write((json.dumps(record) if record is not None else "") + "\n")
        stdin.flush()

    def read(self) -> dict[str, Any]:
        stdout: IO[str] | None = self._process.stdout
        assert stdout is not None
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"the load process ended (exit {self._process.wait()}) without an answer")
        record: dict[str, Any] = json.loads(line)
        return record

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.send(None)
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


@contextlib.contextmanager
def load_processes(mode: str, settings: list[dict[str, Any]]) -> Iterator[list[LoadProcess]]:
    processes: list[LoadProcess] = []
    try:
        for one in settings:
            processes.append(LoadProcess(mode, one))
        yield processes
    finally:
        for process in processes:
            process.close()


def client_settings(broker: BrokerProcess) -> dict[str, Any]:
    alice = broker.pki.alice
    return {"target": broker.target, "ca": str(broker.pki.ca), "key": str(alice.key), "cert": str(alice.cert)}


# -- 10,000 WatchMailbox streams -----------------------------------------------------------------------------------


def watch_streams_10000(run: Run) -> FigureResult:
    """Many WatchMailbox streams on a few accounts: the broker's gRPC and fan-out cost per stream.

    Streams share upstreams (one IDLE watcher per account), so this measures what each stream costs on its own:
    its HTTP/2 stream, its subscriber queue and tasks, its heartbeats, and a sealed resume token and a message
    per event. Load: two processes, each with half the streams over several connections (the broker allows
    ``max_concurrent_streams`` per connection)."""
    result = FigureResult("watch_streams_10000")
    streams = run.count(10_000, 600)
    account_count = run.count(10, 3)
    rounds = run.count(3, 1)
    processes = 2
    heartbeat = run.count(STREAM_HEARTBEAT_SECONDS, HEARTBEAT_SECONDS)
    channels = run.count(12, 2)  # per process: 10,000 / 24 = 417 streams per connection (limit 1,000)
    with run.environment(result, name="") as (mail, broker):
        boxes = [mail.new_mailbox("fanout") for _ in range(account_count)]
        with broker.channel() as channel:
            names = [connect_account(channel, mail.dovecot, box) for box in boxes]
        idle = broker.status()
        settings = [
            {
                **client_settings(broker),
                "accounts": names,
                "streams": streams // processes,
                "channels": channels,
                "heartbeat_seconds": heartbeat,
                "open_per_second": OPEN_PER_SECOND // processes,
            }
            for _ in range(processes)
        ]
        sender = LmtpSender(mail.dovecot)
        try:
            with load_processes("watch", settings) as loads:
                started = time.monotonic()
                with Sampler(broker.pid, interval=0.1) as opening:
                    ups = [load.read() for load in loads]
                up_seconds = time.monotonic() - started
                if sum(u["up"] for u in ups) != streams:
                    raise RuntimeError(f"streams up: {ups}")
                time.sleep(1.0)
                watching = broker.status()
                threads = thread_names(broker.pid)
                with CpuWindow(broker.pid) as quiet:
                    time.sleep(run.count(10.0, 2.0))
                reset_peak(broker.pid)
                fanout: list[float] = []
                received: dict[int, int] = {}
                ended: dict[str, int] = {}
                with Sampler(broker.pid, interval=0.05) as sampler, CpuWindow(broker.pid) as busy:
                    for number in range(1, rounds + 1):
                        began = time.monotonic()
                        for box in boxes:
                            sender.deliver(box.address, note(f"fan-out {number}", box.address))
                        for load in loads:
                            load.send({"expect": number, "timeout": 60})
                        answers = [load.read() for load in loads]
                        fanout.append(time.monotonic() - began)
                        received, ended = {}, {}
                        for answer in answers:
                            for count, how_many in answer["received"].items():
                                received[int(count)] = received.get(int(count), 0) + how_many
                            for code, how_many in answer["ended"].items():
                                ended[code] = ended.get(code, 0) + how_many
                        time.sleep(1.0)
                after = broker.status()
        finally:
            sender.close()
    floor_idle, floor_up = _floor_streams(run, streams, processes, channels)
    complete = received.get(rounds, 0) + sum(n for c, n in received.items() if c > rounds)
    events = sum(count * n for count, n in received.items())
    result.add(
        "streams receiving every event",
        complete,
        "",
        Target(">=", streams),
        f"of {streams:,}; {events:,} events read of {streams * rounds:,} expected",
    )
    peak = max(sampler.max_rss, after.rss, watching.rss)
    result.add(
        "broker peak RSS",
        peak / MiB,
        "MiB",
        Target("<=", 512),
        f"{watching.rss_mib:.0f} MiB with all streams up and quiet, {idle.rss_mib:.0f} MiB before them",
    )
    result.add(
        "broker memory per stream",
        (watching.rss - idle.rss) / streams / 1024,
        "KiB",
        detail=f"RSS growth with every stream up ÷ {streams:,}",
    )
    floor_per_stream = (floor_up.rss - floor_idle.rss) / streams
    result.add(
        "÷ bare gRPC floor, memory per stream",
        (watching.rss - idle.rss) / floor_per_stream / streams if floor_per_stream > 0 else float("nan"),
        "x",
        detail=f"bare grpc.aio Health/Watch: {floor_per_stream / 1024:.1f} KiB per stream, "
        f"{floor_up.rss_mib:.0f} MiB with {streams:,} up",
    )
    result.add(
        "broker threads",
        max(sampler.max_threads, opening.max_threads, watching.threads),
        "",
        detail=", ".join(f"{n} {name}" for name, n in threads.items()),
    )
    result.add(
        "one delivery to all its streams",
        statistics.median(fanout) * 1000,
        "ms",
        detail=f"delivery → every stream of the {account_count} accounts read it "
        f"({streams // account_count:,} streams each), max {max(fanout) * 1000:.0f} ms of {rounds}",
    )
    result.add(
        "broker CPU, streams quiet",
        quiet.process_cores * 100,
        "%",
        detail=f"of one core: heartbeats every {heartbeat} s on {streams:,} streams",
    )
    result.add("broker CPU while events flowed", busy.process_cores * 100, "%", detail="of one core")
    retried: dict[str, int] = {}
    for answer in ups:
        for reason, n in answer["retried"].items():
            retried[reason] = retried.get(reason, 0) + n
    result.add(
        "streams opened again",
        sum(retried.values()),
        "",
        detail="cancelled by gRPC before the broker took them (its queue of calls not yet picked up overflowed)",
    )
    if set(ended) - {"OK"}:
        result.notes.append(f"streams that ended: {ended}")
    result.setup = (
        f"{SEPARATE_LOAD}; {streams:,} WatchMailbox streams from {processes} processes ({channels} connections "
        f"each; opened at {OPEN_PER_SECOND:,}/s, all up in {up_seconds:.1f} s, first heartbeat after "
        f"{heartbeat} s) on {account_count} IMAP "
        f"accounts of the test Dovecot (one upstream IDLE watcher each); {rounds} rounds of one LMTP delivery per "
        f"account, each round awaited until every stream read it"
    )
    result.details.update(
        streams=streams,
        accounts=account_count,
        rounds=rounds,
        received_by_count=received,
        ended=ended,
        retried=retried,
        fanout_seconds=fanout,
        up_seconds=up_seconds,
        idle=vars(idle),
        watching=vars(watching),
        after=vars(after),
        threads=threads,
        cpu_quiet_cores=quiet.process_cores,
        cpu_busy_cores=busy.process_cores,
        floor_idle=vars(floor_idle),
        floor_up=vars(floor_up),
    )
    return result


def _floor_streams(run: Run, streams: int, processes: int, channels: int) -> tuple[ProcStatus, ProcStatus]:
    """A bare grpc.aio server's RSS before and with ``streams`` Health/Watch streams open: what gRPC itself costs."""
    with BareServer(run.pki, run.event_loop) as floor:
        time.sleep(0.5)
        idle = status(floor.pid)
        settings = {
            "target": floor.target,
            "ca": str(run.pki.ca),
            "key": str(run.pki.alice.key),
            "cert": str(run.pki.alice.cert),
            "accounts": [],
            "streams": streams // processes,
            "channels": channels,
            "heartbeat_seconds": HEARTBEAT_SECONDS,
            "open_per_second": FLOOR_OPEN_PER_SECOND // processes,
        }
        with load_processes("watch", [settings] * processes) as loads:
            ups = [load.read() for load in loads]
            if sum(u["up"] for u in ups) != streams:
                raise RuntimeError(f"floor streams up: {ups}")
            time.sleep(1.0)
            return idle, status(floor.pid)


# -- GetAccount throughput -----------------------------------------------------------------------------------------


def get_account_throughput(run: Run) -> FigureResult:
    """GetAccount calls per second the broker answers over mTLS, loaded from separate processes (two processes,
    several connections, many calls in flight each), beside the floor: a bare grpc.aio server's Health/Check
    (bench/floor.py) under the same load on the same machine, so the ratio says what part is the broker's own.

    Repeated, broker and floor in turn: the machine is shared, so the figure is the median of the repetitions; the
    broker's CPU per call (which depends far less on what else runs) is reported beside it."""
    result = FigureResult("get_account_throughput")
    repetitions = run.count(3, 1)
    seconds = run.count(8.0, 2.0)
    warm_up = run.count(2.0, 1.0)
    processes, channels, concurrency = 2, 4, 16
    runs: dict[str, list[dict[str, float]]] = {"broker": [], "floor": []}
    latencies: list[float] = []
    errors = 0
    with run.environment(result) as (mail, broker), BareServer(run.pki, run.event_loop) as floor:
        with broker.channel() as channel:
            account = connect_account(channel, mail.dovecot, mail.new_mailbox("unary"))
        targets = {
            "broker": ({**client_settings(broker), "account": account}, broker.pid),
            "floor": ({**client_settings(broker), "target": floor.target, "account": ""}, floor.pid),
        }
        for repetition in range(repetitions):
            for kind, (base, pid) in targets.items():
                phase = f"{kind}-{repetition + 1}" if kind == "broker" else ""
                shape = (processes, channels, concurrency, warm_up, seconds)
                measured = _unary_load(run, result, base, pid, phase, *shape)
                runs[kind].append(measured)
                if kind == "broker":
                    errors += int(measured.pop("errors"))
                    latencies.extend(measured.pop("latency_ms_sample", []))
    rates = [r["rate"] for r in runs["broker"]]
    floors = [r["rate"] for r in runs["floor"]]
    rate = statistics.median(rates)
    result.add(
        "GetAccount throughput",
        rate,
        "req/s",
        Target(">=", 3000),
        f"median of {repetitions}: " + ", ".join(f"{r:,.0f}" for r in rates),
    )
    ratios = [b / f for b, f in zip(rates, floors, strict=True) if f]
    result.add(
        "÷ bare gRPC floor, same load",
        statistics.median(ratios),
        "x",
        detail="bare Health/Check " + ", ".join(f"{f:,.0f}" for f in floors) + " req/s",
    )
    cost = statistics.median(r["cpu_per_call_us"] for r in runs["broker"])
    floor_cost = statistics.median(r["cpu_per_call_us"] for r in runs["floor"])
    result.add(
        "broker CPU per call",
        cost,
        "µs",
        detail=f"bare server {floor_cost:.0f} µs; {1e6 / cost:,.0f} req/s per broker core; broker used "
        f"{statistics.median(r['server_cores'] for r in runs['broker']):.2f} cores",
    )
    result.add(
        "load processes' CPU",
        statistics.median(r["client_cores"] for r in runs["broker"]) * 100,
        "%",
        detail=f"of one core; machine busy {statistics.median(r['machine_cores'] for r in runs['broker']):.2f} "
        f"of {os.cpu_count()} cores",
    )
    if latencies:
        result.add(
            "call latency p50",
            statistics.median(latencies),
            "ms",
            detail=f"p99 {percentile(latencies, 0.99):.3g} ms at {processes * channels * concurrency} in flight",
        )
    result.add("failed calls", errors, "", Target("<=", 0))
    result.setup = (
        f"{SEPARATE_LOAD}; GetAccount on one IMAP account, {processes} load processes x {channels} mTLS "
        f"connections x {concurrency} calls in flight (grpc.aio on uvloop), {seconds:g} s after {warm_up:g} s of "
        f"warm-up; "
        f"{repetitions} repetitions, each also against a bare grpc.aio server (bench/floor.py) under the same load"
    )
    result.details.update(runs=runs)
    return result


def _unary_load(
    run: Run,
    result: FigureResult,
    base: dict[str, Any],
    pid: int,
    phase: str,
    processes: int,
    channels: int,
    concurrency: int,
    warm_up: float,
    seconds: float,
) -> dict[str, Any]:
    """One timed window of unary load on the server ``pid``: rate, CPU of server and clients, errors."""
    start = time.time() + 1.5 + warm_up  # the load processes start (imports, TLS) and warm up first
    end = start + seconds
    settings = {**base, "channels": channels, "concurrency": concurrency, "start": start, "end": end}
    with load_processes("unary", [settings] * processes) as loads:
        time.sleep(max(0.0, start - time.time()))
        clients = [cpu_seconds(load.pid) for load in loads]
        profiled = run.profiled(result, pid, phase) if phase else contextlib.nullcontext()
        with profiled, CpuWindow(pid) as cpu:
            time.sleep(max(0.0, end - time.time()))
        clients = [cpu_seconds(load.pid) - before for load, before in zip(loads, clients, strict=True)]
        answers = [load.read() for load in loads]
    ok = sum(a["ok"] for a in answers)
    return {
        "rate": ok / seconds,
        "cpu_per_call_us": cpu.process_cores * seconds / max(ok, 1) * 1e6,
        "server_cores": cpu.process_cores,
        "client_cores": sum(clients) / seconds,
        "machine_cores": cpu.machine_cores,
        "errors": sum(a["errors"] for a in answers),
        "latency_ms_sample": [x for a in answers for x in a["latency_ms"]],
    }
