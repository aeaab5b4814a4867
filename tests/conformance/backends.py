"""Provider test environments for the conformance suite.

A :class:`Backend` is what one provider's test environment offers the suite: drivers on fresh, empty mailboxes, and
a way to act on the mailbox from the provider's side (mail arriving, a flag set or a message deleted by another
client, what the outgoing side accepted), never through the driver under test. The IMAP backend runs on the real
Dovecot and SMTP submission server of tests/mailserver; the Gmail and Outlook emulators join by implementing the
same class and adding themselves to ``BACKENDS`` in conftest.py.

One backend object serves one test. ``new_driver`` makes a fresh mailbox and makes it the *current* one: every
other method acts on the current mailbox. Messages are named by their Message-ID header (every provider can find a
message by it), not by a driver's ids, so acting on the mailbox never goes through the code under test.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from imapclient import IMAPClient

from server.domain.blocking import BlockingPool
from server.domain.mail import FolderRole
from server.domain.models import AccountProfile, Capability, MailServer, TransportSecurity
from server.providers.base import MailDriver
from server.providers.imap import ids
from server.providers.imap.connection import Credentials
from server.providers.imap.driver import ImapDriver, ImapSettings
from server.providers.imap.network import NetworkGuard
from tests.broker import LOOPBACK_NETWORKS
from tests.mailserver import SPECIAL_USE_FOLDERS, Mailbox, MailServers

ALL_CAPABILITIES = frozenset(Capability)


class Flag(enum.Enum):
    """Message state another client can change, in provider-neutral terms."""

    READ = "read"
    FLAGGED = "flagged"


@dataclass(frozen=True)
class SentMessage:
    """One message the provider's outgoing side accepted from the current mailbox's account."""

    envelope_from: str
    envelope_recipients: tuple[str, ...]
    raw: bytes


class Backend(abc.ABC):
    """One provider's test environment, as the conformance suite sees it."""

    name: str
    #: The provider has folders the account can create and delete (IMAP, Outlook; Gmail has labels instead).
    has_folders: bool
    #: Paging stays exact while the folder changes between pages (IMAP: the driver pages by UID). Where paging is
    #: the provider's own opaque page token and its documentation promises nothing under change (Gmail), False.
    exact_paging_under_change: bool = True
    #: The provider reports a message's size (IMAP RFC822.SIZE, Gmail sizeEstimate). Graph v1.0's message resource
    #: has no size property: it is only the extended property PR_MESSAGE_SIZE (0x0E08) through
    #: singleValueExtendedProperties, which Mail.ReadBasic (the METADATA grant) may not read ("except for body,
    #: bodyPreview, uniqueBody, attachments, extensions, and any extended properties"). Where False the driver
    #: reports 0 (unknown) rather than a size it only has for some grants.
    reports_message_size: bool = True

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """The current mailbox's own address (the sender of what it sends)."""

    @property
    @abc.abstractmethod
    def inbox_id(self) -> str:
        """The id a driver of this provider uses for the inbox."""

    @abc.abstractmethod
    async def new_driver(self, capabilities: frozenset[Capability] = ALL_CAPABILITIES) -> MailDriver:
        """A driver on a fresh, empty mailbox (now the current one), for an account granted ``capabilities``."""

    @abc.abstractmethod
    async def another_driver(self) -> MailDriver:
        """A second, independent driver instance on the current mailbox (as after a broker restart)."""

    @abc.abstractmethod
    async def driver_with_bad_credentials(self) -> MailDriver:
        """A driver for the current mailbox (a fresh one if there is none) whose credential the provider refuses."""

    @abc.abstractmethod
    async def unreachable_driver(self) -> MailDriver:
        """A driver whose provider endpoint does not answer (a closed loopback port)."""

    @abc.abstractmethod
    async def seed(
        self,
        raw_message: bytes,
        folder_role: FolderRole = FolderRole.INBOX,
        *,
        folder_name: str | None = None,
        flags: Iterable[Flag] = (),
    ) -> None:
        """Put a message into the current mailbox the way mail arrives there (``folder_name`` overrides the role:
        a folder made with :meth:`create_folder`)."""

    @abc.abstractmethod
    async def set_flag(self, internet_message_id: str, flag: Flag, value: bool = True) -> None:
        """Set or clear ``flag`` on the message with this Message-ID, as another client would."""

    @abc.abstractmethod
    async def flags(self, internet_message_id: str) -> frozenset[Flag]:
        """The message's flags as the provider holds them."""

    @abc.abstractmethod
    async def delete(self, internet_message_id: str) -> None:
        """Delete the message for good (IMAP: \\Deleted and EXPUNGE), as another client would."""

    async def create_folder(self, name: str) -> None:
        """Create a top-level folder (only where ``has_folders``)."""
        raise NotImplementedError(f"{self.name} has no folders")

    async def delete_folder(self, name: str) -> None:
        """Delete a folder made with :meth:`create_folder` (only where ``has_folders``)."""
        raise NotImplementedError(f"{self.name} has no folders")

    @abc.abstractmethod
    async def sent_messages(self) -> list[SentMessage]:
        """What the provider's outgoing side accepted from the current mailbox's account, oldest first."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close every driver this backend made and release what it holds."""


