"""Prometheus metrics: a real broker with [metrics] on a free loopback port, real calls (Dovecot, the Google emulator),
/metrics scraped over HTTP with urllib. Counters and label sets are asserted, never timings; canaries (addresses,
passwords, account ids, identities, subjects, junk method paths) must never reach the scrape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
from google.protobuf import duration_pb2
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1 import resources_pb2 as rpb
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server import config as config_module
from server.app import start
from server.config import Config, MailConfig, MetricsConfig
from server.errors import ConfigurationError
from server.metrics import Metrics, server_methods
from tests.broker import RunningBroker, broker_config, error_reason, running_broker, stubs
from tests.emulators.google import GoogleEmulator
from tests.emulators.google.fixtures import google_emulator  # noqa: F401 - a fixture, found by name
from tests.mailserver import Mailbox, MailServers
from tests.pki import TestPki

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

ALL = [rpb.CAPABILITY_METADATA, rpb.CAPABILITY_READ, rpb.CAPABILITY_SEND]
LABEL_NAMES = {"method", "code", "provider", "outcome", "state", "pool", "le"}
METHOD_LABELS = {m.removeprefix("/") for m in server_methods()} | {"unknown"}
CODES = {code.name for code in grpc.StatusCode}
WRONG_PASSWORD = "canary-wrong-password-7f3a"
SUBJECT = "canary subject 5c1e"
JUNK_METHOD = "/canary.Fuzz/canary_tenant_billing_9d2b"
REDIRECT_URI = "https://app.example.test/oauth/callback"
GMAIL_USER = "canary.metrics.user@example.test"


def _metrics_config(config: Config, listen: str = "127.0.0.1:0") -> Config:
    return dataclasses.replace(config, metrics=MetricsConfig(listen=listen))


def _scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return str(response.read().decode("utf-8"))


async def _scrape(broker: RunningBroker) -> tuple[str, Samples]:
    assert broker.broker.metrics_port
    text = await asyncio.to_thread(_scrape_text, broker.broker.metrics_port)
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


async def _scrape_until(broker: RunningBroker, done: Callable[[Samples], bool]) -> tuple[str, Samples]:
    """Scrape until ``done`` holds (a feed opening or closing takes a moment), at most about ten seconds."""
    for _ in range(200):
        text, samples = await _scrape(broker)
        if done(samples):
            break
        await asyncio.sleep(0.05)
    return text, samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _assert_labels_bounded(samples: Samples) -> None:
    """Every label of the broker's own metrics is one of a few names, with a value from a fixed set."""
    for name, labels in samples:
        if not name.startswith("mailbroker_"):
            continue
        for key, value in labels:
            assert key in LABEL_NAMES, (name, key)
            if key == "method":
                assert value in METHOD_LABELS, (name, "an unexpected method label")
            if key == "code":
                assert value in CODES, (name, "an unexpected code label")
            if key == "provider":
                assert value in {"google", "microsoft", "imap", "smtp"}, (name, "an unexpected provider label")


def _assert_no_canary(text: str, canaries: Iterable[str]) -> None:
    for index, canary in enumerate(canaries):
        assert canary and canary.lower() not in text.lower(), f"canary #{index} in the scrape"


