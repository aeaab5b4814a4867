"""list_folders: an inbox with the INBOX role, URL-safe ids that stay the same."""

from __future__ import annotations

import re

import pytest

from server.domain.mail import FolderRole
from server.errors import NotFound
from tests.conformance import samples
from tests.conformance.backends import Backend

URL_SAFE = re.compile(r"[A-Za-z0-9_-]+")


async def test_the_inbox_is_listed_with_its_role_and_is_the_drivers_inbox(backend: Backend) -> None:
    driver = await backend.new_driver()
    folders = await driver.list_folders()

    inboxes = [f for f in folders if f.role is FolderRole.INBOX]
    assert len(inboxes) == 1, "exactly one folder has the INBOX role"
    assert inboxes[0].id == driver.inbox_id == backend.inbox_id
    assert len({f.id for f in folders}) == len(folders), "folder ids are unique"


async def test_folder_ids_are_url_safe_and_stable_across_calls_and_driver_instances(backend: Backend) -> None:
    driver = await backend.new_driver()
    if backend.has_folders:
        # Names that a naive id scheme would get wrong: a space, a non-ASCII letter (IMAP's modified UTF-7), an
        # ampersand (the escape of modified UTF-7) and characters that are not URL-safe.
        for name in ("Project Plans", "Grüße", "Q&A", "a+b=c, 50%"):
            await backend.create_folder(name)

    first = await driver.list_folders()
    second = await driver.list_folders()
    other = await (await backend.another_driver()).list_folders()

    for folder in first:
        assert URL_SAFE.fullmatch(folder.id), "a folder id is not URL-safe"
        assert folder.parent_id is None or URL_SAFE.fullmatch(folder.parent_id), "a parent id is not URL-safe"
    by_name = {f.display_name: f.id for f in first}
    assert {f.display_name: f.id for f in second} == by_name
    assert {f.display_name: f.id for f in other} == by_name
    if backend.has_folders:
        assert {"Project Plans", "Grüße", "Q&A", "a+b=c, 50%"} <= set(by_name), "created folders are listed by name"
        # Each id names its folder: a message filed in one is listed through its id, and only there.
        for name in ("Project Plans", "Grüße", "Q&A", "a+b=c, 50%"):
            raw, mid = samples.simple(f"filed in {name}")
            await backend.seed(raw, folder_name=name)
            page = await driver.list_messages(by_name[name], None, 10, None)
            assert [m.internet_message_id for m in page.messages] == [mid], "a folder id lists another folder"
            assert page.messages[0].folder_ids == (by_name[name],)


async def test_a_created_folder_can_be_listed_into_and_a_deleted_one_is_gone(backend: Backend) -> None:
    if not backend.has_folders:
        pytest.skip(f"{backend.name} has no folders to create")
    driver = await backend.new_driver()
    await backend.create_folder("Receipts")
    raw, mid = samples.simple("filed away")
    await backend.seed(raw, folder_name="Receipts")

    folder = next(f for f in await driver.list_folders() if f.display_name == "Receipts")
    page = await driver.list_messages(folder.id, None, 10, None)
    assert [m.internet_message_id for m in page.messages] == [mid]
    assert page.messages[0].folder_ids == (folder.id,)
    assert (await driver.list_messages(None, None, 10, None)).messages == [], "the inbox stayed empty"

    await backend.delete(mid)
    await backend.delete_folder("Receipts")
    assert "Receipts" not in {f.display_name for f in await driver.list_folders()}
    with pytest.raises(NotFound) as caught:
        await driver.list_messages(folder.id, None, 10, None)
    assert caught.value.reason == "FOLDER_NOT_FOUND"
