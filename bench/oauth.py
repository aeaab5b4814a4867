"""OAuth token single-flight: 100 concurrent RPCs on an account whose access token is unusable make exactly one
request to the provider's token endpoint, against the local Google and Microsoft emulators (tests/emulators).

Two ways a token is unusable, for each provider:

- cold: the broker was restarted, so it holds no access token (it keeps them in memory only);
- expired: the broker holds one, the provider has expired it (the emulator's ``expire_access_tokens``), so every
  call's first API request answers 401 and each of them has to get a fresh token.

The emulators run in this process (threads); the broker runs in its own, as in every figure. The count is the
emulator's own counter of refresh_token grants it answered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1 import resources_pb2 as rpb

from bench.harness import BrokerProcess, Run, account_stub, mail_stub
from bench.report import FigureResult, Target
from bench.stats import Latency
from tests.emulators.google import GoogleEmulator
from tests.emulators.microsoft import MicrosoftEmulator

CALLS = 100
GOOGLE_REDIRECT = "https://app.example.test/oauth/callback"
MICROSOFT_REDIRECT = "https://broker.test/oauth/microsoft/callback"
GOOGLE_USER = "bench.gmail.user@example.test"
MICROSOFT_USER = "bench.outlook.user@contoso.test"
SEPARATE = "broker in its own process (python -m server.cli serve); emulator and asyncio gRPC client in the bench"


def _mail(to: str) -> bytes:
    message = EmailMessage()
    message["From"] = "Bench Sender <bench.sender@example.test>"
    message["To"] = to
    message["Subject"] = "single flight"
    message["Message-ID"] = "<single-flight@example.test>"
    message.set_content("bench body text")
    return bytes(message)


class Provider:
    """What differs between the two emulators: broker settings, consent, the inbox's folder id, the counter."""

    name = ""
    inbox = ""
    user = ""
    provider: rpb.Provider = rpb.PROVIDER_UNSPECIFIED
    redirect = ""

    def settings(self) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def consent(self, url: str) -> tuple[str, str]:
        """(state, code) the provider sends back after the user consented at ``url``."""
        raise NotImplementedError

    @property
    def emulator(self) -> GoogleEmulator | MicrosoftEmulator:
        raise NotImplementedError

    def refreshes(self) -> int:
        return self.emulator.counters().get("token.refresh_token", 0)


class Google(Provider):
    name, inbox, user = "Google", "INBOX", GOOGLE_USER

    def __init__(self, directory: Path) -> None:
        self._emulator = GoogleEmulator(directory).start()
        self._client = self._emulator.register_client([GOOGLE_REDIRECT])
        self._emulator.add_user(self.user)
        self.provider = rpb.PROVIDER_GOOGLE
        self.redirect = GOOGLE_REDIRECT

    @property
    def emulator(self) -> GoogleEmulator:
        return self._emulator

    def settings(self) -> dict[str, dict[str, Any]]:
        e = self._emulator
        return {
            "google": {
                "client_id": self._client.client_id,
                "client_secret": self._client.client_secret,
                "redirect_uris": [GOOGLE_REDIRECT],
                "authorization_endpoint": e.authorize_url,
                "token_endpoint": e.token_url,
                "revoke_endpoint": e.revoke_url,
                "certs_url": e.certs_url,
                "issuers": [e.issuer],
                "api_endpoint": e.gmail_api_endpoint,
                "ca_file": str(e.ca_path),
            }
        }

    def consent(self, url: str) -> tuple[str, str]:
        back = {k: v[0] for k, v in parse_qs(urlsplit(self._emulator.authorize(url, user=self.user)).query).items()}
        return back["state"], back["code"]


class Microsoft(Provider):
    name, inbox, user = "Microsoft", "inbox", MICROSOFT_USER

    def __init__(self, directory: Path) -> None:
        self._emulator = MicrosoftEmulator(directory).start()
        self._app = self._emulator.register_app([MICROSOFT_REDIRECT])
        self._emulator.add_user(self.user)
        self.provider = rpb.PROVIDER_MICROSOFT
        self.redirect = MICROSOFT_REDIRECT

    @property
    def emulator(self) -> MicrosoftEmulator:
        return self._emulator

    def settings(self) -> dict[str, dict[str, Any]]:
        e = self._emulator
        return {
            "microsoft": {
                "client_id": self._app.client_id,
                "client_secret": self._app.client_secret,
                "redirect_uris": [MICROSOFT_REDIRECT],
                "authority_host": e.base_url,
                "authority": "common",
                "graph_endpoint": e.graph_url,
                "ca_file": str(e.ca_path),
            }
        }

    def consent(self, url: str) -> tuple[str, str]:
        _, posted = self._emulator.authorize_form_post(url, user=self.user)
        return posted["state"], posted["code"]