def _listening_ports() -> set[int]:
    """TCP ports this process listens on (from /proc: the sockets among its file descriptors in state LISTEN)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def _fails(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


# -- config --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "[::]:9464", "192.0.2.10:9464", "metrics.example.test:9464"])
def test_config_refuses_a_non_loopback_listen_unless_allowed(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigurationError, match="not a loopback address"):
        config_module.load(environ={"MAILBROKER_METRICS_LISTEN": listen})
    file = tmp_path / "broker.toml"
    file.write_text(f'[metrics]\nlisten = "{listen}"\nallow_non_loopback = true\n', encoding="utf-8")
    assert config_module.load(file).metrics.listen == listen


@pytest.mark.parametrize("listen", ["127.0.0.1:9464", "[::1]:9464", "localhost:0", "127.0.0.2:1"])
def test_config_takes_a_loopback_listen(listen: str) -> None:
    assert config_module.load(environ={"MAILBROKER_METRICS_LISTEN": listen}).metrics.listen == listen


@pytest.mark.parametrize("listen", ["9464", ":9464", "127.0.0.1:", "127.0.0.1:70000"])
def test_config_refuses_a_listen_that_is_not_host_port(listen: str) -> None:
    with pytest.raises(ConfigurationError, match=r"metrics\.listen must be HOST:PORT"):
        config_module.load(environ={"MAILBROKER_METRICS_LISTEN": listen})


def test_metrics_are_off_by_default() -> None:
    assert config_module.load(environ={}).metrics.listen == ""


async def test_start_refuses_a_non_loopback_listen_in_a_config_built_in_code(tmp_path: Path, pki: TestPki) -> None:
    config = _metrics_config(broker_config(tmp_path, pki), "0.0.0.0:0")
    with pytest.raises(ConfigurationError, match="not a loopback address"):
        await start(config, environ={})


async def test_a_metrics_port_in_use_is_a_config_error(tmp_path: Path, pki: TestPki) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = _metrics_config(broker_config(tmp_path, pki), f"127.0.0.1:{taken.getsockname()[1]}")
        with pytest.raises(ConfigurationError, match="cannot serve metrics"):
            await start(config, environ={})


async def test_off_by_default_no_port_is_bound(tmp_path: Path, pki: TestPki) -> None:
    before = _listening_ports()
    async with running_broker(broker_config(tmp_path, pki), pki) as running:
        assert running.broker.metrics is None and running.broker.metrics_port is None
        assert _listening_ports() - before == {running.broker.port}
    # The same count with metrics on sees the second port: the check above can fail.
    async with running_broker(_metrics_config(broker_config(tmp_path, pki)), pki) as running:
        assert _listening_ports() - before == {running.broker.port, running.broker.metrics_port}
    assert running.broker.metrics_port not in _listening_ports(), "the /metrics listener outlived the broker"


def test_each_broker_has_its_own_registry_and_unknown_methods_share_one_label() -> None:
    first, second = Metrics(), Metrics()
    first.observe_rpc("/mailbroker.v1.AccountService/GetAccount", "OK", 0.01)
    for junk in ("/canary.Fuzz/a", "/canary.Fuzz/b", "/x", ""):
        first.observe_rpc(junk, "UNIMPLEMENTED", 0.0)
    text = generate_latest(first.registry).decode()
    assert 'mailbroker_rpc_handled_total{code="OK",method="mailbroker.v1.AccountService/GetAccount"} 1.0' in text
    assert 'mailbroker_rpc_handled_total{code="UNIMPLEMENTED",method="unknown"} 4.0' in text
    assert "canary" not in text
    assert "mailbroker_rpc_handled_total{" not in generate_latest(second.registry).decode()


# -- IMAP: RPCs, provider calls, feeds, pools ----------------------------------------------------------------------


async def test_imap_calls_move_the_counters_with_bounded_labels_and_no_canary(
    tmp_path: Path, pki: TestPki, mail_servers: MailServers, mailbox: Mailbox
) -> None:
    config = broker_config(tmp_path, pki)
    config = dataclasses.replace(
        _metrics_config(config),
        imap=dataclasses.replace(config.imap, ca_file=mail_servers.ca_path),
        mail=MailConfig(folder_poll_seconds=0.5),
    )

    def connect(password: str) -> apb.ConnectImapAccountRequest:
        security = rpb.TRANSPORT_SECURITY_IMPLICIT_TLS
        return apb.ConnectImapAccountRequest(
            imap_server=rpb.MailServer(host=mail_servers.host, port=mail_servers.imap_port, security=security),
            smtp_server=rpb.MailServer(host=mail_servers.host, port=mail_servers.smtps_port, security=security),
            username=mailbox.address,
            password=password,
            capabilities=ALL,
        )

    async with running_broker(config, pki) as broker, broker.channel(pki.alice) as channel:
        accounts, mail = stubs(channel)
        error = await _fails(accounts.ConnectImapAccount(connect(WRONG_PASSWORD), timeout=20))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.UNAUTHENTICATED, "PROVIDER_AUTH_FAILED")
        account = await accounts.ConnectImapAccount(connect(mailbox.password), timeout=20)
        account_id = account.name.split("/")[1]
        error = await _fails(accounts.GetAccount(apb.GetAccountRequest(name="accounts/a" + "2" * 24), timeout=10))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10)
        await mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=10)
        await mail.SendMessage(
            mpb.SendMessageRequest(
                account=account.name,
                message=mpb.OutgoingMessage(
                    to_recipients=[rpb.EmailAddress(address=mailbox.address)], subject=SUBJECT, text_body=SUBJECT
                ),
            ),
            timeout=20,
        )
        junk = channel.unary_unary(JUNK_METHOD)
        error = await _fails(junk(b"", timeout=5))
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED

        stream = mail.WatchMailbox(
            mpb.WatchMailboxRequest(account=account.name, heartbeat_interval=duration_pb2.Duration(seconds=5)),
            timeout=60,
        )
        text, samples = await _scrape_until(broker, lambda s: _value(s, "mailbroker_watched_accounts") == 1)

        def handled(method: str, code: str) -> float:
            return _value(samples, "mailbroker_rpc_handled_total", method=f"mailbroker.v1.{method}", code=code)

        assert handled("AccountService/ConnectImapAccount", "UNAUTHENTICATED") == 1
        assert handled("AccountService/ConnectImapAccount", "OK") == 1
        assert handled("AccountService/GetAccount", "NOT_FOUND") == 1
        assert handled("MailService/ListFolders", "OK") == 2
        assert handled("MailService/SendMessage", "OK") == 1
        assert _value(samples, "mailbroker_rpc_handled_total", method="unknown", code="UNIMPLEMENTED") == 1
        listed = {"method": "mailbroker.v1.MailService/ListFolders", "code": "OK"}
        assert _value(samples, "mailbroker_rpc_duration_seconds_count", **listed) == 2
        assert _value(samples, "mailbroker_rpc_duration_seconds_bucket", le="+Inf", **listed) == 2

        assert _value(samples, "mailbroker_provider_calls_total", provider="imap") >= 3  # login check, 2 lists, ...
        assert _value(samples, "mailbroker_provider_calls_total", provider="smtp") == 2  # the login check and the send
        assert _value(samples, "mailbroker_provider_errors_total", provider="imap", code="UNAUTHENTICATED") == 1
        assert _value(samples, "mailbroker_provider_calls_total", provider="google") == 0

        assert _value(samples, "mailbroker_open_feeds") == 1
        assert _value(samples, "mailbroker_watched_accounts") == 1
        assert _value(samples, "mailbroker_feed_watchers") >= 1
        assert _value(samples, "mailbroker_imap_pools") == 1
        connections = sum(_value(samples, "mailbroker_imap_connections", state=s) for s in ("idle", "in_use"))
        assert connections >= 1
        assert _value(samples, "mailbroker_blocking_pool_threads", pool="store") == 4
        assert _value(samples, "mailbroker_blocking_pool_threads", pool="provider") == config.server.blocking_threads
        assert ("mailbroker_blocking_pool_queued", frozenset({("pool", "provider")})) in samples
        assert _value(samples, "process_open_fds") > 0  # the process collectors are in the broker's registry

        stream.cancel()

        def closed(s: Samples) -> bool:
            return (
                _value(s, "mailbroker_open_feeds") == 0
                and _value(s, "mailbroker_imap_connections", state="in_use") == 0
            )

        _, samples = await _scrape_until(broker, closed)
        assert _value(samples, "mailbroker_open_feeds") == 0
        assert _value(samples, "mailbroker_watched_accounts") == 0
        assert _value(samples, "mailbroker_imap_connections", state="in_use") == 0  # every slot taken was given back

    _assert_labels_bounded(samples)
    canaries = [mailbox.address, mailbox.password, WRONG_PASSWORD, account_id, SUBJECT, JUNK_METHOD.split("/")[-1]]
    canaries += [pki.alice.identity, mailbox.address.split("@")[0], mail_servers.host + f":{mail_servers.imap_port}"]
    _assert_no_canary(text, canaries)


# -- Google: token refreshes, retries, provider errors -------------------------------------------------------------


async def _connect_gmail(accounts: object, emulator: GoogleEmulator) -> rpb.Account:
    begun = await accounts.BeginOAuth(  # type: ignore[attr-defined]
        apb.BeginOAuthRequest(
            provider=rpb.PROVIDER_GOOGLE, capabilities=[rpb.CAPABILITY_READ], redirect_uri=REDIRECT_URI
        ),
        timeout=10,
    )
    location = await asyncio.to_thread(emulator.authorize, begun.authorization_uri, user=GMAIL_USER)
    back = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    return await accounts.CompleteOAuth(  # type: ignore[attr-defined,no-any-return]
        apb.CompleteOAuthRequest(state=back["state"], code=back["code"]), timeout=10
    )


async def test_token_refreshes_retries_and_provider_errors_by_provider(
    tmp_path: Path,
    pki: TestPki,
    google_emulator: GoogleEmulator,  # noqa: F811
) -> None:
    client = google_emulator.register_client([REDIRECT_URI])
    google_emulator.add_user(GMAIL_USER)
    config = dataclasses.replace(
        _metrics_config(broker_config(tmp_path, pki)),
        google=google_emulator.broker_config(client, max_retry_seconds=5.0),
    )
    async with running_broker(config, pki) as broker, broker.channel(pki.alice) as channel:
        accounts, mail = stubs(channel)
        account = await _connect_gmail(accounts, google_emulator)
        account_id = account.name.split("/")[1]
        refresh_token = broker.store().read_secret(account_id, "refresh_token")
        assert refresh_token is not None
        folders = mpb.ListFoldersRequest(parent=account.name)

        google_emulator.throttle(2, status=429, retry_after=0)
        await mail.ListFolders(folders, timeout=10)
        google_emulator.expire_access_tokens(GMAIL_USER)
        await mail.ListFolders(folders, timeout=10)
        google_emulator.revoke_user(GMAIL_USER)
        google_emulator.expire_access_tokens(GMAIL_USER)
        error = await _fails(mail.ListFolders(folders, timeout=10))
        assert (error.code(), error_reason(error)) == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_NEEDS_REAUTH")

        text, samples = await _scrape(broker)
        assert _value(samples, "mailbroker_token_refreshes_total", provider="google", outcome="ok") >= 1
        assert _value(samples, "mailbroker_token_refreshes_total", provider="google", outcome="refused") == 1
        assert _value(samples, "mailbroker_token_refreshes_total", provider="google", outcome="failed") == 0
        assert _value(samples, "mailbroker_token_refreshes_total", provider="microsoft", outcome="ok") == 0
        assert _value(samples, "mailbroker_provider_retries_total", provider="google") >= 2  # the two 429s
        assert _value(samples, "mailbroker_provider_calls_total", provider="google") >= 3
        failed = {"provider": "google", "code": "FAILED_PRECONDITION"}
        assert _value(samples, "mailbroker_provider_errors_total", **failed) == 1
        assert _value(samples, "mailbroker_provider_calls_total", provider="imap") == 0
        code = {"method": "mailbroker.v1.MailService/ListFolders", "code": "FAILED_PRECONDITION"}
        assert _value(samples, "mailbroker_rpc_handled_total", **code) == 1

    _assert_labels_bounded(samples)
    tokens = re.findall(r"[A-Za-z0-9._~+/-]{16,}", refresh_token.decode())
    _assert_no_canary(text, [GMAIL_USER, account_id, pki.alice.identity, client.client_id, *tokens])
