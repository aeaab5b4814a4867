"""Gmail's and Graph's error bodies, and their token endpoints', quote canaries (the mailbox's address, a host name,
token-like strings, free text) where the real services quote such things; no status message, ErrorInfo, BadRequest,
trailing metadata or DEBUG log line of the broker (its own loggers and googleapiclient's, google-auth's, msal's,
urllib3's, httplib2's) carries any of them. Every answer is also checked for its status and reason: the error path
the canaries went down is the one meant.

The emulators answer in the providers' documented shapes: Google's ``{"error": {"code", "message", "errors": [...],
"status", "details": [ErrorInfo]}}`` and RFC 6749's ``{"error", "error_description"}``; Graph's ``{"error": {"code",
"message", "innerError", "details"}}`` and the identity platform's AADSTS error."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from collections.abc import Awaitable, Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1 import resources_pb2 as rpb

from server.config import Config
from tests.broker import broker_config, error_reason, running_broker, stubs
from tests.conformance.outlook_backend import REDIRECT_URI as OUTLOOK_REDIRECT_URI
from tests.conformance.outlook_backend import microsoft_config
from tests.emulators.google import GoogleEmulator
from tests.emulators.microsoft import MicrosoftEmulator
from tests.pki import TestPki, make_test_pki
from tests.security.canaries import canary, leaks
from tests.security.hygiene import captured_broker_log, everything, fails, leaking_lines

REDIRECT_URI = "https://app.example.test/oauth/callback"
USER = f"{canary('user')}@example.test"
RECIPIENT = f"{canary('recipient')}@example.test"
ADDRESS = f"{canary('address')}@example.test"
HOST = f"{canary('host')}.mail.example.test"
GOOGLE_TOKEN = f"ya29.a0{canary('token').replace('-', '_')}"
MICROSOFT_TOKEN = f"EwBwA8l6BAAU{canary('token').replace('-', '')}"
TEXT = canary("provider")
ALL = {
    "user": USER,
    "recipient": RECIPIENT,
    "address": ADDRESS,
    "host": HOST,
    "google token": GOOGLE_TOKEN,
    "microsoft token": MICROSOFT_TOKEN,
    "text": TEXT,
}
# What a provider's error message says, as real ones quote an address, a host and a token.
MESSAGE = f"{TEXT}: mailbox {ADDRESS} on {HOST} refused token {GOOGLE_TOKEN} {MICROSOFT_TOKEN}"
# An HTML page in place of the JSON error, as a front end or a proxy answers some failures (Google's "automated
# queries" 403 quotes the client's address).
PAGE = f"<html><head><title>Error</title></head><body><p>{MESSAGE}</p></body></html>"
MANY = 1000  # faults enough for every retry; each case clears what is left
Expected = tuple[grpc.StatusCode, str]
Case = tuple[str, Callable[[], None], Expected]


def _mail() -> bytes:
    message = EmailMessage()
    message["From"] = f"Sender <{RECIPIENT}>"
    message["To"] = USER
    message["Subject"] = "hygiene"
    message["Message-ID"] = "<hygiene@example.test>"
    message.set_content("hygiene")
    return bytes(message)


def _send_request(account: str) -> mpb.SendMessageRequest:
    return mpb.SendMessageRequest(
        account=account,
        message=mpb.OutgoingMessage(
            to_recipients=[rpb.EmailAddress(address=RECIPIENT)], subject="hygiene", text_body="hygiene"
        ),
    )


class Google:
    name = "google"
    provider = rpb.PROVIDER_GOOGLE
    redirect_uri = REDIRECT_URI
    api_calls: ClassVar[dict[str, str]] = {
        "get": "gmail.users.messages.get",
        "list": "gmail.users.messages.list",
        "send": "gmail.users.messages.send",
    }

    def __init__(self, directory: Path) -> None:
        self.emulator = GoogleEmulator(directory)

    def configure(self, config: Config) -> Config:
        emulator = self.emulator
        client = emulator.register_client([REDIRECT_URI])
        emulator.add_user(USER)
        return dataclasses.replace(
            config,
            google=emulator.broker_config(client, max_retry_seconds=1.0, history_poll_seconds=0.2),
        )

    def consent(self, url: str) -> dict[str, str]:
        location = self.emulator.authorize(url, user=USER)
        return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}

    def api_fault(self, call: str, status: int, reason: str, page: bool = False) -> Callable[[], None]:
        """Google's JSON error (or, with ``page``, an HTML page): the message quotes the canaries, and so does an
        ErrorInfo's metadata."""

        def inject() -> None:
            self.emulator.fail_next_requests(
                MANY,
                status=status,
                message=MESSAGE,
                reason=reason,
                error_info={
                    "reason": reason.upper(),
                    "domain": "gmail.googleapis.com",
                    "metadata": {"email": ADDRESS, "host": HOST, "token": GOOGLE_TOKEN, "detail": TEXT},
                },
                methods=[self.api_calls[call]],
                html=PAGE if page else None,
            )

        return inject

    def token_fault(self, status: int, error: str, page: bool = False) -> Callable[[], None]:
        def inject() -> None:
            self.emulator.fail_next_token_requests(
                MANY, status=status, error=error, description=MESSAGE, html=PAGE if page else None
            )

        return inject

    def cases(self) -> list[Case]:
        code = grpc.StatusCode
        api, token = self.api_fault, self.token_fault
        return [
            ("get 400", api("get", 400, "invalidArgument"), (code.INVALID_ARGUMENT, "INVALID_RESOURCE_NAME")),
            ("get 403", api("get", 403, "forbidden"), (code.PERMISSION_DENIED, "SCOPE_NOT_GRANTED")),
            ("get 403 policy", api("get", 403, "domainPolicy"), (code.PERMISSION_DENIED, "PROVIDER_PERMISSION_DENIED")),
            ("get 404", api("get", 404, "notFound"), (code.NOT_FOUND, "MESSAGE_NOT_FOUND")),
            ("get 429", api("get", 429, "rateLimitExceeded"), (code.UNAVAILABLE, "PROVIDER_RATE_LIMITED")),
            ("get 500", api("get", 500, "backendError"), (code.UNAVAILABLE, "PROVIDER_ERROR")),
            ("get 503", api("get", 503, "backendError"), (code.UNAVAILABLE, "PROVIDER_ERROR")),
            ("list 400", api("list", 400, "invalidArgument"), (code.INVALID_ARGUMENT, "PROVIDER_REJECTED_REQUEST")),
            ("list 500", api("list", 500, "backendError"), (code.UNAVAILABLE, "PROVIDER_ERROR")),
            ("send 400", api("send", 400, "failedPrecondition"), (code.INVALID_ARGUMENT, "PROVIDER_REJECTED_MESSAGE")),
            ("send 403", api("send", 403, "forbidden"), (code.PERMISSION_DENIED, "SCOPE_NOT_GRANTED")),
            ("send 500", api("send", 500, "backendError"), (code.UNKNOWN, "SEND_OUTCOME_UNKNOWN")),
            ("get 401", api("get", 401, "authError"), (code.UNAUTHENTICATED, "PROVIDER_AUTH_FAILED")),
            ("get 403 page", api("get", 403, "", page=True), (code.PERMISSION_DENIED, "PROVIDER_PERMISSION_DENIED")),
            ("get 502 page", api("get", 502, "", page=True), (code.UNAVAILABLE, "PROVIDER_ERROR")),
            ("send 502 page", api("send", 502, "", page=True), (code.UNKNOWN, "SEND_OUTCOME_UNKNOWN")),
            ("code 400", token(400, "invalid_grant"), (code.INVALID_ARGUMENT, "OAUTH_CODE_REJECTED")),
            ("code 500", token(500, "server_error"), (code.UNAVAILABLE, "PROVIDER_ERROR")),
            ("code 400 page", token(400, "", page=True), (code.UNAVAILABLE, "PROVIDER_ERROR")),
            ("refresh 500", token(500, "server_error"), (code.UNAVAILABLE, "PROVIDER_ERROR")),
            ("refresh 400 page", token(400, "", page=True), (code.UNAVAILABLE, "PROVIDER_ERROR")),
            # Last: a refused grant puts the account in NEEDS_REAUTH.
            ("refresh 400", token(400, "invalid_grant"), (code.FAILED_PRECONDITION, "ACCOUNT_NEEDS_REAUTH")),
        ]


