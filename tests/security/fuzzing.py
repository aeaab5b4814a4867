"""Structure-aware fuzzing of every RPC: hypothesis strategies built from the request messages' descriptors, sent to
a live broker (real gRPC over mTLS on loopback). Used by tests/security/test_fuzz.py (short, in CI) and
bench/fuzz.py (long).

What counts as a failure: a status INTERNAL, or UNKNOWN without the broker's own reason (an exception that escaped
the error mapping), or the broker not answering its health check afterwards. Every other status is the broker
refusing or failing the input on purpose. The fuzzed broker cannot reach any mail server: its resolver answers a
documentation address for every name (refused by the SSRF guard), so nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st
from mailbroker.v1 import account_service_pb2, mail_service_pb2

from server.app import Broker, start
from server.cli import event_loop_factory
from server.config import Config
from server.domain.models import Capability
from server.providers.imap import ids, network
from tests.broker import RunningBroker, broker_config, error_reason, seed_account
from tests.pki import TestPki

SERVICES = (
    account_service_pb2.DESCRIPTOR.services_by_name["AccountService"],
    mail_service_pb2.DESCRIPTOR.services_by_name["MailService"],
)
METHODS: tuple[MethodDescriptor, ...] = tuple(m for s in SERVICES for m in s.methods)
CALL_TIMEOUT_SECONDS = 5.0
# What a name resolves to in the fuzzed broker: TEST-NET-1 (RFC 5737), never routed and refused by the guard.
UNROUTED = "192.0.2.1"

_INT32 = (-(2**31), -1, 0, 1, 2, 49, 50, 51, 499, 500, 501, 999, 1000, 1001, 65535, 65536, 2**31 - 1)
_INT64 = (-(2**63), -1, 0, 1, 4, 5, 299, 300, 301, 315_576_000_000, 315_576_000_001, 2**63 - 1)
_LENGTHS = (63, 64, 65, 128, 129, 253, 254, 255, 256, 257, 320, 321, 512, 513, 998, 999, 1000, 1001, 1024, 1025, 4097)
_TRICKY = (
    "",
    " ",
    "\r\n",
    "a\r\nBcc: victim@example.test",
    "x\nSubject: injected",
    "nul\0byte",
    "\u2028",
    "\u0085",
    "=?utf-8?b?AA==?=",
    "%0d%0a",
    "../../etc/passwd",
    "*",
    "INBOX",
    '"quoted"',
    "{5}\r\nhello",
    "(ALL)",
    "a" * 70,
    "é" * 300,
    "😀" * 200,
    "127.0.0.1",
    "::1",
    "::ffff:127.0.0.1",
    "169.254.169.254",
    "localhost",
    "user@example.test",
    "<id@example.test>",
    "Ünïcödé <u@exämple.test>",
    "-1",
    "https://example.test/cb",
)


def _text(names: tuple[str, ...]) -> st.SearchStrategy[str]:
    pieces = st.sampled_from(_TRICKY + names)
    return st.one_of(
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=80),
        pieces,
        st.builds(lambda a, b: a + b, pieces, pieces),
        st.builds(lambda c, n: c * n, st.sampled_from("ax.é\r"), st.sampled_from(_LENGTHS)),
        st.builds(lambda n, suffix: n + suffix, st.sampled_from(names or ("accounts/x",)), st.sampled_from(_TRICKY)),
    )


def _scalar(f: FieldDescriptor, names: tuple[str, ...]) -> st.SearchStrategy[Any]:
    kind = f.type
    if kind == FieldDescriptor.TYPE_STRING:
        return _text(names)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=256), st.sampled_from((b"", b"\0" * 70_000, b"x" * 1_000_000)))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(values), st.integers(-(2**31), 2**31 - 1))
    if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return st.one_of(st.sampled_from(_INT32), st.integers(-(2**31), 2**31 - 1))
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.one_of(st.sampled_from(_INT64), st.integers(-(2**63), 2**63 - 1))
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    raise NotImplementedError(f"field type {kind}")


def message_strategy(descriptor: Descriptor, names: tuple[str, ...] = (), depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of ``descriptor``'s type: any subset of fields set, each to a value of its type (edges, limits and
    injection attempts mixed in); repeated fields short, or just around the broker's count limits."""
    cls = message_factory.GetMessageClass(descriptor)
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for f in descriptor.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 4:
                continue
            single = message_strategy(f.message_type, names, depth + 1)
        else:
            single = _scalar(f, names)
        if f.is_repeated:
            optional[f.name] = st.one_of(
                st.lists(single, max_size=4),
                st.lists(single, min_size=19, max_size=22),
                st.lists(single, min_size=99, max_size=102),
            )
        else:
            optional[f.name] = single
    # Only one member of a oneof is set (the constructor refuses two).
    oneofs = {f.name: o.name for o in descriptor.oneofs for f in o.fields if not o.name.startswith("_")}

    def build(values: dict[str, Any]) -> Any:
        seen: set[str] = set()
        kept = {}
        for key, value in values.items():
            group = oneofs.get(key)
            if group is not None:
                if group in seen:
                    continue
                seen.add(group)
            kept[key] = value
        return cls(**kept)

    return st.fixed_dictionaries({}, optional=optional).map(build)


