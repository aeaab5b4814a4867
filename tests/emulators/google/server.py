"""The Google emulator: an HTTPS server on 127.0.0.1 in a background thread, and the API tests drive it with.

with GoogleEmulator(tmp_path) as google:
    client = google.register_client(redirect_uris=["https://broker.test/oauth/callback"])
    google.add_user("alice@example.test")
    location = google.authorize(url_the_broker_made, user="alice@example.test")
    google.deliver("alice@example.test", raw_rfc5322_bytes)
    ... point google-auth at google.token_url and googleapiclient at google.client_options() ...
"""

from __future__ import annotations

import contextlib
import http.client
import secrets
import socket
import ssl
import threading
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httplib2

from server.config import GoogleConfig
from server.pki import issue_cert, new_ca
from tests.emulators.google import batch, gmail, oauth
from tests.emulators.google.discovery import gmail_methods
from tests.emulators.google.mailbox import Mailbox
from tests.emulators.google.state import (
    ApiFault,
    Client,
    Consent,
    GoogleState,
    Policy,
    SeenRequest,
    SentMessage,
    Throttle,
    TokenFault,
    User,
)
from tests.emulators.google.wire import Request, Response

GOOGLE_ISSUER = "https://accounts.google.com"
HOST = "127.0.0.1"


