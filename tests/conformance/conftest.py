"""Fixtures of the conformance suite: ``backend`` runs every test once per provider backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from server.domain.feeds import FeedHub
from tests.conformance.backends import Backend, ImapBackend
from tests.conformance.gmail_backend import REDIRECT_URI, GmailBackend
from tests.conformance.outlook_backend import REDIRECT_URI as OUTLOOK_REDIRECT_URI
from tests.conformance.outlook_backend import OutlookBackend
from tests.emulators.google.server import GoogleEmulator
from tests.emulators.google.state import Client
from tests.emulators.microsoft import App, MicrosoftEmulator
from tests.mailserver.fixtures import mail_servers  # noqa: F401 - a fixture, found by name


@pytest.fixture(scope="session")
def google_emulator_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GoogleEmulator, Client]]:
    """One Google emulator and OAuth client for the session (every Gmail test makes its own user on it)."""
    with GoogleEmulator(tmp_path_factory.mktemp("google-emulator")) as emulator:
        yield emulator, emulator.register_client(redirect_uris=[REDIRECT_URI])


@pytest.fixture(scope="session")
def microsoft_emulator_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MicrosoftEmulator, App]]:
    """One Microsoft emulator and app registration for the session (every Outlook test makes its own user)."""
    with MicrosoftEmulator(tmp_path_factory.mktemp("microsoft-emulator")) as emulator:
        yield emulator, emulator.register_app([OUTLOOK_REDIRECT_URI])


# Backend name -> how to make one from the test's request. Session-scoped servers are asked for here, lazily, so a
# run that selects one backend (``-k imap``) starts only that provider's environment.
BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Backend]] = {
    "imap": lambda request: ImapBackend(request.getfixturevalue("mail_servers")),
    "gmail": lambda request: GmailBackend(*request.getfixturevalue("google_emulator_session")),
    "outlook": lambda request: OutlookBackend(*request.getfixturevalue("microsoft_emulator_session")),
}


@pytest.fixture(params=sorted(BACKENDS))
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    made = BACKENDS[request.param](request)
    try:
        yield made
    finally:
        await made.aclose()


HUB_CLOSE_SECONDS = 30.0


@pytest.fixture
async def feed_hub(backend: Backend) -> AsyncIterator[FeedHub]:
    """A feed hub, closed (every watcher stopped, its connection closed) before the backend's drivers."""
    hub = FeedHub()
    try:
        yield hub
    finally:
        await _close(hub)


async def _close(hub: FeedHub) -> None:
    """``hub.close()``, made to finish even when a watcher misses its cancellation.

    A watcher can lose a cancel (test_feeds.py checks that it does not); hub.close() would then wait for it forever
    and hang the run. Cleaning up is not what the other tests check, so the watcher tasks (FeedHub._tasks, which
    exists to let close() wait for them) are cancelled again until they are gone.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HUB_CLOSE_SECONDS
    closing = asyncio.ensure_future(hub.close())
    while not closing.done():
        await asyncio.wait({closing}, timeout=0.2)
        if loop.time() > deadline:
            closing.cancel()
            raise TimeoutError("the feed hub's watchers did not stop")
        for task in list(hub._tasks):
            task.cancel()
    closing.result()
