"""IMAP change-feed figures: delivery → event latency (on one mailbox, and spread over ten on a Dovecot that
hibernates IDLE connections), and 1,000 watched accounts in one process.

Latency runs from just before the LMTP transaction starts (on a connection already open) to the moment this
process reads the MessageAdded event off the WatchMailbox stream. The broker runs in its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1.mail_service_pb2_grpc import MailServiceStub

from bench.harness import BrokerProcess, LmtpSender, MailHarness, Run, account_stub, connect_request, mail_stub
from bench.proc import CpuWindow, MiB, Sampler, thread_names
from bench.profiling import python_threads
from bench.report import FigureResult, Target
from bench.stats import Latency
from server.config import MailConfig, ServerConfig
from tests.mailserver import Mailbox

HEARTBEAT_SECONDS = 5  # the smallest the API allows; a feed's first heartbeat says it is up
# Dovecot 2.3 loses the notification of mail that arrives while the 0.5 s IDLE notify delay runs out in a process
# that hibernates meanwhile (imap_hibernate_timeout after the IDLE began): the client hears of it only with the next
# change. So mail goes to a hibernating Dovecot only when every watching connection has been in IDLE for longer.
SETTLE = 2.0
LATE = 5.0  # seconds after which a delivery counts as not seen (the next one brings it)
STRAGGLERS = 15.0  # how long events may still come in after the last of many deliveries
SEPARATE = "broker in its own process (python -m server.cli serve), asyncio gRPC client over mTLS on loopback"

# Dovecot for a thousand IDLE connections (tests/mailserver/dovecot.py starts from the test settings: one
# high-performance login process, imap process_limit 1024, 1000 connections per user and IP):
# - IDLE hibernation: after 1 s in IDLE a connection moves from its own imap process into an imap-hibernate
#   process holding many, so a thousand watchers cost ten processes, not a thousand; mail wakes it (at once, where
#   a live imap process waits 0.5 s, see feed_latency). The imap processes hand connections over through the
#   imap-master socket, which the internal user must reach. (The broker's pooled read connections stay live.)
# - room for the watchers plus the broker's pooled read connections: imap processes, and clients per login and
#   hibernate process (the login process proxies TLS for the whole connection, so it holds every connection).
SCALE_DOVECOT = """
# bench/imap_feeds.py: 1,000+ concurrent IDLE connections
imap_hibernate_timeout = 1s
# Process titles say how many connections each imap-hibernate process holds (the bench waits for all of them).
verbose_proctitle = yes
default_client_limit = 5000
service imap {
  process_limit = 5000
  unix_listener imap-master {
    user = $default_internal_user
  }
}
service imap-login {
  client_limit = 5000
}
service imap-hibernate {
  # Many hibernate processes rather than one: a thousand connections hibernating within a second overwhelm a
  # single one ("Couldn't hibernate imap client: read(imap-hibernate) failed: Interrupted system call").
  client_limit = 100
  unix_listener imap-hibernate {
    mode = 0660
    group = $default_internal_group
  }
}
"""


def note(subject: str, to: str) -> bytes:
    """A small mail whose subject tells its event apart from every other."""
    return f"From: sender@example.net\r\nTo: {to}\r\nSubject: {subject}\r\n\r\n{subject}.\r\n".encode()


class Arrivals:
    """When each awaited subject's MessageAdded was read off a stream (``time.perf_counter()``)."""

    def __init__(self) -> None:
        self._times: dict[str, asyncio.Future[float]] = {}

    def expect(self, subject: str) -> asyncio.Future[float]:
        return self._times.setdefault(subject, asyncio.get_running_loop().create_future())

    def arrived(self, subject: str, when: float) -> None:
        future = self.expect(subject)
        if not future.done():
            future.set_result(when)


async def follow(stream: grpc.aio.UnaryStreamCall[Any, Any], arrivals: Arrivals, up: asyncio.Event) -> None:
    """Read a feed until it ends: ``up`` on the first event of any kind, arrivals for every MessageAdded."""
    async for event in stream:
        now = time.perf_counter()
        up.set()
        if event.WhichOneof("event") == "message_added":
            arrivals.arrived(event.message_added.message.subject, now)