class AuthorizationRefused(Exception):
    """The authorization endpoint showed an error page instead of redirecting (``error`` is Google's code)."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(f"authorization refused: HTTP {status} {error}")
        self.status = status
        self.error = error


@dataclass(frozen=True)
class Delivered:
    id: str
    thread_id: str
    history_id: int


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(self, state: GoogleState, context: ssl.SSLContext) -> None:
        self.state = state
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__((HOST, 0), _Handler)
        self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, address = super().get_request()
        with self.connections_lock:
            self.connections.add(conn)
        return conn, address

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self.connections_lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):  # already closed by the client
                    conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests carry tokens: nothing is written to stderr

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        state = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        request = Request(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers={name.lower(): value for name, value in self.headers.items()},
            body=body,
        )
        try:
            response = _route(state, request, self.server.base_url)
        except Exception:  # an emulator bug must not pass for a Google fault: record it, the fixture fails the test
            with state.lock:
                state.internal_errors.append(traceback.format_exc())
            response = Response.json(500, {"error": {"code": 500, "message": "emulator internal error"}})
        with state.lock:
            state.requests.append(
                SeenRequest(request.method, request.path, request.query, request.headers, body, response.status)
            )
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)


def _route(state: GoogleState, request: Request, base_url: str) -> Response:
    path = request.path
    if path == "/o/oauth2/v2/auth":
        return oauth.authorize(state, request)
    if path == "/token":
        return oauth.token(state, request)
    if path == "/revoke":
        return oauth.revoke(state, request)
    if path == "/oauth2/v3/certs":
        return oauth.certs_v3(state, request)
    if path == "/oauth2/v1/certs":
        return oauth.certs_v1(state, request)
    if path in ("/v1/userinfo", "/oauth2/v3/userinfo"):
        return oauth.userinfo(state, request)
    if path == "/.well-known/openid-configuration":
        return oauth.openid_configuration(state, request, base_url)
    if path in ("/batch", "/batch/gmail/v1"):
        return batch.dispatch(state, request)
    if path.startswith(("/gmail/", "/upload/gmail/", "/resumable/upload/gmail/")):
        return gmail.dispatch(state, request)
    return Response.json(404, {"error": {"code": 404, "message": "Not Found", "status": "NOT_FOUND"}})


class GoogleEmulator:
    """Google OAuth 2.0 / OpenID Connect and the Gmail REST subset, on https://127.0.0.1:<free port>.

    ``directory`` receives the test CA (``ca_path``) and the server certificate; nothing else is written.
    """

    def __init__(self, directory: Path, *, policy: Policy | None = None, issuer: str = GOOGLE_ISSUER) -> None:
        self.directory = Path(directory)
        self.state = GoogleState(policy or Policy(), issuer)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._http_clients: list[httplib2.Http] = []
        self._write_tls()

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    def _write_tls(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca = new_ca("Google emulator test CA")
        leaf = issue_cert(
            ca, common_name="localhost", dns_sans=["localhost"], ip_sans=[HOST], client=False, server=True
        )
        self.ca_path = self.directory / "google-ca.pem"
        self.ca_path.write_bytes(ca.cert_pem())
        self._cert_path = self.directory / "google-server.pem"
        self._key_path = self.directory / "google-server-key.pem"
        leaf.write(self._cert_path, self._key_path)

    def start(self) -> GoogleEmulator:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._cert_path, self._key_path)
        self._server = _Server(self.state, context)
        self._server.base_url = f"https://{HOST}:{self._server.server_address[1]}"  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="google-emulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        for client in self._http_clients:
            client.close()
        self._http_clients.clear()
        if self._server is None:
            return
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join()
        self._server = None

    def __enter__(self) -> GoogleEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- where things are ---------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None, "the emulator is not running"
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"https://{HOST}:{self.port}"

    @property
    def authorize_url(self) -> str:
        return f"{self.base_url}/o/oauth2/v2/auth"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    @property
    def revoke_url(self) -> str:
        return f"{self.base_url}/revoke"

    @property
    def certs_url(self) -> str:
        """JWK Set (Google's /oauth2/v3/certs); ``certs_v1_url`` has the PEM-by-kid form."""
        return f"{self.base_url}/oauth2/v3/certs"

    @property
    def certs_v1_url(self) -> str:
        return f"{self.base_url}/oauth2/v1/certs"

    @property
    def userinfo_url(self) -> str:
        return f"{self.base_url}/v1/userinfo"

    @property
    def openid_configuration_url(self) -> str:
        return f"{self.base_url}/.well-known/openid-configuration"

    @property
    def gmail_api_endpoint(self) -> str:
        """What to give googleapiclient as ``client_options={"api_endpoint": ...}``."""
        return f"{self.base_url}/"

    def client_options(self) -> dict[str, str]:
        return {"api_endpoint": self.gmail_api_endpoint}

    @property
    def batch_url(self) -> str:
        """For ``googleapiclient.http.BatchHttpRequest(batch_uri=...)``: ``new_batch_http_request()`` ignores the
        api_endpoint and would post to the real Google."""
        return f"{self.base_url}/batch/gmail/v1"

    @property
    def issuer(self) -> str:
        return self.state.issuer

    # ---- set-up -------------------------------------------------------------------------------------------------

    def broker_config(self, client: Client, **settings: Any) -> GoogleConfig:
        """The broker's ``[google]`` section for ``client`` of this emulator: every endpoint and the CA point here;
        ``settings`` are further GoogleConfig fields (timeouts, poll intervals)."""
        return GoogleConfig(
            client_id=client.client_id,
            client_secret=client.client_secret,
            redirect_uris=client.redirect_uris,
            authorization_endpoint=self.authorize_url,
            token_endpoint=self.token_url,
            revoke_endpoint=self.revoke_url,
            certs_url=self.certs_url,
            issuers=(self.issuer,),
            api_endpoint=self.gmail_api_endpoint,
            ca_file=self.ca_path,
            **settings,
        )

    def register_client(
        self,
        redirect_uris: Iterable[str],
        client_id: str | None = None,
        client_secret: str | None = None,
    ) -> Client:
        """Register an OAuth web client (ids and secrets are canary-like fakes when not given)."""
        client = Client(
            client_id=client_id or f"{secrets.randbelow(10**12):012d}-emulator.apps.googleusercontent.com",
            client_secret=client_secret or "GOCSPX-emulator-" + secrets.token_urlsafe(18),
            redirect_uris=tuple(redirect_uris),
        )
        with self.state.lock:
            self.state.clients[client.client_id] = client
        return client

    def add_user(self, email: str) -> User:
        with self.state.lock:
            if email in self.state.users:
                raise ValueError("user exists")
            user = User(
                email=email,
                sub=str(10**20 + secrets.randbelow(9 * 10**20)),
                mailbox=Mailbox(email, seed=self.state.next_seed()),
            )
            self.state.users[email] = user
            return user

    def set_policy(self, **changes: bool) -> None:
        """E.g. ``set_policy(rotate_refresh_tokens=True)``."""
        with self.state.lock:
            self.state.policy = replace(self.state.policy, **changes)

    # ---- the browser --------------------------------------------------------------------------------------------

    def authorize(self, url: str, *, user: str, untick: Iterable[str] = (), deny: bool = False) -> str:
        """Open ``url`` (made by the broker) as the user's browser would, with the user signed in, and consent
        (less the unticked scopes) or deny. Returns the redirect Location; raises AuthorizationRefused when Google
        would show an error page instead."""
        split = urlsplit(url)
        if (split.scheme, split.hostname, split.port) != ("https", HOST, self.port):
            raise ValueError("the URL does not point at this emulator")
        ticket = secrets.token_urlsafe(16)
        with self.state.lock:
            if user not in self.state.users:
                raise ValueError("unknown user")
            self.state.consents[ticket] = Consent(user, frozenset(untick), deny)
        connection = http.client.HTTPSConnection(HOST, self.port, context=self.client_ssl_context(), timeout=30)
        try:
            target = split.path + (f"?{split.query}" if split.query else "")
            connection.request("GET", target, headers={"Cookie": f"{oauth.CONSENT_COOKIE}={ticket}"})
            response = connection.getresponse()
            response.read()
            location = response.getheader("Location")
            status, error = response.status, response.getheader("X-Emulator-Error") or ""
        finally:
            connection.close()
            with self.state.lock:
                self.state.consents.pop(ticket, None)
        if status != 302 or location is None:
            raise AuthorizationRefused(status, error or "no_redirect")
        return location

    def http(self) -> httplib2.Http:
        """An httplib2 client trusting only the emulator's CA (not the machine's CA variables); closed at stop()."""
        client = httplib2.Http(ca_certs=str(self.ca_path))
        self._http_clients.append(client)
        return client

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only the emulator's CA."""
        return ssl.create_default_context(cafile=str(self.ca_path))

    # ---- mail ---------------------------------------------------------------------------------------------------

    def _mailbox(self, user: str) -> Mailbox:
        return self.state.users[user].mailbox

    def deliver(
        self,
        user: str,
        raw: bytes,
        label_ids: Iterable[str] = ("INBOX", "UNREAD"),
        internal_date_ms: int | None = None,
    ) -> Delivered:
        """Deliver raw RFC 5322 bytes into the user's mailbox (a messageAdded history record)."""
        with self.state.lock:
            when = internal_date_ms if internal_date_ms is not None else int(self.state.clock.now() * 1000)
            stored = self._mailbox(user).insert(raw, list(label_ids), when)
            return Delivered(stored.id, stored.thread_id, stored.history_id)

    def add_label(self, user: str, name: str) -> str:
        with self.state.lock:
            return self._mailbox(user).add_label(name)

    def modify_labels(self, user: str, message_id: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> int:
        with self.state.lock:
            return self._mailbox(user).modify(message_id, list(add), list(remove))

    def delete_message(self, user: str, message_id: str) -> int:
        with self.state.lock:
            return self._mailbox(user).delete(message_id)

    def history_id(self, user: str) -> int:
        with self.state.lock:
            return self._mailbox(user).history_id

    def expire_history(self, user: str) -> None:
        """Forget all history so far: any earlier startHistoryId now gets 404."""
        with self.state.lock:
            self._mailbox(user).expire_history()

    def message_raw(self, user: str, message_id: str) -> bytes:
        with self.state.lock:
            return self._mailbox(user).get(message_id).raw

    def message_labels(self, user: str, message_id: str) -> list[str]:
        with self.state.lock:
            return list(self._mailbox(user).get(message_id).label_ids)

    def sent_messages(self, user: str | None = None) -> list[SentMessage]:
        with self.state.lock:
            return [m for m in self.state.sent if user is None or m.user == user]

    # ---- grants and tokens --------------------------------------------------------------------------------------

    def revoke_user(self, user: str, client_id: str | None = None) -> int:
        """Revoke the user's grant(s) as if they removed the app in their account settings; returns how many."""
        with self.state.lock:
            grants = [
                g
                for (email, cid), g in self.state.grants.items()
                if email == user and (client_id is None or cid == client_id) and not g.revoked
            ]
            for grant in grants:
                self.state.revoke_grant(grant)
            return len(grants)

    def granted_scopes(self, user: str, client_id: str) -> set[str]:
        with self.state.lock:
            grant = self.state.grants.get((user, client_id))
            return set() if grant is None or grant.revoked else set(grant.scopes)

    def advance_clock(self, seconds: float) -> None:
        """Move the emulator's clock: access tokens and codes expire by it (id_token iat/exp follow it too)."""
        self.state.clock.advance(seconds)

    def expire_access_tokens(self, user: str | None = None) -> int:
        """Make every live access token (of ``user``) expired now, without moving the clock."""
        with self.state.lock:
            now = self.state.clock.now()
            count = 0
            for record in self.state.access_tokens.values():
                if (user is None or record.grant.user == user) and record.expires_at > now:
                    record.expires_at = now
                    count += 1
            return count

    # ---- faults -------------------------------------------------------------------------------------------------

    def throttle(
        self,
        count: int = 1,
        *,
        status: int = 429,
        reason: str = "rateLimitExceeded",
        retry_after: int | None = 1,
        user: str | None = None,
    ) -> None:
        """Answer the next ``count`` Gmail requests (of ``user``) with this fault: 429 rateLimitExceeded or
        userRateLimitExceeded, 403 of the same, 500/503 backendError. Retry-After is sent when not None."""
        from tests.emulators.google.errors import FAULTS

        if (status, reason) not in FAULTS:
            raise ValueError("unknown fault")
        with self.state.lock:
            self.state.throttles.append(Throttle(count, status, reason, retry_after, user))

    def fail_next_requests(
        self,
        count: int = 1,
        *,
        status: int,
        message: str,
        reason: str = "backendError",
        domain: str = "global",
        error_info: dict[str, Any] | None = None,
        retry_after: int | None = None,
        methods: Iterable[str] = (),
        user: str | None = None,
        html: str | None = None,
    ) -> None:
        """Answer the next ``count`` Gmail requests (of ``user``, to ``methods`` — Gmail method ids such as
        ``gmail.users.messages.get``; none: any) with ``status`` (4xx or 5xx) in Google's JSON error shape:
        ``message`` as error.message and errors[0].message, ``reason``/``domain`` in errors[0], and ``error_info``
        (``{"reason", "domain", "metadata": {...}}``) as a google.rpc.ErrorInfo in error.details. The text is the
        test's own, so canaries can stand where Google quotes an address, a host or a token. ``html``: this HTML
        page instead (text/html), as Google's front ends answer some failures (a 403 "automated queries" page that
        quotes the client's address, a 502)."""
        if not 400 <= status <= 599:
            raise ValueError("a fault needs a 4xx or 5xx status")
        wanted = frozenset(methods)
        unknown = wanted - {method.id for method in gmail_methods()}
        if unknown:
            raise ValueError(f"not Gmail method ids: {sorted(unknown)}")
        with self.state.lock:
            self.state.api_faults.append(
                ApiFault(count, status, message, reason, domain, error_info, retry_after, wanted, user, html)
            )

    def clear_faults(self) -> None:
        """Forget every fault not yet answered (API, throttle and token-endpoint faults)."""
        with self.state.lock:
            self.state.api_faults.clear()
            self.state.throttles.clear()
            self.state.token_faults.clear()

    def fail_next_token_requests(
        self,
        count: int = 1,
        *,
        status: int = 400,
        error: str = "invalid_grant",
        description: str = "Bad Request",
        retry_after: int | None = None,
        html: str | None = None,
    ) -> None:
        """Answer the next ``count`` token-endpoint requests with ``{"error", "error_description"}`` and status
        (or, with ``html``, that HTML page)."""
        with self.state.lock:
            self.state.token_faults.append(
                TokenFault(count, status, {"error": error, "error_description": description}, retry_after, html)
            )

    # ---- what happened ------------------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Counts by name: authorize, authorize.granted/denied, token.<grant_type>, token.error.<error>,
        token.fault, revoke, revoke.ok, revoke.invalid_token, <Gmail method id> (gmail.users.messages.get, ...),
        gmail.error.<status>, gmail.throttled, gmail.fault (an injected error), gmail.sent."""
        with self.state.lock:
            return dict(self.state.counters)

    def requests(self, path_prefix: str = "") -> list[SeenRequest]:
        with self.state.lock:
            return [r for r in self.state.requests if r.path.startswith(path_prefix)]

    def last_request(self, path_prefix: str = "") -> SeenRequest | None:
        seen = self.requests(path_prefix)
        return seen[-1] if seen else None

    def authorization_requests(self) -> list[dict[str, str]]:
        """The query parameters of every authorization request (access_type, prompt, login_hint, ...)."""
        with self.state.lock:
            return [dict(r) for r in self.state.authorization_requests]

    def gmail_responses(self) -> list[tuple[str, str | None, Any]]:
        """(method id, response schema name, JSON body) of every successful Gmail response so far."""
        with self.state.lock:
            return list(self.state.gmail_responses)

    def internal_errors(self) -> list[str]:
        with self.state.lock:
            return list(self.state.internal_errors)
