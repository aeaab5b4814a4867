"""Provider failures become the broker's errors: a refused credential, a provider that is not there."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

from server.domain.feeds import FeedHub
from server.domain.mail import EmailAddress, MessageView, OutgoingMessage
from server.errors import BrokerError, ProviderUnavailable, Unauthenticated
from server.providers import mime
from server.providers.base import MailDriver
from tests.conformance import samples
from tests.conformance.backends import Backend

Call = Callable[[MailDriver], Awaitable[object]]


async def _first_chunk(driver: MailDriver, message_id: str, attachment_id: str) -> object:
    return await anext(driver.stream_attachment(message_id, attachment_id))


def _calls(message_id: str, attachment_id: str, sender: str) -> dict[str, Call]:
    built = mime.build_message(
        OutgoingMessage(to=(EmailAddress("reader@example.test"),), subject="never sent", text_body="never sent"),
        EmailAddress(sender),
        message_id_domain="conformance.example.test",
    )
    return {
        "list_folders": lambda d: d.list_folders(),
        "list_messages": lambda d: d.list_messages(None, None, 10, None),
        "get_message": lambda d: d.get_message(message_id, MessageView.METADATA),
        "stream_attachment": lambda d: _first_chunk(d, message_id, attachment_id),
        "send_message": lambda d: d.send_message(built, sender),
    }


async def _ids(backend: Backend) -> tuple[str, str]:
    """A real message id and attachment id, from a working driver on the current mailbox."""
    driver = await backend.new_driver()
    raw, _ = samples.with_attachment(b"attached", encoding="base64", filename="a.bin")
    await backend.seed(raw)
    (listed,) = (await driver.list_messages(None, None, 10, None)).messages
    (attachment,) = (await driver.get_message(listed.id, MessageView.FULL)).attachments
    return listed.id, attachment.id


def _check_says_nothing_personal(error: BrokerError, *secrets: str) -> None:
    text = " ".join([error.message, *error.metadata.keys(), *error.metadata.values()])
    for secret in secrets:
        leaked = secret.lower() in text.lower()
        assert not leaked, "an error message names the account, the server or a credential"


async def _watch(hub: FeedHub, driver: MailDriver) -> None:
    subscriber = hub.subscribe(
        f"conformance-{secrets.token_hex(4)}", driver.inbox_id, lambda: driver.folder_watcher(driver.inbox_id), None
    )
    await asyncio.wait_for(subscriber.start, 20)


async def _failures(
    make_driver: Callable[[], Awaitable[MailDriver]], calls: dict[str, Call]
) -> dict[str, BrokerError | None]:
    """Each call on a fresh driver of its own (so it is that driver's first use), all at once."""

    async def attempt(call: Call) -> BrokerError | None:
        driver = await make_driver()
        try:
            await call(driver)
        except BrokerError as exc:
            return exc
        return None

    return dict(zip(calls, await asyncio.gather(*(attempt(call) for call in calls.values())), strict=True))


async def test_a_refused_credential_is_unauthenticated_on_first_use(backend: Backend, feed_hub: FeedHub) -> None:
    message_id, attachment_id = await _ids(backend)
    calls = _calls(message_id, attachment_id, backend.address) | {"watch": lambda d: _watch(feed_hub, d)}

    failures = await _failures(backend.driver_with_bad_credentials, calls)

    assert {name: (isinstance(e, Unauthenticated), e and e.reason) for name, e in failures.items()} == {
        name: (True, "PROVIDER_AUTH_FAILED") for name in calls
    }
    for error in failures.values():
        assert error is not None
        _check_says_nothing_personal(error, backend.address)
    assert await backend.sent_messages() == [], "a message went out without a valid credential"


async def test_a_provider_that_is_not_there_is_unavailable(backend: Backend, feed_hub: FeedHub) -> None:
    message_id, attachment_id = await _ids(backend)
    calls = _calls(message_id, attachment_id, "nobody@example.test") | {"watch": lambda d: _watch(feed_hub, d)}

    failures = await _failures(backend.unreachable_driver, calls)

    assert {name: (isinstance(e, ProviderUnavailable), e and e.reason) for name, e in failures.items()} == {
        name: (True, "PROVIDER_UNREACHABLE") for name in calls
    }
    for error in failures.values():
        assert error is not None
        _check_says_nothing_personal(error, "nobody@example.test", "127.0.0.1")