def watch(stub: MailServiceStub, account: str) -> grpc.aio.UnaryStreamCall[Any, Any]:
    request = mpb.WatchMailboxRequest(
        account=account, heartbeat_interval=duration_pb2.Duration(seconds=HEARTBEAT_SECONDS)
    )
    call: grpc.aio.UnaryStreamCall[Any, Any] = stub.WatchMailbox(request)
    return call


def feed_latency(run: Run) -> FigureResult:
    """Delivery → MessageAdded, next to a plain IDLE client on the same folder and deliveries.

    Twice: on the test Dovecot, and on a Dovecot with IDLE hibernation. Dovecot holds back the IDLE notification
    of a live imap process for 0.5 s (NOTIFY_DELAY_MSECS in src/lib-storage/mailbox-watch.c) to batch changes;
    a hibernated connection is woken at once. A delivery to the hibernating server waits until both connections
    watching its mailbox have hibernated again (imap_hibernate_timeout, 1 s; see SETTLE for why), so that run
    spreads its deliveries over several mailboxes, each with its own account, feed and plain client, and each
    mailbox gets mail only ``gap`` after its previous event: the same number of deliveries in a tenth of the time.
    """
    result = FigureResult("feed_latency")
    variants = (  # label, Dovecot settings, deliveries, mailboxes, seconds after each event before the next
        ("test Dovecot", "", run.count(200, 6), 1, 0.02),
        ("hibernating Dovecot", SCALE_DOVECOT, run.count(200, 6), run.count(10, 2), 1.6),
    )
    setups = []
    for label, config, count, boxes, gap in variants:
        name = label.split()[0]
        with run.environment(result, dovecot_config=config, name=name) as (mail, broker):
            measured = asyncio.run(_spread_latencies(run, result, broker, mail, count, boxes, gap, name))
        broker_s = [x for feed_s, _, _ in measured for x in feed_s]
        direct_s = [x for _, plain_s, _ in measured for x in plain_s]
        late = sum(n for _, _, n in measured)
        feed, direct = Latency.of(broker_s), Latency.of(direct_s)
        added = Latency.of([b - d for b, d in zip(broker_s, direct_s, strict=True)])
        result.add(
            f"{label}: delivery → event p50",
            feed.median_ms,
            "ms",
            Target("<=", 50),
            f"plain IDLE client {direct.median_ms:.3g} ms; {feed.count} deliveries",
        )
        result.add(
            f"{label}: delivery → event p99",
            feed.p99_ms,
            "ms",
            Target("<=", 250),
            f"plain IDLE client {direct.p99_ms:.3g} ms",
        )
        result.add(
            f"{label}: broker after plain IDLE, median", added.median_ms, "ms", detail=f"p99 {added.p99_ms:.3g} ms"
        )
        if late:
            result.add(f"{label}: deliveries seen late", late, "", detail=f"not within {LATE:.0f} s, of {count}")
        result.details[name] = {"broker": vars(feed), "direct": vars(direct), "added": vars(added), "late": late}
        setups.append(
            f"{label}: {count} deliveries over {boxes} mailbox{'es' if boxes > 1 else ''}, each mailbox's next "
            f"{gap * 1000:.0f} ms after its event"
        )
    result.setup = (
        f"{SEPARATE}; per mailbox one account, one WatchMailbox, and a plain imapclient IDLE on the same INBOX; "
        f"LMTP deliveries one at a time per mailbox, timed from just before MAIL FROM on an open LMTP connection to "
        f"the MessageAdded read here (and to the plain client's EXISTS); " + "; ".join(setups)
    )
    return result


