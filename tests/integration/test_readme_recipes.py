"""The README's grpcurl recipes, taken from the README and run as written (bash, the real grpcurl binary) against a
live broker and Dovecot: one for every RPC, so the docs cannot rot."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mailbroker.v1 import account_service_pb2, mail_service_pb2

from tests.broker import RunningBroker, running_broker
from tests.integration.test_imap import imap_config, sample
from tests.mailserver import Mailbox, MailServers
from tests.pki import TestPki

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MARKER = "<!-- recipes: tests/integration/test_readme_recipes.py runs the next block -->"
GRPCURL = Path(sys.executable).parent / "grpcurl"
PAYLOAD = bytes(range(256)) * 300  # 76,800 bytes: two chunks


def recipes() -> list[str]:
    """The commands of the README's recipe block, each a `$GRPCURL` line with its continuation lines; the variable
    settings above the first one are the reader's to make (the test makes its own)."""
    text = README.read_text()
    assert MARKER in text, "the README lost its recipe block"
    block = re.search(r"```sh\n(.*?)```", text[text.index(MARKER) :], re.S)
    assert block is not None
    commands: list[list[str]] = []
    for line in block.group(1).splitlines():
        if line.startswith("$GRPCURL"):
            commands.append([line])
        elif commands and line and not line.startswith("#"):
            commands[-1].append(line)
    return ["\n".join(lines) for lines in commands]


def method_of(command: str) -> str:
    found = re.search(r"mailbroker\.v1\.(\w+/\w+)", command)
    assert found, command
    return found.group(1)


def json_objects(text: str) -> list[dict[str, Any]]:
    """grpcurl prints one pretty-printed JSON object per message."""
    decoder, objects, at = json.JSONDecoder(), [], 0
    while (at := _skip_space(text, at)) < len(text):
        obj, at = decoder.raw_decode(text, at)
        objects.append(obj)
    return objects


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


def test_there_is_a_recipe_for_every_rpc() -> None:
    covered = {method_of(command) for command in recipes()}
    every = {
        f"{service.name}/{method.name}"
        for module in (account_service_pb2, mail_service_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert covered == every


@pytest.fixture
async def imap_broker(tmp_path: Path, pki: TestPki, mail_servers: MailServers) -> AsyncIterator[RunningBroker]:
    async with running_broker(imap_config(tmp_path, pki, mail_servers), pki) as running:
        yield running


class Shell:
    def __init__(self, broker: RunningBroker, servers: MailServers, box: Mailbox) -> None:
        pki = broker.pki
        self.env = {
            "PATH": "/usr/bin:/bin",
            "GRPCURL": str(GRPCURL),
            "BROKER": broker.target,
            "TLS": f"-cacert {pki.ca} -cert {pki.alice.cert} -key {pki.alice.key}",
            "IMAP_HOST": servers.host,
            "IMAP_PORT": str(servers.imap_port),
            "SMTP_HOST": servers.host,
            "SMTP_PORT": str(servers.smtps_port),
            "IMAP_USER": box.address,
            "IMAP_PASSWORD": box.password,
            "STATE": "a-state-nobody-issued",
            "CODE": "a-code",
        }

    async def run(self, command: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            ["bash", "-c", command],
            env=self.env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    async def ok(self, command: str) -> list[dict[str, Any]]:
        result = await self.run(command)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        return json_objects(result.stdout)

    async def fails(self, command: str, code: str) -> None:
        result = await self.run(command)
        assert result.returncode != 0
        assert f"Code: {code}" in result.stderr, result.stderr

    async def watch(self, command: str, servers: MailServers, box: Mailbox) -> None:
        process = subprocess.Popen(  # noqa: ASYNC220 (read line by line in a thread below)
            ["bash", "-c", command], env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
        )
        assert process.stdout is not None
        buffer = ""

        async def next_event() -> dict[str, Any]:
            nonlocal buffer
            while True:
                try:
                    obj, end = json.JSONDecoder().raw_decode(buffer, _skip_space(buffer, 0))
                    buffer = buffer[end:]
                    return obj
                except json.JSONDecodeError:
                    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 30)  # type: ignore[union-attr]
                    assert line, "grpcurl's stream ended"
                    buffer += line

        try:
            first = await next_event()  # the feed is live (a heartbeat, or the mail the send recipe delivered)
            assert first["resume_token"]
            servers.deliver(box.address, sample("seen by grpcurl", to=box.address))
            while (event := await next_event()).get("message_added", {}).get("message", {}).get("subject") != (
                "seen by grpcurl"
            ):
                assert "resume_token" in event
        finally:
            process.terminate()
            process.wait(timeout=10)
            process.stdout.close()


async def test_every_recipe_works_as_written(
    imap_broker: RunningBroker, mail_servers: MailServers, mailbox: Mailbox
) -> None:
    shell = Shell(imap_broker, mail_servers, mailbox)
    env = shell.env
    mail_servers.deliver(mailbox.address, sample("for the recipes", to=mailbox.address, attachment=PAYLOAD))
    ran = []
    for command in recipes():
        method = method_of(command)
        ran.append(method)
        if method == "AccountService/ConnectImapAccount":
            (account,) = await shell.ok(command)
            assert account["email_address"] == mailbox.address
            assert mailbox.password not in json.dumps(account)
            env["ACCOUNT"] = account["name"]
        elif method == "AccountService/GetAccount":
            (account,) = await shell.ok(command)
            assert account["name"] == env["ACCOUNT"]
        elif method == "AccountService/ListAccounts":
            (page,) = await shell.ok(command)
            assert [a["name"] for a in page["accounts"]] == [env["ACCOUNT"]]
        elif method == "MailService/ListFolders":
            (page,) = await shell.ok(command)
            assert "FOLDER_ROLE_INBOX" in [f.get("role") for f in page["folders"]]
        elif method == "MailService/ListMessages":
            (page,) = await shell.ok(command)
            (message,) = page["messages"]
            assert message["subject"] == "for the recipes"
            env["MESSAGE"] = message["name"]
        elif method == "MailService/GetMessage":
            (message,) = await shell.ok(command)
            assert message["text_body"].rstrip() == "text of for the recipes"
            (attachment,) = message["attachments"]
            env["ATTACHMENT"] = attachment["name"]
        elif method == "MailService/GetAttachment":
            chunks = await shell.ok(command)
            assert len(chunks) == 2
            assert chunks[0]["attachment"]["name"] == env["ATTACHMENT"]
            assert b"".join(base64.b64decode(c["data"]) for c in chunks) == PAYLOAD
        elif method == "MailService/SendMessage":
            (sent,) = await shell.ok(command)
            assert sent["internet_message_id"]
        elif method == "MailService/WatchMailbox":
            await shell.watch(command, mail_servers, mailbox)
        elif method == "AccountService/ListAuditEvents":
            (page,) = await shell.ok(command)
            assert "AUDIT_ACTION_ACCOUNT_CONNECTED" in [e["action"] for e in page["audit_events"]]
        elif method == "AccountService/BeginOAuth":
            await shell.fails(command, "FailedPrecondition")  # no [google] in this broker's config
        elif method == "AccountService/CompleteOAuth":
            await shell.fails(command, "InvalidArgument")  # a state nobody issued
        elif method == "AccountService/DeleteAccount":
            (receipt,) = await shell.ok(command)
            assert receipt["account"] == env["ACCOUNT"]
            assert receipt["steps"]
        else:
            raise AssertionError(f"no expectation for {method}: add one")
    assert ran[0] == "AccountService/ConnectImapAccount" and ran[-1] == "AccountService/DeleteAccount"
