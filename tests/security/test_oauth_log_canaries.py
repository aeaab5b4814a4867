"""An OAuth account's whole life (Gmail, Outlook) through a broker process logging at DEBUG, against the provider's
emulator: no token, code, client secret, address, subject or body appears in any of its output.

Consent (with a login hint), reads (metadata, full, an attachment), a send, a feed event, a refresh, the grant
revoked (NEEDS_REAUTH), and erasure. The emulator's own tokens, read from its state afterwards, join the canaries.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
from google.protobuf import duration_pb2
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import account_service_pb2_grpc, mail_service_pb2_grpc
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1 import resources_pb2 as rpb

from server.config import EVENT_LOOPS
from server.crypto.keyring import generate_key_file
from tests.emulators.google import GoogleEmulator
from tests.emulators.microsoft import MicrosoftEmulator
from tests.security.canaries import canary, leaks

REDIRECT_URI = "https://app.example.test/oauth/callback"
CANARIES = {name: canary(name) for name in ("subject", "body", "filename", "attachment", "secret", "recipient_name")}
CANARY_ADDRESS = f"{canary('person')}@example.test"
CANARY_RECIPIENT = f"{canary('recipient')}@example.test"


class Google:
    """The Google emulator as this test drives it."""

    name = "google"
    provider = rpb.PROVIDER_GOOGLE

    def __init__(self, directory: Path) -> None:
        self.emulator: GoogleEmulator | MicrosoftEmulator = GoogleEmulator(directory)

    def config(self) -> str:
        emulator = self.emulator
        assert isinstance(emulator, GoogleEmulator)
        client = emulator.register_client([REDIRECT_URI], client_secret=CANARIES["secret"])
        emulator.add_user(CANARY_ADDRESS)
        return f"""
[google]
client_id = "{client.client_id}"
redirect_uris = ["{REDIRECT_URI}"]
authorization_endpoint = "{emulator.authorize_url}"
token_endpoint = "{emulator.token_url}"
revoke_endpoint = "{emulator.revoke_url}"
certs_url = "{emulator.certs_url}"
issuers = ["{emulator.issuer}"]
api_endpoint = "{emulator.gmail_api_endpoint}"
ca_file = "{emulator.ca_path}"
history_poll_seconds = 0.2
max_retry_seconds = 3.0
"""

    def consent(self, url: str) -> dict[str, str]:
        assert isinstance(self.emulator, GoogleEmulator)
        location = self.emulator.authorize(url, user=CANARY_ADDRESS)
        return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}

    def revoke(self) -> None:
        assert isinstance(self.emulator, GoogleEmulator)
        self.emulator.revoke_user(CANARY_ADDRESS)

    def used_the_provider(self) -> bool:
        counters = self.emulator.counters()
        return counters.get("token.refresh_token", 0) >= 2 and counters.get("revoke", 0) >= 1

    def issued(self) -> dict[str, str]:
        state = self.emulator.state
        with state.lock:
            return {
                **{f"access token {i}": t for i, t in enumerate(state.access_tokens)},
                **{f"refresh token {i}": t for i, t in enumerate(state.refresh_tokens)},
            }


class Microsoft(Google):
    """The Microsoft emulator as this test drives it (consent comes back as a form post)."""

    name = "microsoft"
    provider = rpb.PROVIDER_MICROSOFT

    def __init__(self, directory: Path) -> None:
        self.emulator = MicrosoftEmulator(directory)

    def config(self) -> str:
        emulator = self.emulator
        assert isinstance(emulator, MicrosoftEmulator)
        app = emulator.register_app([REDIRECT_URI], client_secret=CANARIES["secret"])
        emulator.add_user(CANARY_ADDRESS)
        return f"""