def resource_names(account_id: str) -> tuple[str, ...]:
    """Names that pass the broker's name parsing for a real account, so inputs reach the domain and the driver."""
    account = f"accounts/{account_id}"
    message = ids.MessageRef("INBOX", 1, 1).id()
    return (
        account,
        f"{account}/folders/{ids.folder_id('INBOX')}",
        f"{account}/folders/{ids.folder_id('a/../b')}",
        f"{account}/messages/{message}",
        f"{account}/messages/{message}/attachments/{ids.part_id('2')}",
        f"{account}/messages/AAAA",
        "accounts/zzzzzzzzzz",
    )


@dataclass
class Outcomes:
    """What the fuzzer saw; ``failures`` keeps the method and status of each failure, never the input."""

    inputs: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def internal(self) -> int:
        return len(self.failures)


class FuzzClient:
    """Calls any method with any request on one mTLS channel and files the outcome."""

    def __init__(self, channel: grpc.Channel, outcomes: Outcomes) -> None:
        self._channel = channel
        self.outcomes = outcomes
        self._calls: dict[str, Callable[..., Any]] = {}
        for method in METHODS:
            path = f"/{method.containing_service.full_name}/{method.name}"
            output = message_factory.GetMessageClass(method.output_type)
            make = self._channel.unary_stream if method.server_streaming else self._channel.unary_unary
            self._calls[method.name] = make(
                path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=output.FromString
            )

    def call(self, method: MethodDescriptor, request: Any) -> None:
        self.outcomes.inputs += 1
        try:
            reply = self._calls[method.name](request, timeout=CALL_TIMEOUT_SECONDS)
            if method.server_streaming:
                for _ in zip(range(3), reply, strict=False):  # a few events are enough; a feed never ends by itself
                    pass
                reply.cancel()
            code = "OK"
        except grpc.RpcError as error:
            code = error.code().name  # type: ignore[attr-defined]
            reason = error_reason(error)  # type: ignore[arg-type]
            if code == "INTERNAL" or (code == "UNKNOWN" and reason != "SEND_OUTCOME_UNKNOWN"):
                self.outcomes.failures.append((method.name, code, reason))
        self.outcomes.codes[code] += 1

    def healthy(self) -> bool:
        stub = health_pb2_grpc.HealthStub(self._channel)  # type: ignore[no-untyped-call]
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def fuzz_config(tmp_path: Path, pki: TestPki) -> Config:
    """The tests' broker config without the loopback allowance: the guard refuses every mail server."""
    config = broker_config(tmp_path, pki)
    return Config(**{**config.__dict__, "imap": type(config.imap)()})


@contextmanager
def fuzzed_broker(tmp_path: Path, pki: TestPki) -> Iterator[tuple[FuzzClient, tuple[str, ...]]]:
    """A broker on its own event loop thread, a seeded account of alice's, an mTLS channel as alice, and the
    resource names that reach that account."""
    config = fuzz_config(tmp_path, pki)
    loop = (event_loop_factory(config.server.event_loop) or asyncio.new_event_loop)()  # the loop a broker runs on
    ready = threading.Event()
    holder: dict[str, Broker] = {}
    original = network.resolve
    network.resolve = lambda host, port: [UNROUTED]

    async def serve() -> None:
        holder["broker"] = await start(config, environ={})
        ready.set()

    thread = threading.Thread(target=lambda: loop.run_forever(), name="fuzzed-broker", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(serve(), loop).result(timeout=60)
        running = RunningBroker(holder["broker"], config, pki)
        store = running.store()
        account = seed_account(store, pki.alice.identity, capabilities=frozenset(Capability))
        key, cert = pki.alice.key_cert_pair()
        credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes(), key, cert)
        with grpc.secure_channel(running.target, credentials) as channel:
            yield FuzzClient(channel, Outcomes()), resource_names(account.id)
    finally:
        network.resolve = original
        if "broker" in holder:
            asyncio.run_coroutine_threadsafe(holder["broker"].stop(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def fuzz_method(
    client: FuzzClient, method: MethodDescriptor, names: tuple[str, ...], examples: int, *, seed: int | None = None
) -> None:
    """Send ``examples`` generated requests to ``method``: derandomized without a seed (the same inputs every run),
    else drawn from ``seed``."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed

    @settings(
        max_examples=examples,
        derandomize=seed is None,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(message_strategy(method.input_type, names))
    def fuzz(request: Any) -> None:
        client.call(method, request)

    if seed is not None:
        fuzz = hypothesis_seed(seed)(fuzz)
    fuzz()
