"""A minimal asyncio IMAP client for change feeds: log in, EXAMINE with QRESYNC, IDLE, and ask what changed.

Why our own: a feed holds one IDLE connection per watched folder for hours, and a process watches thousands of
accounts, so a thread per connection (imapclient is blocking) does not scale. aioimaplib has no STARTTLS. The
feed needs only a handful of commands whose responses carry no message content (UIDs, flags, MODSEQs), so a
small client on asyncio streams does the job; everything that reads content stays on imapclient.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from dataclasses import dataclass, field

from imapclient import imap_utf7

from server.domain.models import MailServer, TransportSecurity
from server.errors import FailedPrecondition, NotFound, ProviderUnavailable, Unauthenticated
from server.providers.imap import network
from server.providers.imap.connection import ConnectionLost, Credentials
from server.providers.imap.network import NetworkGuard

MAX_LINE = 1 << 20  # a response line (VANISHED sets, flag lists) beyond this is a broken or hostile server
_LITERAL = re.compile(rb"\{(\d+)\}\r\n$")
_CODE = re.compile(rb"\[([A-Z-]+)(?: ([^\]]*))?\]")
_FETCH = re.compile(rb"^\* (\d+) FETCH \((.*)\)\r\n$", re.S)
_UID = re.compile(rb"\bUID (\d+)")
_MODSEQ = re.compile(rb"\bMODSEQ \((\d+)\)")
_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)")
_VANISHED = re.compile(rb"^\* VANISHED (?:\(EARLIER\) )?([0-9:,]+)")
_STATUS_MODSEQ = re.compile(rb"HIGHESTMODSEQ (\d+)")
# Changes the server reports on its own initiative during any command. Once reported, it will not repeat them in
# the next IDLE, so a watcher that saw one must look again before idling (else the change waits for the next one).
_UNSOLICITED = re.compile(rb"^\* (?:\d+ (?:EXISTS|EXPUNGE|RECENT)|VANISHED (?!\(EARLIER\)))")
_EXISTS = re.compile(rb"^\* (\d+) EXISTS")
_EXPUNGE = re.compile(rb"^\* (\d+) EXPUNGE")


@dataclass
class Examined:
    """What EXAMINE reported about a folder."""

    uidvalidity: int = 0
    uidnext: int = 0
    highestmodseq: int = 0
    exists: int = 0


@dataclass
class Changes:
    """The answer to ``UID FETCH 1:* (UID FLAGS) (CHANGEDSINCE m VANISHED)``."""

    fetched: list[tuple[int, int, tuple[bytes, ...]]] = field(default_factory=list)  # (uid, modseq, flags)
    vanished: list[int] = field(default_factory=list)
    # The folder's HIGHESTMODSEQ just before the fetch: every expunge in ``vanished`` up to it is covered by it.
    highestmodseq: int = 0


def parse_uid_set(text: bytes, limit: int = 1_000_000) -> list[int]:
    """``1:3,7`` → [1, 2, 3, 7], refusing absurd ranges."""
    uids: list[int] = []
    for piece in text.split(b","):
        low, _, high = piece.partition(b":")
        start, end = int(low), int(high or low)
        if start > end:
            start, end = end, start
        if len(uids) + (end - start + 1) > limit:
            raise ProviderUnavailable("the mail server sent an absurd UID set", reason="PROVIDER_PROTOCOL_ERROR")
        uids.extend(range(start, end + 1))
    return uids


def _quote(value: str) -> bytes:
    return b'"' + value.encode("utf-8").replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


class AsyncImap:
    """One IMAP connection driven from the event loop. Not safe for concurrent commands: one task owns it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout = timeout
        self._tag = 0
        self.capabilities: set[bytes] = set()
        self._mailbox = b""
        self._idling = False
        self.unsolicited = False  # a change was reported during a command (see _UNSOLICITED)

    @classmethod
    async def connect(
        cls, server: MailServer, credentials: Credentials, tls: ssl.SSLContext, timeout: float, *, guard: NetworkGuard
    ) -> AsyncImap:
        """Log in on an address ``guard`` permits (resolved once; TLS verifies the host name, not the address)."""
        addresses = await guard.addresses_async(server.host, server.port, role="imap_server")
        try:
            implicit = server.security is TransportSecurity.IMPLICIT_TLS
            async with asyncio.timeout(timeout):
                reader, writer = await network.open_stream(
                    addresses, server.port, tls=tls if implicit else None, server_hostname=server.host, limit=MAX_LINE
                )
        except ssl.SSLCertVerificationError as exc:
            raise FailedPrecondition(
                "the mail server's TLS certificate could not be verified", reason="PROVIDER_TLS_UNTRUSTED"
            ) from exc
        except (OSError, TimeoutError) as exc:
            raise ProviderUnavailable("the mail server cannot be reached", reason="PROVIDER_UNREACHABLE") from exc
        client = cls(reader, writer, timeout)
        try:
            await client._greeting()
            if server.security is TransportSecurity.STARTTLS:
                await client.command(b"STARTTLS")
                # Anything already buffered arrived in plaintext after the OK: an injection attempt (RFC 2595 §3.1
                # and CVE-2011-0411's class of bugs). Nothing may be read as if it came over TLS.
                if getattr(reader, "_buffer", b""):  # asyncio offers no public "bytes pending" check
                    raise ProviderUnavailable(
                        "the mail server sent data after STARTTLS in plaintext", reason="PROVIDER_PROTOCOL_ERROR"
                    )
                async with asyncio.timeout(timeout):
                    await writer.start_tls(tls, server_hostname=server.host)
            await client._login(credentials)
            await client._refresh_capabilities()
        except BaseException:
            await client.close()
            raise
        return client

    async def _readline(self, timeout: float | None = None) -> bytes:
        """One response line, with any literals it announces folded in."""
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that arrives as the
            # read completes, and a watcher told to stop would carry on.
            async with asyncio.timeout(timeout or self._timeout):
                line = await self._reader.readuntil(b"\r\n")
            while (match := _LITERAL.search(line)) is not None:
                size = int(match.group(1))
                if size > MAX_LINE:
                    raise ProviderUnavailable(
                        "the mail server sent an oversized literal", reason="PROVIDER_PROTOCOL_ERROR"
                    )
                async with asyncio.timeout(self._timeout):
                    literal = await self._reader.readexactly(size)
                    line = line + literal + await self._reader.readuntil(b"\r\n")
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            ssl.SSLError,
            TimeoutError,  # a server that stopped answering is a lost connection: reconnect and catch up
        ) as exc:
            raise ConnectionLost() from exc
        if line.startswith(b"* BYE"):
            raise ConnectionLost()
        return line

    async def _greeting(self) -> None:
        line = await self._readline()
        if not line.startswith(b"* OK"):
            raise ProviderUnavailable("the mail server refused the connection", reason="PROVIDER_UNAVAILABLE")

    def _next_tag(self) -> bytes:
        self._tag += 1
        return b"F%d" % self._tag

    async def _send(self, data: bytes) -> None:
        try:
            if self._writer.is_closing():  # uvloop raises RuntimeError on a write after the connection was lost
                raise ConnectionResetError("the connection is closed")
            self._writer.write(data)
            async with asyncio.timeout(self._timeout):
                await self._writer.drain()
        except (ConnectionError, ssl.SSLError, TimeoutError) as exc:
            raise ConnectionLost() from exc

    async def command(self, *parts: bytes, literals: tuple[bytes, ...] = ()) -> list[bytes]:
        """Send a command (``literals`` follow it as synchronizing literals) and return its untagged lines."""
        tag = self._next_tag()
        first = tag + b" " + b" ".join(parts)
        for literal in literals:
            await self._send(first + b" {%d}\r\n" % len(literal))
            line = await self._readline()
            if not line.startswith(b"+"):
                return self._tagged_failure(line)
            first = literal
        await self._send(first + b"\r\n")
        untagged: list[bytes] = []
        while True:
            line = await self._readline()
            if line.startswith(tag + b" "):
                status = line[len(tag) + 1 :]
                if status.startswith(b"OK"):
                    return untagged
                return self._tagged_failure(line)
            if _UNSOLICITED.match(line):
                self.unsolicited = True
            untagged.append(line)

    @staticmethod
    def _tagged_failure(line: bytes) -> list[bytes]:
        if b"AUTHENTICATIONFAILED" in line:
            raise Unauthenticated("the mail server refused the credentials", reason="PROVIDER_AUTH_FAILED")
        # Dovecot omits the code on EXAMINE; "[CANNOT]" or "not valid" is a name no folder can have.
        if any(mark in line.lower() for mark in (b"nonexistent", b"doesn't exist", b"[cannot]", b"not valid")):
            raise NotFound("folder not found", reason="FOLDER_NOT_FOUND")
        raise ProviderUnavailable("the mail server answered with an error", reason="PROVIDER_ERROR")

    async def _login(self, credentials: Credentials) -> None:
        # Literals, so any character in a name or password is sent as it is (no quoting rules to get wrong).
        try:
            await self.command(
                b"LOGIN", literals=(credentials.username.encode("utf-8"), credentials.password.encode("utf-8"))
            )
        except ConnectionLost:
            raise  # a dropped connection is not a refused password
        except ProviderUnavailable as exc:
            raise Unauthenticated("the mail server refused the credentials", reason="PROVIDER_AUTH_FAILED") from exc

    async def _refresh_capabilities(self) -> None:
        for line in await self.command(b"CAPABILITY"):
            if line.startswith(b"* CAPABILITY "):
                self.capabilities = set(line[len(b"* CAPABILITY ") :].strip().upper().split())

    @property
    def qresync(self) -> bool:
        return b"QRESYNC" in self.capabilities

    async def enable_qresync(self) -> None:
        if self.qresync:
            await self.command(b"ENABLE", b"QRESYNC")

    async def examine(self, folder: str) -> Examined:
        mailbox = _quote(imap_utf7.encode(folder).decode("ascii"))
        self._mailbox = mailbox
        parts = [b"EXAMINE", mailbox]
        if self.qresync:
            parts.append(b"(CONDSTORE)")
        state = Examined()
        for line in await self.command(*parts):
            if (exists := _EXISTS.match(line)) is not None:
                state.exists = int(exists.group(1))
            for name, value in _CODE.findall(line):
                if name == b"UIDVALIDITY":
                    state.uidvalidity = int(value)
                elif name == b"UIDNEXT":
                    state.uidnext = int(value)
                elif name == b"HIGHESTMODSEQ":
                    state.highestmodseq = int(value)
        return state

    async def changes_since(self, modseq: int) -> Changes:
        """Everything changed after ``modseq``: fetched (new or re-flagged) and vanished UIDs.

        Expunges carry no MODSEQ, so the folder's HIGHESTMODSEQ is read first: it bounds the expunges reported,
        which lets a cursor move past them (STATUS on the selected folder is cheap on the servers we know).
        """
        status = await self.command(b"STATUS", self._mailbox, b"(HIGHESTMODSEQ)")
        lines = await self.command(b"UID", b"FETCH", b"1:*", b"(UID FLAGS)", b"(CHANGEDSINCE %d VANISHED)" % modseq)
        changes = parse_changes(lines)
        for line in status:
            if (match := _STATUS_MODSEQ.search(line)) is not None:
                changes.highestmodseq = int(match.group(1))
        return changes

    async def idle(self, wait: float, interrupt: asyncio.Event) -> list[bytes]:
        """IDLE until the server reports something, ``interrupt`` is set, or ``wait`` seconds pass; then DONE.
        Returns the untagged lines received (EXISTS, EXPUNGE, VANISHED, FETCH)."""
        tag = self._next_tag()
        await self._send(tag + b" IDLE\r\n")
        self._idling = True
        seen: list[bytes] = []
        while True:
            line = await self._readline()
            if line.startswith(b"+"):
                break
            if line.startswith(tag + b" "):
                raise ProviderUnavailable("the mail server refused IDLE", reason="PROVIDER_CAPABILITY_MISSING")
            seen.append(line)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not seen and not interrupt.is_set() and (remaining := deadline - loop.time()) > 0:
            reader = asyncio.ensure_future(self._readline(timeout=remaining + self._timeout))
            stopper = asyncio.ensure_future(interrupt.wait())
            try:
                await asyncio.wait({reader, stopper}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                if not reader.done():
                    reader.cancel()
                    # Wait for it even when we are being cancelled ourselves: a reader left behind would fail
                    # later with nobody to hear it.
                    await asyncio.gather(reader, return_exceptions=True)
            if reader.cancelled():
                break  # the wait ran out, or a subscriber is joining
            line = reader.result()
            # A keepalive ("* OK Still here") is no change: stay in IDLE. Ending IDLE for it would wake a
            # hibernated Dovecot session, and mail arriving as it hibernates again is not always reported.
            if not line.startswith(b"* OK"):
                seen.append(line)
        await self._send(b"DONE\r\n")
        self._idling = False
        while True:
            line = await self._readline()
            if line.startswith(tag + b" "):
                return [line for line in seen if not line.startswith(b"* OK")]
            seen.append(line)

    async def close(self) -> None:
        """LOGOUT and wait (briefly) for the server's goodbye before closing, so TLS shuts down cleanly."""
        try:
            if not self._writer.is_closing():
                # An IDLE cut short by a cancellation is still open on the server: end it, or LOGOUT is ignored.
                self._writer.write((b"DONE\r\n" if self._idling else b"") + b"Z LOGOUT\r\n")
                async with asyncio.timeout(2):
                    await self._drain_until(b"Z ")
        except (OSError, TimeoutError, ssl.SSLError, ConnectionLost, ProviderUnavailable):
            pass
        finally:
            # Even when cancelled mid-goodbye: the socket must not outlive the watcher.
            self._writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            async with asyncio.timeout(2):
                await self._writer.wait_closed()

    async def _drain_until(self, prefix: bytes) -> None:
        while True:
            line = await self._reader.readline()
            if not line or line.startswith(prefix):
                return


def parse_changes(lines: list[bytes]) -> Changes:
    changes = Changes()
    for line in lines:
        if (vanished := _VANISHED.match(line)) is not None:
            changes.vanished.extend(parse_uid_set(vanished.group(1)))
            continue
        if (fetch := _FETCH.match(line)) is None:
            continue
        body = fetch.group(2)
        uid = _UID.search(body)
        if uid is None:
            continue
        modseq = _MODSEQ.search(body)
        flags = _FLAGS.search(body)
        changes.fetched.append(
            (int(uid.group(1)), int(modseq.group(1)) if modseq else 0, tuple(flags.group(1).split()) if flags else ())
        )
    return changes
