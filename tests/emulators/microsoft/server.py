"""The Microsoft emulator: an HTTPS server on 127.0.0.1 in a background thread, and the API tests drive it with.

with MicrosoftEmulator(tmp_path) as microsoft:
    app = microsoft.register_app(redirect_uris=["https://broker.test/oauth/microsoft/callback"])
    microsoft.add_user("alice@contoso.test")
    location = microsoft.authorize(url_msal_made, user="alice@contoso.test")
    microsoft.deliver("alice@contoso.test", raw_rfc5322_bytes)
    ... point msal at microsoft.authority("common") and the Graph driver at microsoft.graph_url ...
"""

from __future__ import annotations

import contextlib
import html
import http.client
import re
import secrets
import socket
import ssl
import threading
import traceback
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests

from server.pki import issue_cert, new_ca
from tests.emulators.microsoft import errors, graph, identity
from tests.emulators.microsoft.mailbox import Mailbox
from tests.emulators.microsoft.state import (
    App,
    Consent,
    MicrosoftState,
    Policy,
    SeenRequest,
    SentMessage,
    Tenant,
    Throttle,
    TokenFault,
    User,
)
from tests.emulators.microsoft.wire import Request, Response

HOST = "127.0.0.1"
_TENANT_PATH = re.compile(
    r"/(?P<tenant>[^/]+)/(?P<rest>v2\.0/\.well-known/openid-configuration|discovery/v2\.0/keys|"
    r"oauth2/v2\.0/authorize|oauth2/v2\.0/token)"
)