# ---------------------------------------------------------------------------------------------------------------------
# IMAP: the test Dovecot (IMAPS, LMTP) and SMTP submission server
# ---------------------------------------------------------------------------------------------------------------------

_FLAGS = {Flag.READ: b"\\Seen", Flag.FLAGGED: b"\\Flagged"}
_ROLE_FOLDERS = {FolderRole.INBOX: "INBOX"} | {
    FolderRole[flag.lstrip("\\").upper()]: name for name, flag in SPECIAL_USE_FOLDERS.items()
}
IMAP_TIMEOUT_SECONDS = 5.0
_CLOSED_PORT = 1  # tcpmux: nothing listens there on a test machine, so connections are refused at once


class ImapBackend(Backend):
    """Fresh users on the session's Dovecot; ``ImapDriver`` with implicit TLS for both IMAP and SMTP."""

    name = "imap"
    has_folders = True

    def __init__(self, servers: MailServers) -> None:
        self._servers = servers
        self._blocking = BlockingPool(8, name="conformance-imap")
        # The local Dovecot answers in milliseconds: a short timeout makes a hung call fail its test quickly.
        self._settings = ImapSettings(
            ca_file=str(servers.ca_path),
            timeout_seconds=IMAP_TIMEOUT_SECONDS,
            guard=NetworkGuard.from_config(LOOPBACK_NETWORKS),  # the local Dovecot is on loopback
        )
        self._drivers: list[ImapDriver] = []
        self._mailbox: Mailbox | None = None

    # -- drivers --------------------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return self._current().address

    @property
    def inbox_id(self) -> str:
        return ids.folder_id("INBOX")

    def _current(self) -> Mailbox:
        if self._mailbox is None:
            raise RuntimeError("no mailbox yet: call new_driver() first")
        return self._mailbox

    def _driver(self, address: str, password: str, *, host: str, imap_port: int, smtp_port: int) -> ImapDriver:
        profile = AccountProfile(
            email_address=address,
            username=address,
            imap_server=MailServer(host, imap_port, TransportSecurity.IMPLICIT_TLS),
            smtp_server=MailServer(host, smtp_port, TransportSecurity.IMPLICIT_TLS),
        )
        driver = ImapDriver(profile, Credentials(address, password), self._blocking, self._settings)
        self._drivers.append(driver)
        return driver

    def _current_driver(self, password: str | None = None) -> ImapDriver:
        mailbox = self._current()
        return self._driver(
            mailbox.address,
            mailbox.password if password is None else password,
            host=self._servers.host,
            imap_port=self._servers.imap_port,
            smtp_port=self._servers.smtps_port,
        )

    async def new_driver(self, capabilities: frozenset[Capability] = ALL_CAPABILITIES) -> MailDriver:
        # IMAP has no scopes: the broker enforces granted capabilities above the driver, so they change nothing here.
        self._mailbox = await asyncio.to_thread(self._servers.new_mailbox, "conformance")
        return self._current_driver()

    async def another_driver(self) -> MailDriver:
        return self._current_driver()

    async def driver_with_bad_credentials(self) -> MailDriver:
        if self._mailbox is None:
            self._mailbox = await asyncio.to_thread(self._servers.new_mailbox, "conformance")
        return self._current_driver(password=f"not-the-password-{secrets.token_hex(4)}")

    async def unreachable_driver(self) -> MailDriver:
        return self._driver(
            "nobody@example.test",
            "unused-password",
            host="127.0.0.1",
            imap_port=_CLOSED_PORT,
            smtp_port=_CLOSED_PORT,
        )

    # -- the provider's side --------------------------------------------------------------------------------------

    async def seed(
        self,
        raw_message: bytes,
        folder_role: FolderRole = FolderRole.INBOX,
        *,
        folder_name: str | None = None,
        flags: Iterable[Flag] = (),
    ) -> None:
        address = self._current().address
        folder = folder_name or _ROLE_FOLDERS[folder_role]
        imap_flags = [_FLAGS[flag].decode() for flag in flags]
        if folder == "INBOX" and not imap_flags:
            # As an MTA delivers: over LMTP.
            await asyncio.to_thread(self._servers.deliver, address, raw_message)
        else:
            await asyncio.to_thread(self._servers.append, address, folder, raw_message, imap_flags)

    def _locate(self, client: IMAPClient, internet_message_id: str) -> list[int]:
        """Select (read-write) the folder holding the message and return its UIDs there."""
        for flags, _, name in client.list_folders():
            if b"\\Noselect" in flags or b"\\NonExistent" in flags:
                continue
            client.select_folder(name)
            uids = client.search(["HEADER", "Message-ID", internet_message_id])
            if uids:
                return list(uids)
        raise LookupError("the test message is not in the mailbox")

    async def _with_imap(self, action: str, internet_message_id: str, flag: Flag | None = None) -> frozenset[Flag]:
        address = self._current().address

        def run() -> frozenset[Flag]:
            with self._servers.imap(address) as client:
                uids = self._locate(client, internet_message_id)
                if action == "add":
                    assert flag is not None
                    client.add_flags(uids, [_FLAGS[flag]])
                elif action == "remove":
                    assert flag is not None
                    client.remove_flags(uids, [_FLAGS[flag]])
                elif action == "delete":
                    client.add_flags(uids, [b"\\Deleted"])
                    client.expunge(uids)  # UID EXPUNGE: only this message
                    return frozenset()
                found = client.get_flags(uids)[uids[0]]
                lowered = {f.lower() for f in found}
                return frozenset(name for name, imap in _FLAGS.items() if imap.lower() in lowered)

        return await asyncio.to_thread(run)

    async def set_flag(self, internet_message_id: str, flag: Flag, value: bool = True) -> None:
        await self._with_imap("add" if value else "remove", internet_message_id, flag)

    async def flags(self, internet_message_id: str) -> frozenset[Flag]:
        return await self._with_imap("read", internet_message_id)

    async def delete(self, internet_message_id: str) -> None:
        await self._with_imap("delete", internet_message_id)

    async def create_folder(self, name: str) -> None:
        def run() -> None:
            with self._servers.imap(self._current().address) as client:
                client.create_folder(name)

        await asyncio.to_thread(run)

    async def delete_folder(self, name: str) -> None:
        def run() -> None:
            with self._servers.imap(self._current().address) as client:
                client.delete_folder(name)

        await asyncio.to_thread(run)

    async def sent_messages(self) -> list[SentMessage]:
        address = self._current().address.lower()
        return [
            SentMessage(received.mail_from, received.rcpt_tos, received.raw)
            for received in self._servers.smtp.messages
            if received.user.lower() == address
        ]

    async def aclose(self) -> None:
        drivers, self._drivers = self._drivers, []
        try:
            for driver in drivers:
                await driver.close()
        finally:
            await asyncio.to_thread(self._blocking.shutdown)