def oauth_single_flight(run: Run) -> FigureResult:
    result = FigureResult("oauth_single_flight")
    calls = run.count(CALLS, CALLS)  # the figure is about 100: the quick pass makes the same calls
    for kind in (Google, Microsoft):
        directory = run.workdir / f"oauth-{kind.name.lower()}"
        provider = kind(directory / "emulator")
        try:
            _measure(run, result, provider, directory, calls)
        finally:
            provider.emulator.stop()
    result.setup = (
        f"{SEPARATE}; one account per provider connected through BeginOAuth/CompleteOAuth, then {calls} concurrent "
        f"ListMessages on its inbox from one channel: once on a restarted broker (no access token in memory), once "
        f"after the emulator expired the broker's access token (every call's first API request gets 401)"
    )
    return result


def _measure(run: Run, result: FigureResult, provider: Provider, directory: Path, calls: int) -> None:
    provider.emulator.deliver(provider.user, _mail(provider.user))
    ca = provider.emulator.ca_path
    with BrokerProcess(directory, run.pki, ca, settings=provider.settings(), probe=run.probe) as broker:
        account = asyncio.run(_connect(broker, provider))
    details: dict[str, Any] = {}
    with BrokerProcess(directory, run.pki, ca, settings=provider.settings(), probe=run.probe) as broker:

        def expire() -> None:
            provider.emulator.expire_access_tokens(provider.user)

        for label, before in (("cold", None), ("expired", expire)):
            refreshes_before = provider.refreshes()
            seconds, failed, latency = asyncio.run(_burst(broker, account, provider, calls, before))
            requests = provider.refreshes() - refreshes_before
            result.add(
                f"{provider.name}, {label} token: token-endpoint requests",
                requests,
                "",
                Target("==", 1),
                f"{calls} calls, {calls - failed} answered in {seconds * 1000:.0f} ms; p50 {latency.median_ms:.3g} ms",
            )
            if requests < 1 or failed:
                result.notes.append(f"{provider.name} {label}: {requests} refreshes, {failed} calls failed")
            details[label] = {"refreshes": requests, "failed": failed, "seconds": seconds, "latency": vars(latency)}
    result.details[provider.name] = details


async def _connect(broker: BrokerProcess, provider: Provider) -> str:
    async with broker.aio_channel() as channel:
        accounts = account_stub(channel)
        begun = await accounts.BeginOAuth(
            apb.BeginOAuthRequest(
                provider=provider.provider, capabilities=[rpb.CAPABILITY_READ], redirect_uri=provider.redirect
            ),
            timeout=30,
        )
        state, code = await asyncio.to_thread(provider.consent, begun.authorization_uri)
        account = await accounts.CompleteOAuth(apb.CompleteOAuthRequest(state=state, code=code), timeout=30)
        return str(account.name)


async def _burst(
    broker: BrokerProcess, account: str, provider: Provider, calls: int, before: Callable[[], None] | None
) -> tuple[float, int, Latency]:
    """``calls`` concurrent ListMessages (after one that warms the channel and, when ``before`` is given, the token,
    and then ``before()``); returns their wall time, how many failed, and their latencies."""
    request = mpb.ListMessagesRequest(parent=account, folder=f"{account}/folders/{provider.inbox}")
    async with broker.aio_channel() as channel:
        mail = mail_stub(channel)
        if before is not None:
            await mail.ListMessages(request, timeout=60)
            before()
        else:  # the channel up (TLS) without touching the account, so the burst is only the calls
            await channel.channel_ready()

        async def one() -> float:
            began = time.perf_counter()
            await mail.ListMessages(request, timeout=60)
            return time.perf_counter() - began

        started = time.perf_counter()
        outcomes = await asyncio.gather(*(one() for _ in range(calls)), return_exceptions=True)
        seconds = time.perf_counter() - started
    times = [o for o in outcomes if isinstance(o, float)]
    failed = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    others = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, grpc.aio.AioRpcError)]
    if others:
        raise others[0]
    for error in failed[:1]:
        print(f"  a call failed: {error.code().name} {error.details()}", flush=True)
    return seconds, len(failed), Latency.of(times or [float("nan")])