class Microsoft(Google):
    name = "microsoft"
    provider = rpb.PROVIDER_MICROSOFT
    redirect_uri = OUTLOOK_REDIRECT_URI  # the one microsoft_config() names
    api_calls: ClassVar[dict[str, str]] = {"get": "message.get", "list": "message.list", "send": "user.sendMail"}

    def __init__(self, directory: Path) -> None:  # not super().__init__: that would start a Google emulator
        self.emulator = MicrosoftEmulator(directory)  # type: ignore[assignment]

    @property
    def microsoft(self) -> MicrosoftEmulator:
        assert isinstance(self.emulator, MicrosoftEmulator)
        return self.emulator

    def configure(self, config: Config) -> Config:
        app = self.microsoft.register_app([self.redirect_uri])
        self.microsoft.add_user(USER)
        return dataclasses.replace(config, microsoft=microsoft_config(self.microsoft, app, max_retry_seconds=1.0))

    def consent(self, url: str) -> dict[str, str]:
        _, posted = self.microsoft.authorize_form_post(url, user=USER)
        return posted

    def api_fault(self, call: str, status: int, reason: str, page: bool = False) -> Callable[[], None]:
        """Graph's JSON error (or, with ``page``, an HTML page): the message quotes the canaries, and so does an
        entry of its details."""

        def inject() -> None:
            self.microsoft.fail_next_requests(
                MANY,
                status=status,
                code=reason,
                message=MESSAGE,
                details=[{"code": reason, "message": f"{TEXT} {ADDRESS}", "target": HOST}],
                endpoints=[self.api_calls[call]],
                html=PAGE if page else None,
            )

        return inject

    def token_fault(self, status: int, error: str, page: bool = False) -> Callable[[], None]:
        def inject() -> None:
            self.microsoft.fail_next_token_requests(
                MANY,
                status=status,
                error=error,
                aadsts=50173 if error == "invalid_grant" else 90000,
                description=MESSAGE,
                # msal answers a request that got a 5xx (5 s) or an exact 400 (60 s) from a cache of its own unless
                # the answer had a Retry-After: 0 keeps each case's refresh going to the emulator.
                retry_after=0,
                html=PAGE if page else None,
            )

        return inject

    def cases(self) -> list[Case]:
        code = grpc.StatusCode
        api, token = self.api_fault, self.token_fault
        return [
            ("get 400", api("get", 400, "ErrorInvalidIdMalformed"), (code.INVALID_ARGUMENT, "INVALID_RESOURCE_NAME")),
            ("get 403", api("get", 403, "ErrorAccessDenied"), (code.PERMISSION_DENIED, "SCOPE_NOT_GRANTED")),
            ("get 404", api("get", 404, "ErrorItemNotFound"), (code.NOT_FOUND, "MESSAGE_NOT_FOUND")),
            ("get 429", api("get", 429, "TooManyRequests"), (code.UNAVAILABLE, "PROVIDER_RATE_LIMITED")),
            ("get 500", api("get", 500, "generalException"), (code.UNAVAILABLE, "PROVIDER_ERROR")),
            ("get 503", api("get", 503, "serviceNotAvailable"), (code.UNAVAILABLE, "PROVIDER_UNAVAILABLE")),
            ("list 400", api("list", 400, "BadRequest"), (code.INVALID_ARGUMENT, "PROVIDER_REJECTED_REQUEST")),
            ("list 500", api("list", 500, "generalException"), (code.UNAVAILABLE, "PROVIDER_ERROR")),
            (
                "send 400",
                api("send", 400, "ErrorInvalidRecipients"),
                (code.INVALID_ARGUMENT, "PROVIDER_REJECTED_MESSAGE"),
            ),
            ("send 403", api("send", 403, "ErrorSendAsDenied"), (code.PERMISSION_DENIED, "SCOPE_NOT_GRANTED")),
            ("send 413", api("send", 413, "ErrorMessageSizeExceeded"), (code.INVALID_ARGUMENT, "MESSAGE_TOO_LARGE")),
            ("send 500", api("send", 500, "generalException"), (code.UNKNOWN, "SEND_OUTCOME_UNKNOWN")),
            ("get 401", api("get", 401, "InvalidAuthenticationToken"), (code.UNAUTHENTICATED, "PROVIDER_AUTH_FAILED")),
            ("get 502 page", api("get", 502, "", page=True), (code.UNAVAILABLE, "PROVIDER_ERROR")),
            ("send 502 page", api("send", 502, "", page=True), (code.UNKNOWN, "SEND_OUTCOME_UNKNOWN")),
            ("code 400", token(400, "invalid_grant"), (code.INVALID_ARGUMENT, "OAUTH_CODE_REJECTED")),
            ("code 500", token(500, "server_error"), (code.UNAVAILABLE, "PROVIDER_UNAVAILABLE")),
            ("code 400 page", token(400, "", page=True), (code.UNAVAILABLE, "PROVIDER_ERROR")),
            ("refresh 401", token(401, "invalid_client"), (code.FAILED_PRECONDITION, "OAUTH_CLIENT_REJECTED")),
            ("refresh 500", token(500, "server_error"), (code.UNAVAILABLE, "PROVIDER_UNAVAILABLE")),
            ("refresh 400 page", token(400, "", page=True), (code.UNAVAILABLE, "PROVIDER_ERROR")),
            # Last: a refused grant puts the account in NEEDS_REAUTH.
            ("refresh 400", token(400, "invalid_grant"), (code.FAILED_PRECONDITION, "ACCOUNT_NEEDS_REAUTH")),
        ]