async def _spread_latencies(
    run: Run,
    result: FigureResult,
    broker: BrokerProcess,
    mail: MailHarness,
    count: int,
    boxes: int,
    gap: float,
    phase: str,
) -> list[tuple[list[float], list[float], int]]:
    """``count`` deliveries over ``boxes`` mailboxes at once (see _paired_latencies), the mailboxes starting
    ``gap / boxes`` apart so that deliveries do not come in bursts."""
    per_box = [count // boxes + (i < count % boxes) for i in range(boxes)]
    # Each mailbox can hold two threads at once (a delivery, a wait for the plain client): enough for all of them,
    # so that no mailbox's delivery waits for a thread.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=2 * boxes + 4))
    async with broker.aio_channel() as channel:
        paired = (_paired_latencies(channel, mail, n, gap, gap * i / boxes) for i, n in enumerate(per_box))
        with run.profiled(result, broker.pid, phase):
            return list(await asyncio.gather(*paired))


async def _paired_latencies(
    channel: grpc.aio.Channel, mail: MailHarness, count: int, gap: float, delay: float
) -> tuple[list[float], list[float], int]:
    """On a new mailbox and account: seconds from delivery to the broker's event, and to a plain IDLE client's
    EXISTS, for each of ``count`` deliveries (the first ``delay`` seconds after the warm-up, each next one ``gap``
    after the previous event); and how many deliveries either of them did not see within LATE seconds (left out
    of both lists)."""
    box = mail.new_mailbox()
    delivered = late = 0
    feed: list[float] = []
    plain: list[float] = []
    arrivals = Arrivals()
    async with contextlib.AsyncExitStack() as cleanup:
        sender = await asyncio.to_thread(LmtpSender, mail.dovecot)
        cleanup.push_async_callback(asyncio.to_thread, sender.close)
        direct = await asyncio.to_thread(DirectIdle, mail, box.address)
        cleanup.push_async_callback(asyncio.to_thread, direct.close)
        accounts = account_stub(channel)
        account = (await accounts.ConnectImapAccount(connect_request(mail.dovecot, box), timeout=30)).name
        stream = watch(mail_stub(channel), account)
        cleanup.callback(stream.cancel)
        reader = asyncio.create_task(follow(stream, arrivals, asyncio.Event()))
        cleanup.callback(reader.cancel)

        async def deliver(subject: str) -> float:
            nonlocal delivered
            began = await asyncio.to_thread(sender.deliver, box.address, note(subject, box.address))
            delivered += 1
            return began

        # Both connections settle first: a hibernating Dovecot must not get mail in the half second before it
        # hibernates a connection (see SETTLE). Until a delivery shows up the feed is not known to be watching;
        # the warm-ups also open the broker's read connection.
        await asyncio.sleep(SETTLE)
        warm_ups = [arrivals.expect(f"warm-up {n}") for n in range(5)]
        for number in range(len(warm_ups)):
            await deliver(f"warm-up {number}")
            done, _ = await asyncio.wait(warm_ups, timeout=3, return_when=asyncio.FIRST_COMPLETED)
            if done:
                break
        else:
            raise RuntimeError("the feed never delivered an event")
        await asyncio.to_thread(direct.wait_for, delivered, 10)
        await asyncio.sleep(gap + delay)
        for index in range(count):
            arrival = arrivals.expect(f"feed {index}")
            began = await deliver(f"feed {index}")
            try:
                feed_at = await asyncio.wait_for(arrival, LATE)
                plain_at = await asyncio.to_thread(direct.wait_for, delivered, LATE)
            except TimeoutError:
                late += 1  # the next delivery wakes the watchers, and the event comes with it
            else:
                feed.append(feed_at - began)
                plain.append(plain_at - began)
            await asyncio.sleep(gap)
    return feed, plain, late


class DirectIdle:
    """A plain imapclient in IDLE on a user's INBOX, in a thread: when each EXISTS count was first seen."""

    def __init__(self, mail: MailHarness, address: str) -> None:
        self._client = mail.dovecot.imap(address)
        self._client.select_folder("INBOX", readonly=True)
        self._client.idle()
        self._seen: dict[int, float] = {}
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-direct-idle", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            responses = self._client.idle_check(timeout=0.2)
            now = time.perf_counter()
            counts = [int(r[0]) for r in responses if len(r) >= 2 and r[1] == b"EXISTS"]
            if counts:
                with self._changed:
                    for number in counts:
                        self._seen.setdefault(number, now)
                    self._changed.notify_all()

    def wait_for(self, exists: int, timeout: float) -> float:
        """When the folder was first reported to hold ``exists`` messages or more (blocks up to ``timeout``)."""
        with self._changed:
            if not self._changed.wait_for(lambda: any(n >= exists for n in self._seen), timeout):
                raise TimeoutError(f"the plain IDLE client never saw EXISTS {exists}")
            return min(when for n, when in self._seen.items() if n >= exists)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):
            self._client.idle_done()
            self._client.logout()


