"""A test SMTP submission server (aiosmtpd): AUTH over TLS only, records each message, relays to Dovecot's LMTP.

It listens on two free ports of 127.0.0.1, like a real submission service:

    smtps_port      implicit TLS from the first byte (as port 465)
    starttls_port   plain until STARTTLS, which it requires before AUTH, MAIL or anything else (as port 587)

AUTH PLAIN and LOGIN are offered only once TLS is up, and checked against the shared :class:`MailUsers`; nothing
is accepted without AUTH. The server runs its own event loop in a thread, so synchronous and asyncio tests alike
can use it (an asyncio test should await :meth:`SubmissionServer.wait_for_async`, which does not block its loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.mailserver.tls import ServerTls
from tests.mailserver.users import MailUsers

HOST = "127.0.0.1"
SERVER_NAME = "localhost"
START_TIMEOUT = 10.0

Stage = Literal["MAIL", "RCPT", "DATA"]
Relay = Callable[[str, Sequence[str], bytes], None]
"""Delivers (mail_from, recipients, raw) onwards; raises to make the submission fail with a 451."""


@dataclass(frozen=True)
class Received:
    """A message the server accepted: its envelope, its bytes and who submitted it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    user: str
    """The address the client authenticated as."""
    implicit_tls: bool
    """True if submitted on the SMTPS port, False if on the STARTTLS port."""
    relayed_to: tuple[str, ...]
    """The recipients that are mail users, and so were delivered to Dovecot."""


@dataclass(frozen=True)
class _Rejection:
    stage: Stage
    code: int
    text: str
    user: str | None

    def reply(self, server: SMTP) -> str:
        if self.code == 421 and server.transport is not None:
            # Runs after aiosmtpd has written the reply (close() sends what is buffered first).
            asyncio.get_running_loop().call_soon(server.transport.close)
        return f"{self.code} {self.text}"


class SubmissionServer:
    """An SMTP submission server on 127.0.0.1 (SMTPS and STARTTLS ports) that records and relays what it accepts.

    ``relay`` is called for the recipients that are in ``users`` (others are only recorded); without one, nothing is
    relayed. Use as a context manager or call :meth:`stop`.
    """

    host = HOST

    def __init__(self, *, users: MailUsers, tls: ServerTls, relay: Relay | None = None) -> None:
        """Start both listeners and return once they accept connections."""
        self.users = users
        self.tls = tls
        self.ca_path = tls.ca_path
        self._relay = relay
        self._lock = threading.Condition()
        self._messages: list[Received] = []
        self._rejections: list[_Rejection] = []
        self._protocols: set[_SubmissionSMTP] = set()
        self._servers: list[asyncio.Server] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="test-smtp-submission", daemon=True)
        self._thread.start()
        self.smtps_port = self.starttls_port = 0
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(START_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    # -- life cycle -----------------------------------------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.run_until_complete(self._loop.shutdown_default_executor())  # the relays' worker threads
            self._loop.close()

    async def _start(self) -> None:
        # Port 0: the kernel picks a free port, so there is no window in which another process could take it.
        smtps = await self._loop.create_server(
            lambda: self._protocol(implicit_tls=True), self.host, 0, ssl=self.tls.server_context()
        )
        self._servers.append(smtps)
        starttls = await self._loop.create_server(lambda: self._protocol(implicit_tls=False), self.host, 0)
        self._servers.append(starttls)
        self.smtps_port = smtps.sockets[0].getsockname()[1]
        self.starttls_port = starttls.sockets[0].getsockname()[1]

    def _protocol(self, *, implicit_tls: bool) -> _SubmissionSMTP:
        protocol = _SubmissionSMTP(
            _Handler(self, implicit_tls=implicit_tls),
            implicit_tls=implicit_tls,
            hostname=SERVER_NAME,
            ident="mailbroker test submission",
            # STARTTLS is offered only where the connection is not TLS already.
            tls_context=None if implicit_tls else self.tls.server_context(),
            require_starttls=not implicit_tls,
            auth_required=True,
            auth_require_tls=True,
            authenticator=self._authenticate,
            timeout=60,
            loop=self._loop,
        )
        self._protocols.add(protocol)
        return protocol

    def stop(self) -> None:
        """Close the listeners and every open connection, then end the server's thread."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):  # the loop may already have stopped
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(START_TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(START_TIMEOUT)

    async def _close(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        for protocol in list(self._protocols):
            protocol.abort()
        # Let the aborted connections run their connection_lost() (which closes the sockets) and end their tasks.
        for _ in range(3):
            await asyncio.sleep(0)
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> SubmissionServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what tests see and steer -------------------------------------------------------------------------------

    @property
    def messages(self) -> list[Received]:
        """The messages accepted so far, oldest first (a copy)."""
        with self._lock:
            return list(self._messages)

    def clear(self) -> None:
        """Forget the messages recorded so far and any pending rejections."""
        with self._lock:
            self._messages.clear()
            self._rejections.clear()

    def reject_next(self, code: int, text: str, *, stage: Stage = "DATA", user: str | None = None) -> None:
        """Answer the next MAIL FROM, RCPT TO or end of DATA (``stage``) with ``code`` and ``text`` instead of 250.

        With ``user``, only a client authenticated as that address gets the rejection (tests sharing one server then
        cannot take each other's). Calls queue up: two calls reject the next two commands of that stage. A 4xx code
        is a temporary failure to the client, a 5xx a permanent one; a 421 also closes the connection, as a real
        server does.
        """
        if not 400 <= code <= 599:
            raise ValueError("a rejection needs a 4xx or 5xx code")
        with self._lock:
            self._rejections.append(_Rejection(stage, code, text, user.lower() if user else None))

    def wait_for(self, count: int, timeout: float = 5.0, *, to: str | None = None) -> list[Received]:
        """Wait until at least ``count`` messages (those for recipient ``to``, if given) were accepted; return them.

        Raises TimeoutError if they do not arrive within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(matching := self._matching(to)) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(matching)} messages arrived within {timeout} s, not {count}")
                self._lock.wait(remaining)
            return matching

    async def wait_for_async(self, count: int, timeout: float = 5.0, *, to: str | None = None) -> list[Received]:
        """:meth:`wait_for` for asyncio tests: waits in a worker thread, so the caller's event loop keeps running."""
        return await asyncio.to_thread(self.wait_for, count, timeout, to=to)

    def messages_for(self, address: str) -> list[Received]:
        """The accepted messages that have ``address`` among their recipients, oldest first."""
        with self._lock:
            return self._matching(address)

    def _matching(self, to: str | None) -> list[Received]:
        if to is None:
            return list(self._messages)
        wanted = to.lower()
        return [message for message in self._messages if wanted in (r.lower() for r in message.rcpt_tos)]

    # -- called on the server's loop ------------------------------------------------------------------------------

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        try:
            login, password = auth_data.login.decode(), auth_data.password.decode()
        except UnicodeDecodeError:
            return AuthResult(success=False, handled=False)
        if not self.users.check(login, password):
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=login)

    def _take_rejection(self, stage: Stage, session: Session) -> _Rejection | None:
        user = str(session.auth_data).lower()
        with self._lock:
            for index, rejection in enumerate(self._rejections):
                if rejection.stage == stage and rejection.user in (None, user):
                    return self._rejections.pop(index)
        return None

    def _record(self, received: Received) -> None:
        with self._lock:
            self._messages.append(received)
            self._lock.notify_all()

    def _forget(self, protocol: _SubmissionSMTP) -> None:
        self._protocols.discard(protocol)