[microsoft]
client_id = "{app.client_id}"
redirect_uris = ["{REDIRECT_URI}"]
authority_host = "{emulator.base_url}"
authority = "common"
graph_endpoint = "{emulator.graph_url}"
ca_file = "{emulator.ca_path}"
delta_poll_seconds = 0.2
max_retry_seconds = 3.0
"""

    def consent(self, url: str) -> dict[str, str]:
        assert isinstance(self.emulator, MicrosoftEmulator)
        _, posted = self.emulator.authorize_form_post(url, user=CANARY_ADDRESS)
        return posted

    def revoke(self) -> None:
        assert isinstance(self.emulator, MicrosoftEmulator)
        self.emulator.revoke_consent(CANARY_ADDRESS)

    def used_the_provider(self) -> bool:
        return self.emulator.counters().get("token.refresh_token", 0) >= 2


@pytest.fixture(params=[Google, Microsoft], ids=lambda p: p.name)
def provider(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Google]:
    made: Google = request.param(tmp_path / "emulator")
    with made.emulator:
        yield made
    assert not made.emulator.internal_errors(), "the emulator failed"


@pytest.fixture(params=EVENT_LOOPS)
def broker_process(
    tmp_path: Path, provider: Google, request: pytest.FixtureRequest
) -> Iterator[tuple[str, Path, Path]]:
    data = tmp_path / "var"
    data.mkdir(mode=0o700)
    generate_key_file(data / "keys.json")
    config = tmp_path / "mailbroker.toml"
    config.write_text(provider.config())
    log_file = tmp_path / "broker.jsonl"
    out, err = (tmp_path / "stdout.txt").open("w"), (tmp_path / "stderr.txt").open("w")
    env = {
        **os.environ,
        "MAILBROKER_LOGGING_LEVEL": "DEBUG",
        "MAILBROKER_LOGGING_FILE": str(log_file),
        # The client secret from the environment, as documented.
        f"MAILBROKER_{provider.name.upper()}_CLIENT_SECRET": CANARIES["secret"],
        "GRPC_VERBOSITY": "debug",
        "PYTHONASYNCIODEBUG": "1",  # the loop's own debug logging too, on each event loop the broker can run on
        "MAILBROKER_SERVER_EVENT_LOOP": request.param,
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--config",
            str(config),
            "--data-dir",
            str(data),
            "--listen",
            "127.0.0.1:0",
        ],
        stdout=out,
        stderr=err,
        env=env,
        text=True,
    )
    target = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not target and process.poll() is None:
        time.sleep(0.1)
        for line in (tmp_path / "stdout.txt").read_text().splitlines():
            if line.startswith("mailbroker is serving on "):
                target = line.split()[4]
    assert target, "broker did not start"
    try:
        yield target, data / "dev-pki", tmp_path
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
        out.close()
        err.close()


def _mail() -> bytes:
    message = EmailMessage()
    message["From"] = f"Sender <{CANARY_RECIPIENT}>"
    message["To"] = CANARY_ADDRESS
    message["Subject"] = CANARIES["subject"]
    message["Message-ID"] = "<canary-message@example.test>"
    message.set_content(CANARIES["body"])
    message.add_attachment(
        CANARIES["attachment"].encode(), maintype="application", subtype="octet-stream", filename=CANARIES["filename"]
    )
    return bytes(message)


def _life_of_an_account(target: str, pki: Path, provider: Google) -> dict[str, object]:
    credentials = grpc.ssl_channel_credentials(
        (pki / "ca.pem").read_bytes(), (pki / "client-key.pem").read_bytes(), (pki / "client.pem").read_bytes()
    )
    seen: dict[str, object] = {}
    with grpc.secure_channel(target, credentials) as channel:
        accounts = account_service_pb2_grpc.AccountServiceStub(channel)
        mail = mail_service_pb2_grpc.MailServiceStub(channel)
        begun = accounts.BeginOAuth(
            apb.BeginOAuthRequest(
                provider=provider.provider,
                capabilities=[rpb.CAPABILITY_READ, rpb.CAPABILITY_SEND],
                redirect_uri=REDIRECT_URI,
                login_hint=CANARY_ADDRESS,
            ),
            timeout=10,
        )
        back = provider.consent(begun.authorization_uri)
        seen["state"], seen["code"] = back["state"], back["code"]
        account = accounts.CompleteOAuth(apb.CompleteOAuthRequest(state=back["state"], code=back["code"]), timeout=10)
        seen["account"] = account
        name = account.name

        watch = mail.WatchMailbox(
            mpb.WatchMailboxRequest(account=name, heartbeat_interval=duration_pb2.Duration(seconds=5)), timeout=60
        )
        assert next(watch).WhichOneof("event") == "heartbeat"
        provider.emulator.deliver(CANARY_ADDRESS, _mail())
        event = next(watch)
        while event.WhichOneof("event") == "heartbeat":
            event = next(watch)
        seen["event"] = event

        listed = mail.ListMessages(mpb.ListMessagesRequest(parent=name), timeout=10)
        full = mail.GetMessage(
            mpb.GetMessageRequest(name=listed.messages[0].name, view=rpb.MESSAGE_VIEW_FULL), timeout=10
        )
        seen["full"] = full
        seen["attachment"] = b"".join(
            c.data for c in mail.GetAttachment(mpb.GetAttachmentRequest(name=full.attachments[0].name), timeout=10)
        )
        mail.SendMessage(
            mpb.SendMessageRequest(
                account=name,
                message=mpb.OutgoingMessage(
                    to_recipients=[rpb.EmailAddress(display_name=CANARIES["recipient_name"], address=CANARY_RECIPIENT)],
                    subject=CANARIES["subject"],
                    text_body=CANARIES["body"],
                ),
            ),
            timeout=10,
        )
        provider.emulator.expire_access_tokens(CANARY_ADDRESS)  # the next call refreshes
        mail.ListFolders(mpb.ListFoldersRequest(parent=name), timeout=10)

        provider.revoke()
        provider.emulator.expire_access_tokens(CANARY_ADDRESS)
        try:
            mail.ListFolders(mpb.ListFoldersRequest(parent=name), timeout=10)
        except grpc.RpcError as error:
            seen["after_revoke"] = error.code()  # type: ignore[attr-defined]
        try:
            for _ in watch:
                pass
        except grpc.RpcError as error:
            seen["feed_end"] = error.code()  # type: ignore[attr-defined]
        seen["receipt"] = accounts.DeleteAccount(apb.DeleteAccountRequest(name=name), timeout=30)
    return seen


def test_no_token_secret_or_content_reaches_any_log_output(
    broker_process: tuple[str, Path, Path], provider: Google
) -> None:
    target, pki, tmp_path = broker_process
    seen = _life_of_an_account(target, pki, provider)

    # Positive controls: the canaries went through the broker, and the life ran as planned.
    assert seen["attachment"] == CANARIES["attachment"].encode()
    assert seen["after_revoke"] == grpc.StatusCode.FAILED_PRECONDITION
    assert seen["feed_end"] == grpc.StatusCode.FAILED_PRECONDITION
    assert provider.used_the_provider()
    issued = provider.issued()
    assert issued
    secrets = {
        **CANARIES,
        **issued,
        "address": CANARY_ADDRESS,
        "recipient": CANARY_RECIPIENT,
        "state": str(seen["state"]),
        "code": str(seen["code"]),
    }
    time.sleep(0.5)  # let the access log lines of the last calls reach the file
    outputs = {
        name: (tmp_path / name).read_text(errors="replace") for name in ("broker.jsonl", "stdout.txt", "stderr.txt")
    }
    for method in ("BeginOAuth", "CompleteOAuth", "GetAttachment", "SendMessage", "DeleteAccount"):
        assert method in outputs["broker.jsonl"]
    # The provider libraries' own DEBUG lines were captured too (they name the endpoints they call).
    assert "/token" in outputs["broker.jsonl"]
    for name, text in outputs.items():
        assert leaks(text, secrets) == [], f"canaries found in {name}"
