"""IMAP read figures: GetMessage against imapclient (warm and naive), ListMessages over a huge folder, a large
attachment streamed. The broker runs in its own process; the load generator is this process, using the blocking
gRPC client (the lightest Python client, so the figures charge the broker rather than the caller)."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable
from typing import Any

import grpc
from imapclient import IMAPClient
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1 import resources_pb2 as rpb

from bench import messages
from bench.floor import BareServer, health_check
from bench.harness import MailHarness, Run, account_stub, connect_account, mail_stub
from bench.proc import MiB, Sampler, reset_peak
from bench.report import FigureResult, Target
from bench.stats import Latency
from tests.mailserver import Mailbox

# What the broker fetches for GetMessage (server/providers/imap/driver.py), asked for directly.
METADATA_ITEMS = [b"UID", b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"BODY.PEEK[HEADER]"]
FULL_ITEMS = [*METADATA_ITEMS, b"BODYSTRUCTURE"]
# messages.realistic(): multipart/mixed [multipart/alternative [text/plain, text/html], application/pdf]
TEXT_SECTIONS = [b"BODY.PEEK[1.1]", b"BODY.PEEK[1.2]"]
# What the broker fetches for each listed message.
LIST_ITEMS = [
    b"UID",
    b"FLAGS",
    b"INTERNALDATE",
    b"RFC822.SIZE",
    b"BODY.PEEK[HEADER.FIELDS (FROM TO CC BCC REPLY-TO SUBJECT DATE MESSAGE-ID)]",
]
MAILDIR_SETTLE = 2.5
SEPARATE = "broker in its own process (python -m server.cli serve), blocking gRPC client over mTLS on loopback"
WARMUP = 20
ROUNDS = 10


def timed(call: Callable[[], object], count: int) -> list[float]:
    """Seconds each of ``count`` calls took."""
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def interleaved(calls: dict[str, Callable[[], object]], count: int) -> dict[str, list[float]]:
    """Warm every call up, then time ``count`` of each in ROUNDS rounds of back-to-back calls (warm, as a busy
    client's are), the calls taking turns round by round: drift on the shared machine falls on all of them alike."""
    for call in calls.values():
        timed(call, WARMUP)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    per_round = max(1, count // ROUNDS)
    for _ in range(ROUNDS):
        for name, call in calls.items():
            samples[name] += timed(call, per_round)
    return samples


class OneMessage:
    """A realistic message in a fresh mailbox connected through the broker, checked to read back in full."""

    def __init__(self, mail: MailHarness, channel: grpc.Channel) -> None:
        self.box = mail.new_mailbox()
        mail.dovecot.deliver(self.box.address, messages.realistic("Benchmark: Grüße, ünïcödé", to=self.box.address))
        self.account = connect_account(channel, mail.dovecot, self.box)
        self.stub = mail_stub(channel)
        page = self.stub.ListMessages(mpb.ListMessagesRequest(parent=self.account), timeout=10)
        (summary,) = page.messages
        self.name = summary.name
        full = self.stub.GetMessage(mpb.GetMessageRequest(name=self.name, view=rpb.MESSAGE_VIEW_FULL), timeout=10)
        if not (full.text_body and full.html_body and len(full.attachments) == 1):
            raise RuntimeError("GetMessage FULL did not return both bodies and the attachment")
        self.size = summary.size_bytes

    def get(self, view: rpb.MessageView) -> Callable[[], object]:
        request = mpb.GetMessageRequest(name=self.name, view=view)
        return lambda: self.stub.GetMessage(request, timeout=10)


def _ratio_rows(result: FigureResult, label: str, broker: Latency, direct: Latency) -> None:
    result.add(
        f"{label}: broker ÷ direct, median",
        broker.median_ms / direct.median_ms,
        "x",
        Target("<=", 1.3),
        f"broker {broker.median_ms:.3g} ms / direct {direct.median_ms:.3g} ms",
    )
    result.add(
        f"{label}: broker ÷ direct, p99",
        broker.p99_ms / direct.p99_ms,
        "x",
        detail=f"broker {broker.p99_ms:.3g} ms / direct {direct.p99_ms:.3g} ms",
    )


def get_message_vs_imapclient(run: Run) -> FigureResult:
    """GetMessage through the broker vs imapclient on a logged-in, selected connection fetching the same items,
    with the calls that show where a broker call's time goes: a bare gRPC server's Health/Check (the floor),
    the broker's Health/Check (plus interceptors and the access log) and GetAccount (plus the account lookup)."""
    result = FigureResult("get_message_vs_imapclient")
    count = run.count(500, 50)
    with (
        run.environment(result) as (mail, broker),
        broker.channel() as channel,
        BareServer(run.pki, run.event_loop) as bare,
        grpc.secure_channel(bare.target, broker.credentials()) as bare_channel,
    ):
        message = OneMessage(mail, channel)
        accounts = account_stub(channel)
        get_account = apb.GetAccountRequest(name=message.account)
        with mail.dovecot.imap(message.box.address) as client:
            client.select_folder("INBOX", readonly=True)
            (uid,) = client.search("ALL")

            def direct_full() -> None:
                client.fetch([uid], FULL_ITEMS)
                client.fetch([uid], TEXT_SECTIONS)

            def direct_noop_metadata() -> None:
                client.noop()
                client.fetch([uid], METADATA_ITEMS)

            calls = {
                "direct METADATA": lambda: client.fetch([uid], METADATA_ITEMS),
                "direct NOOP + METADATA": direct_noop_metadata,
                "broker METADATA": message.get(rpb.MESSAGE_VIEW_METADATA),
                "direct FULL": direct_full,
                "broker FULL": message.get(rpb.MESSAGE_VIEW_FULL),
                "bare Health/Check": health_check(bare_channel),
                "broker Health/Check": health_check(channel),
                "broker GetAccount": lambda: accounts.GetAccount(get_account, timeout=10),
            }
            with run.profiled(result, broker.pid, "get_message"):
                samples = interleaved(calls, count)
    latency = {name: Latency.of(values) for name, values in samples.items()}
    _ratio_rows(result, "METADATA", latency["broker METADATA"], latency["direct METADATA"])
    _ratio_rows(result, "FULL", latency["broker FULL"], latency["direct FULL"])
    floor = latency["bare Health/Check"].median_ms
    direct = latency["direct METADATA"].median_ms
    result.add(
        "METADATA ratio of a broker adding nothing",
        (floor + direct) / direct,
        "x",
        detail=f"(bare gRPC round trip {floor:.3g} ms + direct {direct:.3g} ms) ÷ direct",
    )
    result.add(
        "direct NOOP + METADATA FETCH",
        latency["direct NOOP + METADATA"].median_ms,
        "ms",
        detail="one more IMAP round trip; the broker sends the FETCH alone (a NOOP only on a connection idle 30 s)",
    )
    steps = [
        ("bare grpc.aio Health/Check, mTLS", "bare Health/Check"),
        ("broker Health/Check: + interceptors, access log", "broker Health/Check"),
        ("broker GetAccount: + account lookup", "broker GetAccount"),
        ("broker GetMessage METADATA: + driver, IMAP", "broker METADATA"),
    ]
    previous = 0.0
    for label, name in steps:
        median = latency[name].median_ms
        result.add(label, median, "ms", detail=f"+{median - previous:.3g} ms" if previous else "the floor")
        previous = median
    result.setup = (
        f"{SEPARATE}; one {message.size:,}-byte message (text + HTML + 32 KiB PDF), warm channel and pool; direct = "
        f"imapclient on one logged-in connection with INBOX examined, same FETCH items (FULL: BODYSTRUCTURE, then "
        f"both text parts); bare = grpc.aio Health only, same mTLS, own process; {count} calls each after {WARMUP} "
        f"warm-up calls, in {ROUNDS} rounds of back-to-back calls taking turns; medians"
    )
    result.details["latency"] = {name: vars(value) for name, value in latency.items()}
    return result


def naive_vs_broker(run: Run) -> FigureResult:
    """A naive integration (connect, TLS, login, examine, fetch, logout per call) against GetMessage METADATA."""
    result = FigureResult("naive_vs_broker")
    count = run.count(200, 20)
    with run.environment(result) as (mail, broker), broker.channel() as channel:
        message = OneMessage(mail, channel)
        dovecot = mail.dovecot
        context = dovecot.tls.client_context()  # made once: a naive client that rebuilt it per call would be slower

        def naive() -> None:
            client = IMAPClient(dovecot.host, port=dovecot.imap_port, ssl=True, ssl_context=context, timeout=10)
            try:
                client.login(*message.box)
                client.select_folder("INBOX", readonly=True)
                client.fetch(client.search("ALL"), METADATA_ITEMS)
            finally:
                client.logout()

        with run.profiled(result, broker.pid, "naive_vs_broker"):
            samples = interleaved({"naive": naive, "broker": message.get(rpb.MESSAGE_VIEW_METADATA)}, count)
    naive_latency, broker_latency = Latency.of(samples["naive"]), Latency.of(samples["broker"])
    result.add(
        "naive ÷ broker, median",
        naive_latency.median_ms / broker_latency.median_ms,
        "x",
        Target(">=", 5),
        f"naive {naive_latency.median_ms:.3g} ms / broker {broker_latency.median_ms:.3g} ms",
    )
    result.add(
        "naive ÷ broker, p99",
        naive_latency.p99_ms / broker_latency.p99_ms,
        "x",
        detail=f"naive {naive_latency.p99_ms:.3g} ms / broker {broker_latency.p99_ms:.3g} ms",
    )
    result.setup = (
        f"{SEPARATE}; naive = a new IMAPS connection per call (TLS, LOGIN, EXAMINE, SEARCH, FETCH headers+flags, "
        f"LOGOUT; SSL context reused) vs GetMessage METADATA; {count} calls each in {ROUNDS} rounds taking turns"
    )
    result.details["latency"] = {"naive": vars(naive_latency), "broker": vars(broker_latency)}
    return result


def list_messages_100k(run: Run) -> FigureResult:
    """Page through a huge folder with ListMessages: per-page latency by depth and the broker's memory; and the
    IMAP work of a page done directly, with and without selecting the folder again, on a twin folder."""
    result = FigureResult("list_messages_100k")
    count = run.count(100_000, 5_000)
    page_size = 100
    with run.environment(result) as (mail, broker), broker.channel() as channel:
        (box, twin), fill_seconds, index_seconds = _filled_mailboxes(mail, count, 2)
        account = connect_account(channel, mail.dovecot, box)
        stub = mail_stub(channel)
        before = broker.status()
        reset_peak(broker.pid)
        pages: list[float] = []
        rss: list[int] = []
        seen = 0
        newest = ""
        token = ""
        with run.profiled(result, broker.pid, "paging"):
            while True:
                request = mpb.ListMessagesRequest(parent=account, page_size=page_size, page_token=token)
                began = time.perf_counter()
                page = stub.ListMessages(request, timeout=60)
                pages.append(time.perf_counter() - began)
                rss.append(broker.status().rss)
                newest = newest or page.messages[0].subject
                seen += len(page.messages)
                token = page.next_page_token
                if not token:
                    break
        after = broker.status()
        reselect = Latency.of(_direct_pages(mail, twin.address, count, page_size, offset=3, reselect=True))
        noop = Latency.of(_direct_pages(mail, twin.address, count, page_size, offset=7, reselect=False))
    if seen != count or newest != f"Message number {count - 1}":
        raise RuntimeError(f"paging saw {seen} messages (newest {newest!r}), expected {count}")
    latency = Latency.of(pages)
    middle, deep = len(pages) // 2, len(pages) - 1
    result.add("first page", pages[0] * 1000, "ms")
    result.add(f"middle page (#{middle + 1})", pages[middle] * 1000, "ms")
    result.add(f"deepest page (#{deep + 1})", pages[deep] * 1000, "ms")
    result.add("all pages, median", latency.median_ms, "ms", detail=f"p99 {latency.p99_ms:.3g} ms")
    result.add(
        "direct page: EXAMINE + ESEARCH + FETCH",
        reselect.median_ms,
        "ms",
        detail="median; the IMAP commands the broker sends per page",
    )
    result.add(
        "direct page: NOOP + ESEARCH + FETCH",
        noop.median_ms,
        "ms",
        detail="median; the same on the folder already selected",
    )
    peak = max(after.hwm, *rss)
    result.add(
        "broker RSS growth while paging",
        (peak - before.rss) / MiB,
        "MiB",
        Target("<=", 16),
        f"RSS {before.rss_mib:.0f} → {after.rss_mib:.0f} MiB, peak {peak / MiB:.0f} MiB",
    )
    tenth = len(rss) // 10
    result.add(
        "RSS drift, page 10% → last",
        (rss[-1] - rss[tenth]) / MiB,
        "MiB",
        detail="≈0 when memory does not grow with depth",
    )
    result.setup = (
        f"{SEPARATE}; {count:,} messages written into INBOX (Maildir, {fill_seconds:.1f} s), left "
        f"{MAILDIR_SETTLE:.0f} s and opened read-write once as an established mailbox would be (Dovecot indexed it "
        f"in {index_seconds:.1f} s); paged newest first with page_size={page_size} ({len(pages)} pages); direct "
        f"pages sampled every 10th page on a twin folder (cold Dovecot caches alike); peak RSS from VmHWM reset "
        f"before the first page"
    )
    result.details.update(
        latency=vars(latency),
        direct_reselect=vars(reselect),
        direct_noop=vars(noop),
        page_ms=[round(p * 1000, 3) for p in pages],
        rss_before=before.rss,
        rss_after=after.rss,
        hwm=after.hwm,
        fill_seconds=fill_seconds,
        index_seconds=index_seconds,
    )
    return result


def _filled_mailboxes(mail: MailHarness, count: int, number: int) -> tuple[list[Mailbox], float, float]:
    """Mailboxes with ``count`` small messages in INBOX each, settled as long-lived ones; the seconds it took to
    fill one and for Dovecot to index one."""
    boxes = [mail.new_mailbox() for _ in range(number)]
    started = time.monotonic()
    for box in boxes:
        mail.dovecot.bulk_fill(box.address, "INBOX", count, messages.filler)
    fill_seconds = (time.monotonic() - started) / number
    # Dovecot trusts a Maildir directory's mtime only once it is a little old: until then every open of the folder
    # reads all its file names again (250 ms rather than 80 ms per SELECT at 100,000 messages here).
    time.sleep(MAILDIR_SETTLE)
    started = time.monotonic()
    for box in boxes:
        with mail.dovecot.imap(box.address, timeout=600) as client:
            exists = client.select_folder("INBOX")[b"EXISTS"]
        if exists != count:
            raise RuntimeError(f"Dovecot sees {exists} messages, {count} were written")
    return boxes, fill_seconds, (time.monotonic() - started) / number


def _direct_pages(
    mail: MailHarness, address: str, count: int, page_size: int, *, offset: int, reselect: bool
) -> list[float]:
    """Seconds per page for what a page takes in IMAP, done with imapclient on every 10th page (from ``offset``):
    EXAMINE again (``reselect``) or NOOP, count the messages below the previous page (ESEARCH), FETCH the page by
    sequence number. Messages were bulk-filled, so UIDs and sequence numbers coincide."""
    samples = []
    with mail.dovecot.imap(address, timeout=600) as client:
        client.select_folder("INBOX", readonly=True)
        for page in range(offset, count // page_size, 10):
            top = count - page * page_size
            began = time.perf_counter()
            if reselect:
                client.select_folder("INBOX", readonly=True)
            else:
                client.noop()
            client._raw_command_untagged(  # imapclient has no ESEARCH RETURN API
                b"SEARCH", [b"RETURN", b"(COUNT)", b"UID", f"1:{top}".encode()], uid=False, response_name="ESEARCH"
            )
            client.use_uid = False
            try:
                client.fetch(list(range(max(1, top - page_size + 1), top + 1)), LIST_ITEMS)
            finally:
                client.use_uid = True
            samples.append(time.perf_counter() - began)
    return samples


def attachment_25mb(run: Run) -> FigureResult:
    """A 25 MiB attachment streamed through GetAttachment: throughput and the broker's peak memory growth."""
    result = FigureResult("attachment_25mb")
    size = run.count(25 * MiB, 5 * MiB)
    with run.environment(result) as (mail, broker), broker.channel() as channel:
        box = mail.new_mailbox()
        raw, payload = messages.with_attachment(size, to=box.address)
        mail.dovecot.bulk_fill(box.address, "INBOX", 1, lambda _: raw)
        account = connect_account(channel, mail.dovecot, box)
        stub = mail_stub(channel)
        (summary,) = stub.ListMessages(mpb.ListMessagesRequest(parent=account), timeout=10).messages
        full = stub.GetMessage(mpb.GetMessageRequest(name=summary.name, view=rpb.MESSAGE_VIEW_FULL), timeout=10)
        (attachment,) = full.attachments
        before = broker.status()
        reset_peak(broker.pid)
        digest = hashlib.sha256()
        received = chunks = 0
        with run.profiled(result, broker.pid, "stream"), Sampler(broker.pid, interval=0.005) as sampler:
            started = time.perf_counter()
            for chunk in stub.GetAttachment(mpb.GetAttachmentRequest(name=attachment.name), timeout=300):
                digest.update(chunk.data)
                received += len(chunk.data)
                chunks += 1
            elapsed = time.perf_counter() - started
        after = broker.status()
        direct_seconds = _direct_stream(mail, box.address, summary.size_bytes)
    if received != size or digest.digest() != hashlib.sha256(payload).digest():
        raise RuntimeError(f"GetAttachment returned {received} bytes that do not match the {size} attached")
    peak = max(after.hwm, sampler.max_rss)
    result.add(
        "broker peak RSS growth",
        (peak - before.rss) / MiB,
        "MiB",
        Target("<=", 16),
        f"RSS {before.rss_mib:.0f} → peak {peak / MiB:.0f} MiB",
    )
    result.add("throughput", size / elapsed / 1e6, "MB/s", detail=f"{elapsed:.2f} s for {size / MiB:.0f} MiB")
    result.add(
        "direct imapclient, same 64 KiB partial fetches",
        size / direct_seconds / 1e6,
        "MB/s",
        detail="decoded here; context for the figure above",
    )
    result.setup = (
        f"{SEPARATE}; one message with a {size / MiB:.0f} MiB binary attachment (base64 on the IMAP side), streamed "
        f"in {chunks} chunks and checked by SHA-256; peak RSS = max(VmHWM after a clear_refs reset, 5 ms samples)"
    )
    result.details.update(rss_before=before.rss, hwm=after.hwm, sampled_max_rss=sampler.max_rss, chunks=chunks)
    return result


def _direct_stream(mail: MailHarness, address: str, message_size: int) -> float:
    """Seconds for imapclient to read part 2 in 64 KiB partial fetches and base64-decode it, as the driver does."""
    step = 64 * 1024
    with mail.dovecot.imap(address, timeout=60) as client:
        client.select_folder("INBOX", readonly=True)
        (uid,) = client.search("ALL")
        started = time.perf_counter()
        offset = 0
        pending = b""
        while offset < message_size:
            data: dict[bytes, Any] = client.fetch([uid], [f"BODY.PEEK[2]<{offset}.{step}>".encode()])[uid]
            piece = next((v for k, v in data.items() if k.startswith(b"BODY[2]")), b"") or b""
            offset += step
            pending += piece.replace(b"\r\n", b"")
            usable = len(pending) - len(pending) % 4
            base64.b64decode(pending[:usable])
            pending = pending[usable:]
            if len(piece) < step:
                break
        return time.perf_counter() - started