def watched_accounts_1000(run: Run) -> FigureResult:
    result = FigureResult("watched_accounts_1000")
    with run.environment(result, dovecot_config=SCALE_DOVECOT) as (mail, broker):
        asyncio.run(_watched_accounts(run, result, mail, broker))
        result.details["dovecot_log_problems"] = _log_problems(mail.dovecot.log_path)
    if result.details["dovecot_log_problems"]:
        result.notes.append(f"Dovecot logged {len(result.details['dovecot_log_problems'])} warnings/errors")
    return result


async def _watched_accounts(run: Run, result: FigureResult, mail: MailHarness, broker: BrokerProcess) -> None:
    account_count = run.count(1000, 50)
    delivery_count = run.count(200, 20)
    channel_count = 4
    # Spread over one period of the broker's folder-list polling in the full run: its waves of LIST commands share
    # the provider threads with the feeds' reads.
    spacing = run.count(MailConfig().folder_poll_seconds, 1.0) / delivery_count
    idle = broker.status()
    boxes = [mail.new_mailbox("watched") for _ in range(account_count)]
    channels = [broker.aio_channel() for _ in range(channel_count)]
    stubs = [mail_stub(channel) for channel in channels]
    arrivals = Arrivals()
    readers: list[asyncio.Task[None]] = []
    streams: list[grpc.aio.UnaryStreamCall[Any, Any]] = []
    sender = LmtpSender(mail.dovecot)
    try:
        started = time.monotonic()
        names = await _connect_all(channels[0], mail, boxes)
        connect_seconds = time.monotonic() - started
        connected = broker.status()

        started = time.monotonic()
        ups = [asyncio.Event() for _ in names]
        for index, (name, up) in enumerate(zip(names, ups, strict=True)):
            stream = watch(stubs[index % channel_count], name)
            streams.append(stream)
            readers.append(asyncio.create_task(follow(stream, arrivals, up)))
        await _all_up(ups, readers, timeout=HEARTBEAT_SECONDS + 120)
        feeds_seconds = time.monotonic() - started
        hibernation_seconds = await _dovecot_settled(mail, account_count)
        watching = broker.status()
        threads_watching = _threads(broker.pid)
        processes = _dovecot_processes(mail)

        chosen = random.sample(range(account_count), delivery_count)
        with (
            run.profiled(result, broker.pid, "deliveries"),
            Sampler(broker.pid, interval=0.05) as sampler,
            CpuWindow(broker.pid) as cpu,
        ):
            began, lmtp = await asyncio.to_thread(_deliver_spaced, sender, [boxes[i].address for i in chosen], spacing)
            waiting = [arrivals.expect(f"feed {n}") for n in range(delivery_count)]
            await asyncio.wait(waiting, timeout=STRAGGLERS)
        after = broker.status()
        threads_after = _threads(broker.pid)
        processes_after = _dovecot_processes(mail)
    finally:
        for stream in streams:
            stream.cancel()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for channel in channels:
            await channel.close(None)
        await asyncio.to_thread(sender.close)

    latencies = [w.result() - began[n] for n, w in enumerate(waiting) if w.done() and not w.cancelled()]
    _probe_findings(result, broker, began, waiting)
    missing = delivery_count - len(latencies)
    latency = Latency.of(latencies) if latencies else None
    threads = max(sampler.max_threads, watching.threads, after.threads)
    result.add(
        "broker threads",
        threads,
        "",
        Target("<=", 32),
        f"{watching.threads} with all feeds up, max {sampler.max_threads} while events flowed",
    )
    result.notes.append(f"broker threads after the deliveries: {threads_after}")
    result.add(
        "delivery → event p99",
        latency.p99_ms if latency else float("nan"),
        "ms",
        Target("<=", 1000),
        f"p50 {latency.median_ms:.3g} ms, max {latency.max_ms:.3g} ms" if latency else "",
    )
    result.add(
        "events not seen",
        missing,
        "",
        Target("<=", 0),
        f"of {delivery_count} deliveries, {STRAGGLERS:.0f} s after the last one",
    )
    accepted = Latency.of(lmtp)
    result.add("LMTP transaction p99", accepted.p99_ms, "ms", detail=f"max {accepted.max_ms:.3g} ms: Dovecot's share")
    result.add(
        "broker RSS, all feeds up",
        watching.rss_mib,
        "MiB",
        detail=f"{(watching.rss - connected.rss) / account_count / 1024:.0f} KiB per feed; "
        f"{connected.rss_mib - idle.rss_mib:.0f} MiB more after the ConnectImapAccount calls",
    )
    result.add("broker RSS after deliveries", max(after.rss, sampler.max_rss) / MiB, "MiB")
    result.add(
        "broker CPU while events flowed",
        cpu.process_cores * 100,
        "%",
        detail=f"of one core; the machine: {cpu.machine_cores * 100:.0f}% of one core, {cpu.cores} cores",
    )
    result.setup = (
        f"{SEPARATE}; {account_count:,} Dovecot users connected through ConnectImapAccount ({connect_seconds:.1f} s), "
        f"one WatchMailbox each over {channel_count} channels (all up in {feeds_seconds:.1f} s: first heartbeat), "
        f"Dovecot with IDLE hibernation (after {hibernation_seconds:.0f} s: {_shown(processes)}); then "
        f"{delivery_count} LMTP deliveries to distinct random accounts, one every {spacing * 1000:.0f} ms without "
        f"waiting for events (after them: {_shown(processes_after)}); broker on its default settings "
        f"({ServerConfig().blocking_threads} provider threads, folder lists polled every "
        f"{MailConfig().folder_poll_seconds:g} s)"
    )
    result.details.update(
        latency=vars(latency) if latency else None,
        idle=vars(idle),
        connected=vars(connected),
        watching=vars(watching),
        after=vars(after),
        dovecot_processes=processes,
        dovecot_processes_after=processes_after,
        broker_threads_watching=threads_watching,
        broker_threads_after=threads_after,
        connect_seconds=connect_seconds,
        feeds_seconds=feeds_seconds,
        hibernation_seconds=hibernation_seconds,
        latency_ms=[
            round((w.result() - began[n]) * 1000, 1) if w.done() and not w.cancelled() else None
            for n, w in enumerate(waiting)
        ],
        lmtp_ms=[round(x * 1000, 1) for x in lmtp],
        cpu={"broker_cores": cpu.process_cores, "machine_cores": cpu.machine_cores},
    )


