"""Canaries sent through every RPC, with logging at DEBUG, appear in no log output of the broker process."""

from __future__ import annotations

import base64
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import account_service_pb2_grpc, mail_service_pb2_grpc
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1 import resources_pb2 as rpb

from server.config import DEV_CLIENT_IDENTITY, EVENT_LOOPS
from server.crypto.keyring import generate_key_file, load_keyring
from server.domain.models import Capability
from server.store.engine import create_engine
from server.store.migrate import upgrade
from server.store.repository import Store
from tests.broker import seed_account
from tests.security.canaries import canary, encoded_forms, leaks

CANARIES = {
    name: canary(name)
    for name in ("password", "subject", "body", "token", "code", "state", "host", "query", "filename", "attachment")
}
CANARY_ADDRESS = f"{canary('person')}@example.test"
CANARY_RECIPIENT = f"{canary('recipient')}@example.test"
ALL = {**CANARIES, "address": CANARY_ADDRESS, "recipient": CANARY_RECIPIENT}


@pytest.fixture(params=EVENT_LOOPS)
def broker_process(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, Path, str, Path]]:
    data = tmp_path / "var"
    data.mkdir(mode=0o700)
    generate_key_file(data / "keys.json")
    store = Store(create_engine(f"sqlite:///{data / 'mailbroker.db'}"), load_keyring(data / "keys.json", {}))
    upgrade(store._engine)
    account = seed_account(
        store,
        DEV_CLIENT_IDENTITY,
        email=CANARY_ADDRESS,
        password=CANARIES["password"].encode(),
        capabilities=frozenset(Capability),
    )
    log_file = tmp_path / "broker.jsonl"
    out, err = (tmp_path / "stdout.txt").open("w"), (tmp_path / "stderr.txt").open("w")
    env = {
        **os.environ,
        "MAILBROKER_LOGGING_LEVEL": "DEBUG",
        "MAILBROKER_LOGGING_FILE": str(log_file),
        "GRPC_VERBOSITY": "debug",
        "PYTHONASYNCIODEBUG": "1",  # the loop's own debug logging too, on each event loop the broker can run on
        "MAILBROKER_SERVER_EVENT_LOOP": request.param,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--data-dir", str(data), "--listen", "127.0.0.1:0"],
        stdout=out,
        stderr=err,
        env=env,
        text=True,
    )
    target = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not target:
        time.sleep(0.1)
        for line in (tmp_path / "stdout.txt").read_text().splitlines():
            if line.startswith("mailbroker is serving on "):
                target = line.split()[4]
    assert target, "broker did not start"
    try:
        yield target, data / "dev-pki", account.id, tmp_path
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
        out.close()
        err.close()


