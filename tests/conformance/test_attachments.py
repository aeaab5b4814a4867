"""stream_attachment: bounded chunks, contiguous offsets, the exact decoded bytes, clear errors."""

from __future__ import annotations

import pytest

from server.domain.mail import AttachmentChunk, AttachmentInfo, MessageView
from server.errors import InvalidArgument, NotFound
from server.providers.base import ATTACHMENT_CHUNK_BYTES, MailDriver
from tests.conformance import samples
from tests.conformance.backends import Backend


async def _collect(driver: MailDriver, message_id: str, attachment_id: str) -> list[AttachmentChunk]:
    return [chunk async for chunk in driver.stream_attachment(message_id, attachment_id)]


async def _seed_one(backend: Backend, data: bytes, encoding: str, filename: str) -> tuple[MailDriver, str, str]:
    """A fresh mailbox holding one message with one attachment; returns (driver, message id, Message-ID)."""
    driver = await backend.new_driver()
    raw, mid = samples.with_attachment(data, encoding=encoding, filename=filename)
    await backend.seed(raw)
    (listed,) = (await driver.list_messages(None, None, 10, None)).messages
    return driver, listed.id, mid


async def _only_attachment(driver: MailDriver, message_id: str) -> AttachmentInfo:
    (info,) = (await driver.get_message(message_id, MessageView.FULL)).attachments
    return info


# Sizes chosen so that the encoded part does not end on a chunk boundary, and (quoted-printable) so that escapes and
# soft line breaks straddle the boundaries of the ranges a driver fetches.
@pytest.mark.parametrize(
    ("encoding", "size"),
    [("base64", 300_001), ("base64", 3 * ATTACHMENT_CHUNK_BYTES), ("quoted-printable", 200_003)],
)
async def test_an_attachment_streams_back_byte_for_byte_in_bounded_chunks(
    backend: Backend, encoding: str, size: int
) -> None:
    data = samples.payload(size, seed=size)
    driver, message_id, _ = await _seed_one(backend, data, encoding, "data.bin")
    info = await _only_attachment(driver, message_id)

    chunks = await _collect(driver, message_id, info.id)

    assert len(chunks) >= size // ATTACHMENT_CHUNK_BYTES
    assert all(0 < len(c.data) <= ATTACHMENT_CHUNK_BYTES for c in chunks), "a chunk is empty or too large"
    offsets = [c.offset for c in chunks]
    assert offsets == [sum(len(c.data) for c in chunks[:i]) for i in range(len(chunks))], "offsets not contiguous"
    streamed = b"".join(c.data for c in chunks)
    assert len(streamed) == size, "the attachment's length differs"
    same = streamed == data  # compared outside the assert: pytest would print the bytes
    assert same, "the attachment's bytes differ"
    first = chunks[0].info
    assert first is not None, "the first chunk does not carry the attachment's description"
    assert (first.id, first.filename, first.content_type) == (info.id, "data.bin", "application/octet-stream")
    assert all(c.info is None for c in chunks[1:]), "a later chunk repeats the description"


async def test_a_small_inline_attachment_is_one_chunk(backend: Backend) -> None:
    driver = await backend.new_driver()
    raw, _ = samples.rich()
    await backend.seed(raw)
    (listed,) = (await driver.list_messages(None, None, 10, None)).messages
    message = await driver.get_message(listed.id, MessageView.FULL)
    image = next(a for a in message.attachments if a.filename == "logo.png")

    chunks = await _collect(driver, listed.id, image.id)

    assert [c.offset for c in chunks] == [0]
    same = chunks[0].data == samples.IMAGE_BYTES
    assert same, "the image's bytes differ"
    assert chunks[0].info is not None and chunks[0].info.content_id == samples.IMAGE_CID


async def test_an_abandoned_stream_leaves_the_driver_usable(backend: Backend) -> None:
    data = samples.payload(400_000, seed=1)
    driver, message_id, _ = await _seed_one(backend, data, "base64", "big.bin")
    info = await _only_attachment(driver, message_id)

    stream = driver.stream_attachment(message_id, info.id)
    first = await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]

    same_start = first.data == data[: len(first.data)]
    assert first.offset == 0 and same_start, "the first chunk is not the attachment's start"
    same = b"".join(c.data for c in await _collect(driver, message_id, info.id)) == data
    assert same, "the attachment's bytes differ after an abandoned stream"


async def test_an_unknown_attachment_id_is_not_found(backend: Backend) -> None:
    driver, message_id, _ = await _seed_one(backend, b"attached bytes", "base64", "a.bin")
    info = await _only_attachment(driver, message_id)
    raw, _ = samples.simple("no attachments here")
    await backend.seed(raw)
    plain = next(m for m in (await driver.list_messages(None, None, 10, None)).messages if m.id != message_id)

    # Another message's attachment id, and a made-up one.
    for message, attachment in ((plain.id, info.id), (message_id, "9999")):
        with pytest.raises(NotFound) as caught:
            await _collect(driver, message, attachment)
        assert caught.value.reason == "ATTACHMENT_NOT_FOUND"

    for made_up in ("", "x", "../1", "1/2", "A" * 5000):
        with pytest.raises((InvalidArgument, NotFound)) as refused:
            await _collect(driver, message_id, made_up)
        assert (type(refused.value), refused.value.reason) in {
            (InvalidArgument, "INVALID_RESOURCE_NAME"),
            (NotFound, "ATTACHMENT_NOT_FOUND"),
        }


async def test_an_attachment_of_a_deleted_message_is_not_found(backend: Backend) -> None:
    driver, message_id, mid = await _seed_one(backend, b"attached bytes", "base64", "a.bin")
    info = await _only_attachment(driver, message_id)
    await backend.delete(mid)

    with pytest.raises(NotFound) as caught:
        await _collect(driver, message_id, info.id)
    assert caught.value.reason == "MESSAGE_NOT_FOUND"


async def test_a_message_deleted_mid_stream_fails_the_stream_and_never_truncates_it(backend: Backend) -> None:
    data = samples.payload(5 * ATTACHMENT_CHUNK_BYTES, seed=5)
    driver, message_id, mid = await _seed_one(backend, data, "base64", "doomed.bin")
    info = await _only_attachment(driver, message_id)

    received = b""
    failure: NotFound | None = None
    stream = driver.stream_attachment(message_id, info.id)
    try:
        received += (await anext(stream)).data
        await backend.delete(mid)
        async for chunk in stream:
            received += chunk.data
    except NotFound as exc:
        failure = exc
    finally:
        await stream.aclose()  # type: ignore[attr-defined]

    # Either the provider still serves the whole attachment, or the stream fails: never a short, "complete" one.
    if failure is not None:
        assert failure.reason == "MESSAGE_NOT_FOUND"
    else:
        complete = received == data
        assert complete, f"the stream ended early, after {len(received)} of {len(data)} bytes, without an error"
