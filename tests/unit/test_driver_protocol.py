"""Every driver has the MailDriver Protocol's members with its parameters (mypy checks the types where
server.domain.drivers makes each driver)."""

from __future__ import annotations

import inspect

from server.providers.base import MailDriver
from server.providers.imap.driver import ImapDriver


def test_the_imap_driver_has_every_protocol_member_with_the_same_parameters() -> None:
    for name, member in inspect.getmembers(MailDriver):
        if name.startswith("_") or not callable(member):
            continue
        implementation = getattr(ImapDriver, name)
        assert list(inspect.signature(implementation).parameters) == list(inspect.signature(member).parameters), name