class AuthorizationRefused(Exception):
    """The authorization endpoint showed an error page instead of redirecting (``error`` names the error and its
    AADSTS code, e.g. "invalid_request AADSTS50011")."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(f"authorization refused: HTTP {status} {error}")
        self.status = status
        self.error = error


@dataclass(frozen=True)
class Delivered:
    id: str  # the Graph message id (changes when the message moves)
    immutable_id: str
    folder_id: str


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(self, state: MicrosoftState, context: ssl.SSLContext) -> None:
        self.state = state
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        self.base_url = ""
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
                with contextlib.suppress(OSError):
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
        except Exception:  # an emulator bug must not pass for a Microsoft fault: recorded, the fixture fails the test
            with state.lock:
                state.internal_errors.append(traceback.format_exc())
            response = Response.json(500, {"error": {"code": "emulator.InternalError", "message": "emulator bug"}})
        with state.lock:
            state.requests.append(
                SeenRequest(request.method, request.path, request.query, request.headers, body, response.status)
            )
        self.send_response(response.status)
        for name, value in response.headers.items():
            if name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)


def _route(state: MicrosoftState, request: Request, base_url: str) -> Response:
    path = request.path
    if path.startswith("/v1.0/") or path == "/v1.0":
        return graph.dispatch(state, request, base_url)
    if path == "/common/discovery/instance":
        return identity.instance_discovery(state, request, base_url)
    if path == "/oidc/userinfo":
        return identity.userinfo(state, request)
    match = _TENANT_PATH.fullmatch(path)
    if match:
        tenant, rest = match["tenant"], match["rest"]
        if rest.endswith("openid-configuration"):
            return identity.openid_configuration(state, request, base_url, tenant)
        if rest.endswith("keys"):
            return identity.keys(state, request, base_url, tenant)
        if rest.endswith("authorize"):
            return identity.authorize(state, request, tenant)
        return identity.token(state, request, tenant)
    return Response.json(404, {"error": {"code": "NotFound", "message": "Not found (Microsoft emulator)."}})


class MicrosoftEmulator:
    """The Microsoft identity platform (v2.0) and the Microsoft Graph v1.0 mail subset, on
    https://127.0.0.1:<free port>. ``directory`` receives the test CA (``ca_path``) and the server certificate."""

    def __init__(self, directory: Path, *, policy: Policy | None = None) -> None:
        self.directory = Path(directory)
        self.state = MicrosoftState(policy or Policy())
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._sessions: list[requests.Session] = []
        self._write_tls()

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    def _write_tls(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca = new_ca("Microsoft emulator test CA")
        leaf = issue_cert(
            ca, common_name="localhost", dns_sans=["localhost"], ip_sans=[HOST], client=False, server=True
        )
        self.ca_path = self.directory / "microsoft-ca.pem"
        self.ca_path.write_bytes(ca.cert_pem())
        self._cert_path = self.directory / "microsoft-server.pem"
        self._key_path = self.directory / "microsoft-server-key.pem"
        leaf.write(self._cert_path, self._key_path)

    def start(self) -> MicrosoftEmulator:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._cert_path, self._key_path)
        self._server = _Server(self.state, context)
        self._server.base_url = f"https://{HOST}:{self._server.server_address[1]}"
        self.state.base_url = self._server.base_url
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="microsoft-emulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        for session in self._sessions:
            session.close()
        self._sessions.clear()
        if self._server is None:
            return
        with self.state.flight:
            if self.state.gate is not None:
                self.state.gate.set()
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join()
        self._server = None

    def __enter__(self) -> MicrosoftEmulator:
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

    def authority(self, tenant: str = "common") -> str:
        """What msal takes as ``authority``: ``https://127.0.0.1:<port>/{tenant}`` (common, organizations, a
        tenant id or a tenant's domain)."""
        return f"{self.base_url}/{tenant}"

    @property
    def graph_url(self) -> str:
        """Graph's base, like ``https://graph.microsoft.com/v1.0`` (no trailing slash)."""
        return f"{self.base_url}/v1.0"

    @property
    def instance_discovery_url(self) -> str:
        """An instance discovery endpoint that vouches for this emulator (msal's ``instance_discovery=<url>``)."""
        return f"{self.base_url}/common/discovery/instance"

    def openid_configuration_url(self, tenant: str = "common") -> str:
        return f"{self.authority(tenant)}/v2.0/.well-known/openid-configuration"

    def jwks_url(self, tenant: str = "common") -> str:
        return f"{self.authority(tenant)}/discovery/v2.0/keys"

    def token_url(self, tenant: str = "common") -> str:
        return f"{self.authority(tenant)}/oauth2/v2.0/token"

    def authorize_url(self, tenant: str = "common") -> str:
        return f"{self.authority(tenant)}/oauth2/v2.0/authorize"

    def issuer(self, tenant_id: str) -> str:
        """The ``iss`` of id_tokens for users of that tenant."""
        return f"{self.base_url}/{tenant_id}/v2.0"

    @property
    def tenant_id(self) -> str:
        """The default tenant (users are added to it unless told otherwise)."""
        return self.state.default_tenant

    # ---- set-up -------------------------------------------------------------------------------------------------

    def add_tenant(self, domain: str) -> str:
        tenant = Tenant(str(uuid.uuid4()), domain)
        with self.state.lock:
            self.state.tenants[tenant.id] = tenant
        return tenant.id

    def register_app(
        self,
        redirect_uris: Iterable[str],
        client_id: str | None = None,
        client_secret: str | None = None,
        *,
        display_name: str = "mailbroker (emulator)",
        api_permissions: Iterable[str] = ("User.Read", "Mail.ReadBasic", "Mail.Read", "Mail.Send"),
    ) -> App:
        """Register a web app (confidential client). ``api_permissions`` is what ``/.default`` grants."""
        app = App(
            client_id=client_id or str(uuid.uuid4()),
            client_secret=client_secret or "emu~" + secrets.token_urlsafe(30),
            redirect_uris=tuple(redirect_uris),
            display_name=display_name,
            api_permissions=tuple(api_permissions),
        )
        with self.state.lock:
            self.state.apps[app.client_id] = app
        return app

    def add_user(self, email: str, *, display_name: str | None = None, tenant_id: str | None = None) -> User:
        """Add a work account with a mailbox holding the well-known folders (inbox, sentitems, drafts,
        deleteditems, junkemail, archive)."""
        with self.state.lock:
            if email.lower() in self.state.users:
                raise ValueError("user exists")
            tenant = tenant_id or self.state.default_tenant
            if tenant not in self.state.tenants:
                raise ValueError("unknown tenant")
            user = User(
                email=email.lower(),
                oid=str(uuid.uuid4()),
                tenant_id=tenant,
                display_name=display_name or email.split("@")[0].replace(".", " ").title(),
                mailbox=Mailbox(email.lower(), seed=self.state.next_seed()),
            )
            self.state.users[user.email] = user
            return user

    def set_policy(self, **changes: Any) -> None:
        """E.g. ``set_policy(scope_style="url")``."""
        with self.state.lock:
            self.state.policy = replace(self.state.policy, **changes)

    # ---- the browser --------------------------------------------------------------------------------------------

    def _open_authorize(
        self, url: str, user: str, untick: Iterable[str], deny: bool
    ) -> tuple[int, str | None, str, bytes, bool]:
        split = urlsplit(url)
        if (split.scheme, split.hostname, split.port) != ("https", HOST, self.port):
            raise ValueError("the URL does not point at this emulator")
        ticket = secrets.token_urlsafe(16)
        with self.state.lock:
            if user.lower() not in self.state.users:
                raise ValueError("unknown user")
            self.state.consents[ticket] = Consent(user.lower(), frozenset(untick), deny)
        connection = http.client.HTTPSConnection(HOST, self.port, context=self.client_ssl_context(), timeout=30)
        try:
            target = split.path + (f"?{split.query}" if split.query else "")
            connection.request("GET", target, headers={"Cookie": f"{identity.CONSENT_COOKIE}={ticket}"})
            response = connection.getresponse()
            page = response.read()
            location = response.getheader("Location")
            error = response.getheader("X-Emulator-Error") or ""
            form_post = response.getheader("X-Form-Post") == "1"
            status = response.status
        finally:
            connection.close()
            with self.state.lock:
                self.state.consents.pop(ticket, None)
        return status, location, error, page, form_post

    def authorize(self, url: str, *, user: str, untick: Iterable[str] = (), deny: bool = False) -> str:
        """Open ``url`` (an authorization URL msal or the broker made) as the user's browser, with the user signed
        in, and consent (less the unticked scopes) or decline. Returns the redirect Location (code or error in its
        query, or fragment with response_mode=fragment); raises AuthorizationRefused when the platform shows an
        error page instead. For response_mode=form_post use :meth:`authorize_form_post`."""
        status, location, error, _, form_post = self._open_authorize(url, user, untick, deny)
        if form_post:
            raise ValueError("response_mode=form_post: use authorize_form_post()")
        if status != 302 or location is None:
            raise AuthorizationRefused(status, error or "no_redirect")
        return location

    def authorize_form_post(
        self, url: str, *, user: str, untick: Iterable[str] = (), deny: bool = False
    ) -> tuple[str, dict[str, str]]:
        """Like :meth:`authorize` for response_mode=form_post: returns (action URL, posted fields)."""
        status, _, error, page, form_post = self._open_authorize(url, user, untick, deny)
        if not form_post:
            raise AuthorizationRefused(status, error or "no_form_post")
        text = page.decode()
        action = re.search(r'action="([^"]*)"', text)
        fields = dict(re.findall(r'name="([^"]*)" value="([^"]*)"', text))
        assert action is not None
        return html.unescape(action.group(1)), {html.unescape(k): html.unescape(v) for k, v in fields.items()}

    def session(self) -> requests.Session:
        """A requests session trusting only the emulator's CA (``trust_env = False``: the machine's
        REQUESTS_CA_BUNDLE would otherwise override ``verify``); closed at stop(). Suits msal's ``http_client``."""
        session = requests.Session()
        session.verify = str(self.ca_path)
        session.trust_env = False
        self._sessions.append(session)
        return session

    def client_ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))

    # ---- mail ---------------------------------------------------------------------------------------------------

    def mailbox(self, user: str) -> Mailbox:
        """The user's mailbox (read it under ``with emulator.state.lock``)."""
        return self.state.users[user.lower()].mailbox

    def folder_id(self, user: str, folder: str) -> str:
        """The id of a folder by well-known name (inbox, ...) or id."""
        with self.state.lock:
            return self.mailbox(user).folder(folder).id

    def deliver(
        self, user: str, raw: bytes, folder: str = "inbox", *, received: float | None = None, is_read: bool = False
    ) -> Delivered:
        """Deliver raw RFC 5322 bytes into a folder (well-known name or id)."""
        with self.state.lock:
            when = received if received is not None else self.state.clock.now()
            message = self.mailbox(user).insert(raw, folder, when, is_read=is_read)
            return Delivered(message.id, message.immutable_id, message.folder_id)

    def move(self, user: str, message_id: str, folder: str) -> Delivered:
        """Move a message (its Graph id changes, as in Outlook; the immutable id stays)."""
        with self.state.lock:
            message = self.mailbox(user).move(message_id, folder, self.state.clock.now())
            return Delivered(message.id, message.immutable_id, message.folder_id)

    def set_read(self, user: str, message_id: str, is_read: bool = True) -> None:
        with self.state.lock:
            box = self.mailbox(user)
            message = box.get(message_id)
            message.is_read = is_read
            box.touch(message, self.state.clock.now())

    def set_flag(self, user: str, message_id: str, status: str = "flagged") -> None:
        """flagStatus: notFlagged, flagged or complete."""
        if status not in ("notFlagged", "flagged", "complete"):
            raise ValueError("unknown flagStatus")
        with self.state.lock:
            box = self.mailbox(user)
            message = box.get(message_id)
            message.flag_status = status
            box.touch(message, self.state.clock.now())

    def delete_message(self, user: str, message_id: str, *, permanent: bool = False) -> None:
        """Delete as Outlook does: to Deleted Items, or for good with ``permanent`` (or from Deleted Items)."""
        with self.state.lock:
            self.mailbox(user).delete(message_id, self.state.clock.now(), permanent=permanent)

    def create_folder(self, user: str, display_name: str, parent: str | None = None) -> str:
        with self.state.lock:
            return self.mailbox(user).create_folder(display_name, parent).id

    def delete_folder(self, user: str, folder: str) -> None:
        with self.state.lock:
            self.mailbox(user).delete_folder(folder)

    def message_raw(self, user: str, message_id: str) -> bytes:
        with self.state.lock:
            return self.mailbox(user).get(message_id).raw

    def message_ids(self, user: str, folder: str) -> list[str]:
        with self.state.lock:
            box = self.mailbox(user)
            return [m.id for m in box.in_folder(box.folder(folder).id)]

    def sent_messages(self, user: str | None = None) -> list[SentMessage]:
        with self.state.lock:
            return [m for m in self.state.sent if user is None or m.user == user.lower()]

    def expire_delta_tokens(self, user: str, code: str = "syncStateNotFound") -> None:
        """Every delta and skip token so far gets 410 Gone with this code (syncStateNotFound or resyncRequired)."""
        if code not in ("syncStateNotFound", "resyncRequired"):
            raise ValueError("unknown code")
        with self.state.lock:
            box = self.mailbox(user)
            box.sync_generation += 1
            box.expired_code = code

    # ---- grants and tokens --------------------------------------------------------------------------------------

    def revoke_consent(self, user: str, client_id: str | None = None) -> int:
        """The user removes the app's permissions: every refresh token of the grant fails with invalid_grant
        (AADSTS65001, suberror consent_required). Issued access tokens stay valid until they expire, as
        Microsoft's do. Returns how many grants were revoked."""
        with self.state.lock:
            grants = [
                g
                for (email, cid), g in self.state.grants.items()
                if email == user.lower() and (client_id is None or cid == client_id) and not g.revoked
            ]
            for grant in grants:
                grant.revoked = True
            return len(grants)

    def revoke_sessions(self, user: str) -> None:
        """revokeSignInSessions / a password reset: refresh tokens issued so far fail (AADSTS50173)."""
        with self.state.lock:
            self.state.users[user.lower()].sessions_revoked_at = self.state.clock.now() + 0.001

    def require_interaction(self, user: str) -> None:
        """E.g. MFA newly required: refreshes fail with interaction_required (AADSTS50076) until the user signs in
        through the authorization endpoint again."""
        with self.state.lock:
            self.state.users[user.lower()].interaction_required = True

    def granted_scopes(self, user: str, client_id: str) -> set[str]:
        """Canonical: openid/profile/email/offline_access and https://graph.microsoft.com/<Permission>."""
        with self.state.lock:
            grant = self.state.grants.get((user.lower(), client_id))
            return set() if grant is None or grant.revoked else set(grant.scopes)

    def advance_clock(self, seconds: float) -> None:
        """Move the emulator's clock: codes, access and refresh tokens expire by it."""
        self.state.clock.advance(seconds)

    def expire_access_tokens(self, user: str | None = None) -> int:
        with self.state.lock:
            now = self.state.clock.now()
            count = 0
            for record in self.state.access_tokens.values():
                if (user is None or record.grant.user == user.lower()) and record.expires_at > now:
                    record.expires_at = now
                    count += 1
            return count

    # ---- faults -------------------------------------------------------------------------------------------------

    def throttle(
        self,
        count: int = 1,
        *,
        status: int = 429,
        code: str = "TooManyRequests",
        retry_after: int | None = 1,
        user: str | None = None,
    ) -> None:
        """Answer the next ``count`` Graph requests (of ``user``) with this fault: 429 TooManyRequests or
        ApplicationThrottled, 503 serviceNotAvailable, 504 gatewayTimeout; Retry-After when not None."""
        if (status, code) not in errors.FAULTS:
            raise ValueError("unknown fault")
        with self.state.lock:
            self.state.throttles.append(
                Throttle(count, status, code, errors.FAULTS[(status, code)], retry_after, user and user.lower())
            )

    def fail_next_requests(
        self,
        count: int = 1,
        *,
        status: int,
        code: str,
        message: str,
        details: Iterable[dict[str, str]] = (),
        retry_after: int | None = None,
        endpoints: Iterable[str] = (),
        user: str | None = None,
        html: str | None = None,
    ) -> None:
        """Answer the next ``count`` Graph requests (of ``user``, to ``endpoints`` — the names of the graph.<name>
        counters, such as ``message.get`` or ``user.sendMail``; none: any) with ``status`` (4xx or 5xx) in Graph's
        JSON error shape: ``code`` and ``message`` in error, ``details`` (``{"code", "message", "target"}`` each) as
        error.details. The text is the test's own, so canaries can stand where Graph quotes an address or a host.
        ``html``: this HTML page instead (text/html), as a gateway in front of Graph answers a 502 or 504."""
        if not 400 <= status <= 599:
            raise ValueError("a fault needs a 4xx or 5xx status")
        wanted = frozenset(endpoints)
        if wanted - graph.ENDPOINTS:
            raise ValueError(f"not Graph endpoint names: {sorted(wanted - graph.ENDPOINTS)}")
        with self.state.lock:
            self.state.throttles.append(
                Throttle(count, status, code, message, retry_after, user and user.lower(), wanted, tuple(details), html)
            )

    def clear_faults(self) -> None:
        """Forget every fault not yet answered (injected errors, throttles and token-endpoint faults)."""
        with self.state.lock:
            self.state.throttles.clear()
            self.state.token_faults.clear()

    def fail_next_token_requests(
        self,
        count: int = 1,
        *,
        status: int = 400,
        error: str = "invalid_grant",
        aadsts: int = 70000,
        description: str = "The provided grant is not valid.",
        suberror: str | None = None,
        retry_after: int | None = None,
        html: str | None = None,
    ) -> None:
        """Answer the next ``count`` token-endpoint requests with this identity platform error (``description``
        goes into error_description after the AADSTS code), a Retry-After header when not None; with ``html``,
        that HTML page instead of the JSON error (as a proxy in front of the STS would answer)."""
        with self.state.lock:
            self.state.token_faults.append(
                TokenFault(count, status, error, aadsts, description, suberror, retry_after, html)
            )

    @contextlib.contextmanager
    def hold_graph_requests(self) -> Iterator[None]:
        """Within the block, Graph requests that are admitted wait (in flight) until the block ends, so a test can
        have several in flight at once; see :meth:`wait_for_in_flight`. Rejected ones (429) answer at once."""
        gate = threading.Event()
        with self.state.flight:
            self.state.gate = gate
        try:
            yield
        finally:
            with self.state.flight:
                self.state.gate = None
            gate.set()

    def in_flight(self, user: str) -> int:
        with self.state.flight:
            return sum(n for (_, email), n in self.state.in_flight.items() if email == user.lower())

    def wait_for_in_flight(self, user: str, count: int, timeout: float = 10) -> bool:
        """Block until ``count`` Graph requests of the user are in flight (held); False on timeout."""
        with self.state.flight:
            return self.state.flight.wait_for(
                lambda: sum(n for (_, e), n in self.state.in_flight.items() if e == user.lower()) >= count,
                timeout=timeout,
            )

    # ---- what happened ------------------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Counts by name: authorize, authorize.granted/denied, token.<grant_type>, token.refresh.rotated,
        token.error.<error>, token.fault, discovery.openid_configuration/keys/instance, graph.<endpoint>
        (user.get, mailFolder.list/get/childFolders, message.list/get/mime/delta, attachment.list/get/value,
        user.sendMail), graph.error.<status>, graph.error.<code>, graph.throttled, graph.sent."""
        with self.state.lock:
            return dict(self.state.counters)

    def requests(self, path_prefix: str = "") -> list[SeenRequest]:
        with self.state.lock:
            return [r for r in self.state.requests if r.path.startswith(path_prefix)]

    def authorization_requests(self) -> list[dict[str, str]]:
        with self.state.lock:
            return [dict(r) for r in self.state.authorization_requests]

    def internal_errors(self) -> list[str]:
        with self.state.lock:
            return list(self.state.internal_errors)