def _probe_findings(
    result: FigureResult, broker: BrokerProcess, began: list[float], waiting: list[asyncio.Future[float]]
) -> None:
    """With --probe: the broker's GC pauses and event-loop stalls while the deliveries ran, and for each late event
    (> 100 ms) the pauses and stalls between its delivery and its arrival."""
    if broker.probe_path is None or not began:
        return
    records = broker.probe_records(began[0], began[-1] + STRAGGLERS)
    gcs = [r for r in records if r["kind"] == "gc"]
    stalls = [r for r in records if r["kind"] == "stall"]
    result.add(
        "broker GC pauses ≥ 5 ms while events flowed",
        len(gcs),
        "",
        detail=f"longest {max((r['ms'] for r in gcs), default=0):.0f} ms, total {sum(r['ms'] for r in gcs):.0f} ms",
    )
    result.add(
        "broker event-loop stalls ≥ 20 ms",
        len(stalls),
        "",
        detail=f"longest {max((r['ms'] for r in stalls), default=0):.0f} ms",
    )
    late = []
    for number, future in enumerate(waiting):
        if not future.done() or future.cancelled() or future.result() - began[number] < 0.1:
            continue
        window = [r for r in records if began[number] - 0.05 <= r["at"] <= future.result()]
        late.append(
            {
                "delivery": number,
                "delivered_at": round(began[number] - began[0], 3),
                "ms": round((future.result() - began[number]) * 1000, 1),
                "in_between": [{**r, "at": round(r["at"] - began[0], 3)} for r in window],
            }
        )
    result.details["probe"] = {
        "gc": [{**r, "at": round(r["at"] - began[0], 3)} for r in gcs],
        "stalls": [{**r, "at": round(r["at"] - began[0], 3)} for r in stalls],
        "late_events": late,
    }


