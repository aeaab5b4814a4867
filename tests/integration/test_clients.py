"""The consumer clients against a live broker over mTLS: clients/python (retries, resuming watch across a broker
restart), clients/node (@grpc/grpc-js on the generated JavaScript stubs) and clients/go (built offline with Debian's
Go packages), each listing accounts and following an IMAP account's feed fed by a real Dovecot."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import subprocess
import threading
import venv
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1 import resources_pb2 as rpb
from mailbroker_client import Backoff, Client, connect

from tests.broker import RunningBroker, running_broker, seed_account, stubs
from tests.integration.test_imap import connect_request, imap_config, sample
from tests.mailserver import Mailbox, MailServers
from tests.pki import PemPair, TestPki

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")


def client_for(broker: RunningBroker, who: PemPair | None = None) -> Client:
    who = who or broker.pki.alice
    return connect(broker.target, ca=broker.pki.ca, cert=who.cert, key=who.key, server_name="localhost")


@pytest.fixture
async def imap_broker(tmp_path: Path, pki: TestPki, mail_servers: MailServers) -> AsyncIterator[RunningBroker]:
    async with running_broker(imap_config(tmp_path, pki, mail_servers), pki) as running:
        yield running


async def connected_account(broker: RunningBroker, servers: MailServers, box: Mailbox) -> rpb.Account:
    async with broker.channel(broker.pki.alice) as channel:
        accounts, _ = stubs(channel)
        return await accounts.ConnectImapAccount(connect_request(servers, box), timeout=20)


class Feed:
    """A blocking iterator drained by a thread into a queue the event loop can await."""

    def __init__(self, iterator: Iterator[Any]) -> None:
        self.iterator = iterator

    async def next(self, timeout: float = 20) -> Any:
        return await asyncio.wait_for(asyncio.to_thread(next, self.iterator), timeout)

    async def next_of(self, kind: str) -> Any:
        while (event := await self.next()).WhichOneof("event") == "heartbeat":
            pass
        assert event.WhichOneof("event") == kind, event
        return event


# clients/python ------------------------------------------------------------------------------------------------


async def test_python_client_lists_and_gets_accounts_of_its_own_tenant_only(broker: RunningBroker) -> None:
    store = broker.store()
    mine = seed_account(store, broker.pki.alice.identity, email="alice@example.test")
    seed_account(store, broker.pki.bob.identity, email="bob@example.test")
    with client_for(broker) as client:
        page = await asyncio.to_thread(client.accounts.ListAccounts, apb.ListAccountsRequest(), timeout=10)
        assert [a.name for a in page.accounts] == [f"accounts/{mine.id}"]
        got = await asyncio.to_thread(
            client.accounts.GetAccount, apb.GetAccountRequest(name=f"accounts/{mine.id}"), timeout=10
        )
        assert got.email_address == "alice@example.test"
    # A certificate from another CA gets nowhere.
    with pytest.raises(grpc.RpcError) as refused, client_for(broker, broker.pki.foreign) as client:
        await asyncio.to_thread(client.accounts.ListAccounts, apb.ListAccountsRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_python_watch_resumes_across_a_broker_restart_without_losing_mail(
    tmp_path: Path, pki: TestPki, mail_servers: MailServers, mailbox: Mailbox
) -> None:
    config = imap_config(tmp_path, pki, mail_servers)
    delays: list[float] = []
    async with running_broker(config, pki) as first:
        port = first.broker.port
        account = await connected_account(first, mail_servers, mailbox)
        client = client_for(first)
        feed = Feed(client.watch(account.name, heartbeat_interval=5, backoff=Backoff(initial=0.2), sleep=delays.append))
        assert (await feed.next()).WhichOneof("event") == "heartbeat"  # the feed is live and has a token
        mail_servers.deliver(mailbox.address, sample("before the restart", to=mailbox.address))
        before = await feed.next_of("message_added")
        assert before.message_added.message.subject == "before the restart"
        # Shutting down ends the stream with UNAVAILABLE; the client keeps trying (immediately: sleep is a no-op here).
    mail_servers.deliver(mailbox.address, sample("while the broker was down", to=mailbox.address))
    fixed_port = dataclasses.replace(config, server=dataclasses.replace(config.server, listen=f"127.0.0.1:{port}"))
    try:
        async with running_broker(fixed_port, pki):
            during = await feed.next_of("message_added")
            assert during.message_added.message.subject == "while the broker was down"
            assert delays  # it did back off and reconnect
            mail_servers.deliver(mailbox.address, sample("after the restart", to=mailbox.address))
            after = await feed.next_of("message_added")
            assert after.message_added.message.subject == "after the restart"
    finally:
        client.close()


class FlakyAccounts:
    """A stand-in broker whose first two calls of each method fail with UNAVAILABLE."""

    def __init__(self) -> None:
        self.calls: dict[str, list[Any]] = {}
        self.lock = threading.Lock()

    def handler(self, method: str, response: Any) -> grpc.RpcMethodHandler:
        def behave(request: Any, context: grpc.ServicerContext) -> Any:
            with self.lock:
                seen = self.calls.setdefault(method, [])
                seen.append(request)
                attempt = len(seen)
            if attempt <= 2:
                context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
            return response

        return grpc.unary_unary_rpc_method_handler(
            behave, request_deserializer=lambda b: b, response_serializer=lambda m: m.SerializeToString()
        )


@pytest.fixture
def flaky(pki: TestPki) -> Iterator[tuple[FlakyAccounts, str]]:
    state = FlakyAccounts()
    handlers = {
        "ListAccounts": state.handler("ListAccounts", apb.ListAccountsResponse(next_page_token="ok")),
        "DeleteAccount": state.handler("DeleteAccount", rpb.ErasureReceipt()),
    }
    mail_handlers = {"SendMessage": state.handler("SendMessage", mpb.SendMessageResponse(internet_message_id="<m>"))}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler("mailbroker.v1.AccountService", handlers),
            grpc.method_handlers_generic_handler("mailbroker.v1.MailService", mail_handlers),
        )
    )
    credentials = grpc.ssl_server_credentials(
        [pki.server.key_cert_pair()], root_certificates=pki.ca.read_bytes(), require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield state, f"127.0.0.1:{port}"
    server.stop(None)


def test_grpc_retries_idempotent_reads_but_never_a_bare_send_or_a_delete(
    flaky: tuple[FlakyAccounts, str], pki: TestPki
) -> None:
    state, target = flaky
    with connect(target, ca=pki.ca, cert=pki.alice.cert, key=pki.alice.key, server_name="localhost") as client:
        page = client.accounts.ListAccounts(apb.ListAccountsRequest(page_size=7), timeout=20)
        assert page.next_page_token == "ok"
        assert len(state.calls["ListAccounts"]) == 3  # retried by gRPC from the service config

        with pytest.raises(grpc.RpcError) as failed:
            client.mail.SendMessage(mpb.SendMessageRequest(account="accounts/a"), timeout=20)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(state.calls["SendMessage"]) == 1
        with pytest.raises(grpc.RpcError):
            client.accounts.DeleteAccount(apb.DeleteAccountRequest(name="accounts/a"), timeout=20)
        assert len(state.calls["DeleteAccount"]) == 1

        sent = client.send_message(mpb.SendMessageRequest(account="accounts/a"), sleep=lambda _: None)
        assert sent.internet_message_id == "<m>"
        ids = {mpb.SendMessageRequest.FromString(raw).request_id for raw in state.calls["SendMessage"][1:]}
        assert len(state.calls["SendMessage"]) == 3 and len(ids) == 1 and "" not in ids


def test_the_client_distribution_installs_with_only_grpc_and_the_stubs(tmp_path: Path) -> None:
    env_dir = tmp_path / "consumer"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            str(ROOT / "generated" / "python"),
            str(ROOT / "clients" / "python"),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    probe = (
        "import importlib.util as u\n"
        "from mailbroker_client import connect, watch\n"
        "print(','.join(m for m in ('server', 'sqlalchemy', 'cryptography', 'grpc_status') if u.find_spec(m)))\n"
    )
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert result.stdout.strip() == ""


# clients/node and clients/go -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    if not shutil.which("go"):
        pytest.fail("go is missing: scripts/install-system-deps installs Debian's golang-go and gRPC packages")
    binary = tmp_path_factory.mktemp("go") / "mailbroker-follow"
    subprocess.run([str(ROOT / "clients" / "go" / "build"), str(binary)], check=True, capture_output=True, timeout=600)
    return [str(binary)]


def node_client() -> list[str]:
    if NODE is None:
        pytest.fail("node is missing: scripts/install-system-deps installs it")
    return [NODE, str(ROOT / "clients" / "node" / "follow.mjs")]


async def _follow_with(command: list[str], broker: RunningBroker, servers: MailServers, box: Mailbox) -> None:
    """Run a client (Node or Go, same flags) against ``broker``: it lists the account, follows its feed through a
    heartbeat to a delivered message."""
    account = await connected_account(broker, servers, box)
    flag = "--" if command[0] == NODE else "-"
    heartbeat = "5" if command[0] == NODE else "5s"
    pki = broker.pki
    args = ["target", broker.target, "ca", pki.ca, "cert", pki.alice.cert, "key", pki.alice.key, "watch", account.name]
    args += ["heartbeat", heartbeat]
    argv = [*command, *(f"{flag}{a}" if i % 2 == 0 else str(a) for i, a in enumerate(args))]
    process = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert process.stdout is not None and process.stderr is not None

    async def line() -> dict[str, Any]:
        raw = await asyncio.wait_for(process.stdout.readline(), 30)  # type: ignore[union-attr]
        if not raw:
            await process.wait()
            raise AssertionError(f"client exited {process.returncode}: {(await process.stderr.read()).decode()}")  # type: ignore[union-attr]
        return json.loads(raw)

    try:
        assert await line() == {"account": account.name, "emailAddress": box.address}
        first = await line()
        assert first["kind"] == "heartbeat" and first["event"]["resumeToken"]
        servers.deliver(box.address, sample("seen by a client", to=box.address))
        while (event := await line())["kind"] == "heartbeat":
            pass
        assert event["kind"] == "messageAdded" or event["kind"] == "message_added"
        assert event["event"]["messageAdded"]["message"]["subject"] == "seen by a client"
        assert event["event"]["resumeToken"] != first["event"]["resumeToken"]
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


async def test_node_client_lists_accounts_and_follows_a_feed(
    imap_broker: RunningBroker, mail_servers: MailServers, mailbox: Mailbox
) -> None:
    await _follow_with(node_client(), imap_broker, mail_servers, mailbox)


async def test_go_client_lists_accounts_and_follows_a_feed(
    imap_broker: RunningBroker, mail_servers: MailServers, mailbox: Mailbox, go_client: list[str]
) -> None:
    await _follow_with(go_client, imap_broker, mail_servers, mailbox)


@pytest.mark.parametrize("language", ["node", "go"])
async def test_node_and_go_clients_fail_clearly_without_a_trusted_certificate(
    broker: RunningBroker, language: str, request: pytest.FixtureRequest
) -> None:
    command = node_client() if language == "node" else request.getfixturevalue("go_client")
    flag = "--" if language == "node" else "-"
    foreign = broker.pki.foreign
    argv = [*command, f"{flag}target", broker.target, f"{flag}ca", str(broker.pki.ca)]
    argv += [f"{flag}cert", str(foreign.cert), f"{flag}key", str(foreign.key)]
    result = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip()