def _every_rpc(target: str, pki: Path, account_id: str) -> dict[str, object]:
    credentials = grpc.ssl_channel_credentials(
        (pki / "ca.pem").read_bytes(), (pki / "client-key.pem").read_bytes(), (pki / "client.pem").read_bytes()
    )
    name = f"accounts/{account_id}"
    replies: dict[str, object] = {}
    with grpc.secure_channel(target, credentials) as channel:
        accounts = account_service_pb2_grpc.AccountServiceStub(channel)
        mail = mail_service_pb2_grpc.MailServiceStub(channel)
        address = rpb.EmailAddress(display_name=CANARIES["subject"], address=CANARY_RECIPIENT)
        calls = [
            lambda: accounts.BeginOAuth(
                apb.BeginOAuthRequest(
                    provider=rpb.PROVIDER_GOOGLE,
                    capabilities=[rpb.CAPABILITY_READ],
                    redirect_uri=f"https://{CANARIES['host']}/cb",
                    login_hint=CANARY_ADDRESS,
                    account=name,
                )
            ),
            lambda: accounts.CompleteOAuth(apb.CompleteOAuthRequest(state=CANARIES["state"], code=CANARIES["code"])),
            lambda: accounts.ConnectImapAccount(
                apb.ConnectImapAccountRequest(
                    imap_server=rpb.MailServer(
                        host=CANARIES["host"], port=993, security=rpb.TRANSPORT_SECURITY_IMPLICIT_TLS
                    ),
                    username=CANARY_ADDRESS,
                    password=CANARIES["password"],
                    email_address=CANARY_ADDRESS,
                    capabilities=[rpb.CAPABILITY_READ],
                )
            ),
            lambda: accounts.GetAccount(apb.GetAccountRequest(name=name)),
            lambda: accounts.GetAccount(apb.GetAccountRequest(name=f"accounts/{CANARIES['token']}")),
            lambda: accounts.ListAccounts(apb.ListAccountsRequest(page_token=CANARIES["token"])),
            lambda: accounts.ListAccounts(apb.ListAccountsRequest()),
            lambda: accounts.ListAuditEvents(apb.ListAuditEventsRequest(account=name, page_token=CANARIES["state"])),
            lambda: mail.ListFolders(mpb.ListFoldersRequest(parent=name, page_token=CANARIES["token"])),
            lambda: mail.ListMessages(mpb.ListMessagesRequest(parent=name, query=CANARIES["query"])),
            lambda: mail.GetMessage(mpb.GetMessageRequest(name=f"{name}/messages/{CANARIES['subject']}")),
            lambda: list(
                mail.GetAttachment(
                    mpb.GetAttachmentRequest(name=f"{name}/messages/m1/attachments/{CANARIES['attachment']}")
                )
            ),
            lambda: mail.SendMessage(
                mpb.SendMessageRequest(
                    account=name,
                    request_id=CANARIES["state"],
                    message=mpb.OutgoingMessage(
                        to_recipients=[address],
                        subject=CANARIES["subject"],
                        text_body=CANARIES["body"],
                        html_body=f"<p>{CANARIES['body']}</p>",
                        attachments=[
                            mpb.OutgoingAttachment(
                                filename=CANARIES["filename"], content=CANARIES["attachment"].encode()
                            )
                        ],
                    ),
                )
            ),
            lambda: list(mail.WatchMailbox(mpb.WatchMailboxRequest(account=name, resume_token=CANARIES["token"]))),
            lambda: accounts.DeleteAccount(apb.DeleteAccountRequest(name=name)),
        ]
        for index, call in enumerate(calls):
            try:
                replies[str(index)] = call()
            except grpc.RpcError as error:
                replies[str(index)] = (error.code(), error.details())  # type: ignore[attr-defined]
    return replies


def test_no_canary_reaches_any_log_output(broker_process: tuple[str, Path, str, Path]) -> None:
    target, pki, account_id, tmp_path = broker_process
    replies = _every_rpc(target, pki, account_id)
    # Positive control: the canaries did go in (GetAccount returns the address to its owner) ...
    assert CANARY_ADDRESS in str(replies["3"])
    time.sleep(0.5)  # let the access log lines of the last calls reach the file
    outputs = {
        name: (tmp_path / name).read_text(errors="replace") for name in ("broker.jsonl", "stdout.txt", "stderr.txt")
    }
    # ... and the logs were captured: an access-log line for each method, in the file and on stderr.
    for method in ("ConnectImapAccount", "SendMessage", "DeleteAccount", "WatchMailbox"):
        assert method in outputs["broker.jsonl"] and method in outputs["stderr.txt"]
    for name, text in outputs.items():
        assert leaks(text, ALL) == [], f"canaries found in {name}"


def test_the_canary_search_finds_every_encoding() -> None:
    secret = canary("probe")
    for text in (
        f"x {secret} y",
        base64.b64encode(f"ab{secret}cd".encode()).decode(),
        base64.urlsafe_b64encode(f"a{secret}".encode()).decode(),
        f"id={shlex.quote(secret)}".encode().hex(),
        "x=" + base64.b64encode(f"{secret}".encode()).decode(),
    ):
        assert leaks(text, {"probe": secret}) == ["probe"]
    assert encoded_forms(secret)


def test_pytest_failure_reports_print_captured_logs_redacted(request: pytest.FixtureRequest) -> None:
    """What pytest shows of captured log lines in a failing test's report goes through the broker's redaction (on
    a copy: the record other handlers see is untouched, so the canary tests above still see what really leaked)."""
    plugin = request.config.pluginmanager.get_plugin("logging-plugin")
    secret = "canary-pw-" + "x9Q2" * 8
    record = logging.LogRecord("imaplib", logging.WARNING, __file__, 1, "LOGIN user %s", (secret,), None)
    for handler in (plugin.caplog_handler, plugin.report_handler):
        shown = handler.format(record)
        assert "LOGIN" in shown
        assert secret not in shown, "pytest would print the canary"
    assert record.args == (secret,)  # the original record is left as it was