async def _connect_all(channel: grpc.aio.Channel, mail: MailHarness, boxes: Sequence[Mailbox]) -> list[str]:
    """ConnectImapAccount for every mailbox, a few at a time (each logs in to Dovecot before it is stored)."""
    accounts = account_stub(channel)
    gate = asyncio.Semaphore(8)

    async def connect(box: Mailbox) -> str:
        async with gate:
            account = await accounts.ConnectImapAccount(connect_request(mail.dovecot, box), timeout=120)
            return str(account.name)

    return list(await asyncio.gather(*(connect(box) for box in boxes)))


async def _all_up(ups: list[asyncio.Event], readers: list[asyncio.Task[None]], timeout: float) -> None:
    """Wait until every feed has sent something; fail early if a stream ends instead."""
    waiting = asyncio.gather(*(up.wait() for up in ups))
    try:
        async with asyncio.timeout(timeout):
            while not waiting.done():
                ended = [reader for reader in readers if reader.done()]
                if ended:
                    ended[0].result()
                    raise RuntimeError("a feed ended before it was up")
                await asyncio.wait({waiting}, timeout=0.5)
    finally:
        waiting.cancel()


def _deliver_spaced(sender: LmtpSender, recipients: list[str], spacing: float) -> tuple[list[float], list[float]]:
    """Deliver "feed N" to recipients[N] every ``spacing`` seconds (blocking); return when each one began, and how
    long Dovecot took to accept it (a slow LMTP transaction is the mail server's share of a late event)."""
    began, lmtp = [], []
    next_at = time.perf_counter()
    for index, address in enumerate(recipients):
        began.append(sender.deliver(address, note(f"feed {index}", address)))
        lmtp.append(time.perf_counter() - began[-1])
        next_at += spacing
        time.sleep(max(0.0, next_at - time.perf_counter()))
    return began, lmtp


def _dovecot_processes(mail: MailHarness) -> dict[str, int]:
    """How many imap, imap-hibernate and imap-login processes the harness's Dovecot runs, and ``hibernated``:
    the connections its imap-hibernate processes hold (from their titles, with verbose_proctitle)."""
    prefix = f"dovecot-{mail.instance_name}/".encode()
    counts: dict[str, int] = {}
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            title = path.read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if not title.startswith(prefix):
            continue
        kind, _, rest = title[len(prefix) :].decode(errors="replace").partition(" ")
        if kind in ("imap", "imap-hibernate", "imap-login"):
            counts[kind] = counts.get(kind, 0) + 1
        if kind == "imap-hibernate" and (held := re.search(r"(\d+) connections", rest)):
            counts["hibernated"] = counts.get("hibernated", 0) + int(held.group(1))
    return dict(sorted(counts.items()))


def _shown(processes: dict[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in processes.items()) or "no imap processes"


async def _dovecot_settled(mail: MailHarness, accounts: int, limit: float = 120) -> float:
    """Wait until Dovecot has hibernated every watcher's connection (or the count has not grown for 10 s); mail
    for a connection about to hibernate can go unnoticed (see SETTLE). Returns the seconds waited."""
    started = time.monotonic()
    await asyncio.sleep(SETTLE)
    best, best_at = -1, time.monotonic()
    while time.monotonic() - started < limit:
        hibernated = _dovecot_processes(mail).get("hibernated", 0)
        if hibernated >= accounts:
            break
        if hibernated > best:
            best, best_at = hibernated, time.monotonic()
        elif time.monotonic() - best_at > 10:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(SETTLE)  # and let the machine go quiet
    return time.monotonic() - started


def _threads(pid: int) -> dict[str, int]:
    """Threads of a process by name: Python's from py-spy (when installed), the rest from /proc."""
    python = python_threads(pid)
    native = thread_names(pid)
    if python:
        native.pop("python", None)
    return {**python, **native}


def _log_problems(log_path: Path) -> list[str]:
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    return [line for line in lines if any(word in line for word in (" Warning: ", " Error: ", " Fatal: ", " Panic: "))]
