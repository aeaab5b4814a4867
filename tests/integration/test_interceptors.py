"""The interceptor chain on a small generic service over real mTLS: identity in the handler, draining streams,
unexpected errors, request ids."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from server.config import PolicyConfig, PolicyRule
from server.domain.policy import Policy
from server.interceptors.access_log import AccessLogInterceptor
from server.interceptors.authentication import AuthenticationInterceptor
from server.interceptors.authorization import AuthorizationInterceptor
from server.interceptors.context import current_principal
from server.interceptors.draining import DrainingInterceptor
from server.interceptors.errors import ErrorMappingInterceptor
from server.interceptors.wrapping import Pipeline
from tests.broker import error_reason
from tests.pki import TestPki, make_test_pki


async def whoami(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    principal = current_principal.get()
    return f"{principal.identity}|{principal.tenant}".encode()


async def ticks(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
    n = 0
    while True:
        yield str(n).encode()
        n += 1
        await asyncio.sleep(0.02)


async def explode(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    raise RuntimeError("canary-unexpected")


@pytest.fixture(params=["one interceptor each", "pipeline"])
async def served(tmp_path: Any, request: pytest.FixtureRequest) -> AsyncIterator[tuple[TestPki, str, asyncio.Event]]:
    pki = make_test_pki(tmp_path)
    policy = Policy.from_config(PolicyConfig(rules=(PolicyRule(identities=(pki.alice.identity,), methods=("*",)),)))
    draining = asyncio.Event()
    steps = [AccessLogInterceptor(), AuthenticationInterceptor(policy), AuthorizationInterceptor(policy)]
    interceptors: list[grpc.aio.ServerInterceptor] = (  # type: ignore[type-arg]
        [*steps, DrainingInterceptor(draining), ErrorMappingInterceptor()]
        if request.param == "one interceptor each"
        else [Pipeline([*steps, ErrorMappingInterceptor()]), DrainingInterceptor(draining)]  # as the broker has them
    )
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Probe",
                {
                    "Whoami": grpc.unary_unary_rpc_method_handler(whoami),
                    "Ticks": grpc.unary_stream_rpc_method_handler(ticks),
                    "Explode": grpc.unary_unary_rpc_method_handler(explode),
                },
            )
        ]
    )
    key, cert = pki.server.key_cert_pair()
    credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=pki.ca_pem(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    yield pki, f"127.0.0.1:{port}", draining
    await server.stop(0)


def _channel(pki: TestPki, target: str) -> grpc.aio.Channel:
    key, cert = pki.alice.key_cert_pair()
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem(), private_key=key, certificate_chain=cert)
    return grpc.aio.secure_channel(target, creds)


async def test_the_principal_reaches_the_handler_and_the_request_id_comes_back(served: Any) -> None:
    pki, target, _ = served
    async with _channel(pki, target) as channel:
        call = channel.unary_unary("/test.Probe/Whoami")(b"", metadata=(("x-request-id", "req-12345678"),), timeout=5)
        assert await call == f"{pki.alice.identity}|{pki.alice.identity}".encode()
        assert ("x-request-id", "req-12345678") in tuple(await call.trailing_metadata())


async def _read_to_end(stream: Any) -> None:
    while await stream.read() is not grpc.aio.EOF:
        pass


async def test_draining_ends_open_streams_with_unavailable_at_once(served: Any) -> None:
    pki, target, draining = served
    async with _channel(pki, target) as channel:
        stream = channel.unary_stream("/test.Probe/Ticks")(b"", timeout=10)
        received = [await stream.read() for _ in range(3)]
        assert received == [b"0", b"1", b"2"]
        draining.set()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _read_to_end(stream)
        assert (caught.value.code(), error_reason(caught.value)) == (
            grpc.StatusCode.UNAVAILABLE,
            "SERVER_SHUTTING_DOWN",
        )
        assert loop.time() - started < 2


async def test_an_unexpected_exception_is_internal_without_its_text(served: Any) -> None:
    pki, target, _ = served
    async with _channel(pki, target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/test.Probe/Explode")(b"", timeout=5)
    assert (caught.value.code(), error_reason(caught.value)) == (grpc.StatusCode.INTERNAL, "INTERNAL")
    assert "canary" not in (caught.value.details() or "")