class _Handler:
    """aiosmtpd hooks: rejections on request, relay of accepted messages, recording."""

    def __init__(self, server: SubmissionServer, *, implicit_tls: bool) -> None:
        self.server = server
        self.implicit_tls = implicit_tls

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        rejection = self.server._take_rejection("MAIL", session)
        if rejection is not None:
            return rejection.reply(server)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        rejection = self.server._take_rejection("RCPT", session)
        if rejection is not None:
            return rejection.reply(server)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        rejection = self.server._take_rejection("DATA", session)
        if rejection is not None:
            return rejection.reply(server)
        raw = envelope.original_content or b""
        mail_from = envelope.mail_from or ""
        recipients = tuple(envelope.rcpt_tos)
        local = tuple(address for address in recipients if address in self.server.users)
        if local and self.server._relay is not None:
            try:
                await asyncio.to_thread(self.server._relay, mail_from, local, raw)
            except Exception:
                return "451 4.3.0 Local delivery failed; try again later"
        self.server._record(
            Received(
                mail_from=mail_from,
                rcpt_tos=recipients,
                raw=raw,
                user=str(session.auth_data),
                implicit_tls=self.implicit_tls,
                relayed_to=local if self.server._relay is not None else (),
            )
        )
        return "250 2.0.0 OK: queued"


class _QuietSession(Session):
    """An aiosmtpd session without the deprecation message that Session.login_data logs at every AUTH."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _SubmissionSMTP(SMTP):
    """aiosmtpd's SMTP, made to treat an implicit-TLS connection as the TLS that AUTH requires.

    aiosmtpd knows only STARTTLS as TLS: on an SMTPS connection it neither offers nor accepts AUTH while
    ``auth_require_tls`` is set (aio-libs/aiosmtpd#281, #274). Turning that off for the whole server instead would
    also allow AUTH in the clear on the STARTTLS port, and makes aiosmtpd warn.
    """

    def __init__(self, handler: _Handler, *, implicit_tls: bool, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._implicit_tls = implicit_tls
        self._owner = handler.server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._implicit_tls and self._original_transport is None:
            # Only on a transport that really is TLS: the SMTPS listener hands over nothing else.
            self._auth_require_tls = transport.get_extra_info("ssl_object") is None
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._owner._forget(self)
        super().connection_lost(error)

    def _create_session(self) -> Session:
        return _QuietSession(self.loop)

    def abort(self) -> None:
        """Drop the connection at once (the server is stopping).

        Not close(): on TLS that waits for the client's close_notify, which may never come before the loop stops,
        and the socket would be left open.
        """
        for transport in (self.transport, self._original_transport):
            if isinstance(transport, asyncio.Transport):
                transport.abort()