@pytest.fixture(params=[Google, Microsoft], ids=lambda p: p.name)
def provider(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Google]:
    made: Google = request.param(tmp_path / "emulator")
    with made.emulator:
        yield made
    assert not made.emulator.internal_errors(), "the emulator failed"


@pytest.fixture
def broker_log() -> Iterator[io.StringIO]:
    with captured_broker_log() as buffer:
        yield buffer


async def test_no_canary_of_a_provider_error_body_leaves_the_broker(
    tmp_path: Path, provider: Google, broker_log: io.StringIO
) -> None:
    pki: TestPki = make_test_pki(tmp_path)
    config = provider.configure(broker_config(tmp_path, pki))
    seen: dict[str, Expected] = {}
    texts: list[str] = []
    async with running_broker(config, pki) as running, running.channel(pki.alice) as channel:
        accounts, mail = stubs(channel)

        async def begin() -> dict[str, str]:
            begun = await accounts.BeginOAuth(
                apb.BeginOAuthRequest(
                    provider=provider.provider,
                    capabilities=[rpb.CAPABILITY_READ, rpb.CAPABILITY_SEND],
                    redirect_uri=provider.redirect_uri,
                ),
                timeout=10,
            )
            return await asyncio.to_thread(provider.consent, begun.authorization_uri)

        async def complete() -> Any:
            back = await begin()
            return await accounts.CompleteOAuth(
                apb.CompleteOAuthRequest(state=back["state"], code=back["code"]), timeout=20
            )

        account = await complete()
        provider.emulator.deliver(USER, _mail())
        listed = await mail.ListMessages(mpb.ListMessagesRequest(parent=account.name), timeout=20)
        message = listed.messages[0].name

        def refresh_then_list() -> Awaitable[object]:
            # The provider refuses the access token the broker holds, so the broker refreshes it.
            provider.emulator.expire_access_tokens(USER)
            return mail.ListFolders(mpb.ListFoldersRequest(parent=account.name), timeout=20)

        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "get": lambda: mail.GetMessage(mpb.GetMessageRequest(name=message), timeout=20),
            "list": lambda: mail.ListMessages(mpb.ListMessagesRequest(parent=account.name), timeout=20),
            "send": lambda: mail.SendMessage(_send_request(account.name), timeout=20),
            "refresh": refresh_then_list,
        }
        for name, inject, _ in provider.cases():
            kind = name.split()[0]
            if kind == "code":
                # The code exchange of a second consent (the provider answers the flow's last step).
                back = await begin()
                inject()
                call: Awaitable[object] = accounts.CompleteOAuth(
                    apb.CompleteOAuthRequest(state=back["state"], code=back["code"]), timeout=20
                )
            else:
                inject()
                call = calls[kind]()
            error = await fails(call)
            provider.emulator.clear_faults()
            seen[name] = (error.code(), error_reason(error))
            texts.append(everything(error))
    assert seen == {name: expected for name, _, expected in provider.cases()}
    assert [leaks(text, ALL) for text in texts] == [[]] * len(texts)
    log = broker_log.getvalue()
    # The log was captured, the libraries' DEBUG lines with it.
    assert "GetMessage" in log and ("urllib3" in log or "httplib2" in log or "googleapiclient" in log)
    assert leaking_lines(log, ALL) == []


def test_googleapiclient_keeps_a_documented_reason_and_withholds_any_other_text(broker_log: io.StringIO) -> None:
    """googleapiclient logs the "reason" of every 403, which is the error's status or message when the body has no
    errors list (a shape some Google front ends answer with)."""
    from googleapiclient import http as googleapiclient_http

    for body in (
        {"error": {"code": 403, "message": MESSAGE}},
        {"error": {"code": 403, "errors": [{"reason": "rateLimitExceeded", "message": MESSAGE}], "message": MESSAGE}},
    ):
        googleapiclient_http._should_retry_response(403, json.dumps(body).encode())
    log = broker_log.getvalue()
    assert "rateLimitExceeded" in log and "withheld" in log  # both lines were written
    assert leaking_lines(log, ALL) == []
