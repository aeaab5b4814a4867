"""The Microsoft identity platform (v2.0 endpoints), as "OAuth 2.0 authorization code flow", "OpenID Connect on
the Microsoft identity platform", "ID token claims reference", "Refresh tokens" and "Scopes and permissions"
describe them, for authorities ``https://127.0.0.1:<port>/{tenant}`` with tenant ``common``, ``organizations``, a
tenant id or a tenant's domain name.

    GET  /{tenant}/v2.0/.well-known/openid-configuration   issuer https://.../{tenantid}/v2.0 for common/organizations
    GET  /{tenant}/discovery/v2.0/keys                     JWK Set (kid = x5t, x5c)
    GET  /{tenant}/oauth2/v2.0/authorize                   consent simulated (see MicrosoftEmulator.authorize)
    POST /{tenant}/oauth2/v2.0/token                       authorization_code (+PKCE) and refresh_token (rotating)
    GET  /common/discovery/instance                        what msal's instance discovery asks for
    GET  /oidc/userinfo                                    OpenID userinfo (Graph serves it at graph.microsoft.com)
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
import uuid
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

from tests.emulators.microsoft.errors import OAuthError
from tests.emulators.microsoft.signing import b64url
from tests.emulators.microsoft.state import (
    CODE_LIFETIME,
    GRAPH,
    ID_TOKEN_LIFETIME,
    REFRESH_TOKEN_LIFETIME,
    AccessToken,
    App,
    AuthCode,
    Grant,
    MicrosoftState,
    RefreshToken,
    TokenFault,
    User,
)
from tests.emulators.microsoft.wire import Request, Response

CONSENT_COOKIE = "emulator_consent"
OIDC_SCOPES = ("openid", "profile", "email", "offline_access")
# The delegated Graph permissions the emulator knows, spelled as Graph spells them (scopes are case-insensitive).
GRAPH_PERMISSIONS = (
    "User.Read",
    "Mail.ReadBasic",
    "Mail.Read",
    "Mail.ReadWrite",
    "Mail.Send",
    "MailboxSettings.Read",
)
_BY_LOWER = {p.lower(): p for p in GRAPH_PERMISSIONS}
_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")
_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")
_PROMPTS = frozenset({"login", "none", "consent", "select_account"})
_NO_STORE = {"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"}


# ---- scopes ---------------------------------------------------------------------------------------------------


def canonical_scope(scope: str) -> str:
    """``Mail.Read`` and ``https://graph.microsoft.com/mail.read`` are the same permission; returns the canonical
    URL form for Graph permissions and the bare name for OpenID scopes. Raises OAuthError for anything else."""
    lowered = scope.lower()
    if lowered in OIDC_SCOPES:
        return lowered
    for prefix in (GRAPH, "https://graph.microsoft.com", "00000003-0000-0000-c000-000000000000/"):
        if lowered.startswith(prefix):
            lowered = lowered[len(prefix) :].lstrip("/")
            break
    else:
        if "://" in scope or "/" in scope:
            raise OAuthError(
                "invalid_scope",
                70011,
                f"The provided value for the input parameter 'scope' is not valid. "
                f"The scope {scope} is not valid (the emulator serves only Microsoft Graph).",
            )
    if lowered == ".default":
        return GRAPH + ".default"
    if lowered not in _BY_LOWER:
        raise OAuthError(
            "invalid_scope",
            70011,
            f"The provided value for the input parameter 'scope' is not valid. "
            f"The scope '{scope}' does not exist on the resource.",
        )
    return GRAPH + _BY_LOWER[lowered]


def canonical_scopes(text: str, app: App) -> list[str]:
    out: list[str] = []
    for scope in text.split():
        canonical = canonical_scope(scope)
        expanded = [GRAPH + p for p in app.api_permissions] if canonical == GRAPH + ".default" else [canonical]
        out += [s for s in expanded if s not in out]
    return out


def graph_scopes(scopes: set[str] | frozenset[str]) -> frozenset[str]:
    return frozenset(s for s in scopes if s.startswith(GRAPH))


def scope_text(state: MicrosoftState, scopes: set[str] | frozenset[str]) -> str:
    """How the token response names the scopes: Graph permissions (short or URL form, by policy), then the
    OpenID scopes granted. offline_access is not listed (its effect is the refresh token)."""
    short = state.policy.scope_style == "short"
    names = sorted(s[len(GRAPH) :] if short else s for s in graph_scopes(scopes))
    names += [s for s in ("profile", "openid", "email") if s in scopes]
    return " ".join(names)


def s256(verifier: str) -> str:
    return b64url(hashlib.sha256(verifier.encode("ascii")).digest())


# ---- tenants and discovery ------------------------------------------------------------------------------------


def resolve_tenant(state: MicrosoftState, segment: str) -> str | None:
    """The tenant id a path segment names, "common"/"organizations" as themselves, None if unknown."""
    lowered = segment.lower()
    if lowered in ("common", "organizations"):
        return lowered
    for tenant in state.tenants.values():
        if lowered in (tenant.id, tenant.domain.lower()):
            return tenant.id
    return None


def _unknown_tenant(segment: str) -> OAuthError:
    return OAuthError(
        "invalid_tenant",
        90002,
        f"Tenant '{segment}' not found. Check to make sure you have the correct tenant ID "
        "and are signing into the correct cloud.",
    )


def openid_configuration(state: MicrosoftState, request: Request, base_url: str, segment: str) -> Response:
    with state.lock:
        state.counters["discovery.openid_configuration"] += 1
        tenant = resolve_tenant(state, segment)
    if tenant is None:
        return Response.json(400, _unknown_tenant(segment).body())
    issuer_tenant = "{tenantid}" if tenant in ("common", "organizations") else tenant
    path = f"{base_url}/{tenant}"
    host = urlsplit(base_url).netloc
    return Response.json(
        200,
        {
            "token_endpoint": f"{path}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": f"{path}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{base_url}/{issuer_tenant}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": f"{base_url}/oidc/userinfo",
            "authorization_endpoint": f"{path}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{path}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{path}/oauth2/v2.0/logout",
            "claims_supported": [
                "sub",
                "iss",
                "cloud_instance_name",
                "cloud_instance_host_name",
                "cloud_graph_host_name",
                "msgraph_host",
                "aud",
                "exp",
                "iat",
                "auth_time",
                "acr",
                "nonce",
                "preferred_username",
                "name",
                "tid",
                "ver",
                "at_hash",
                "c_hash",
                "email",
            ],
            "kerberos_endpoint": f"{path}/kerberos",
            "tenant_region_scope": None,
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": host,
            "rbac_url": "https://pas.windows.net",
        },
    )


def keys(state: MicrosoftState, request: Request, base_url: str, segment: str) -> Response:
    with state.lock:
        state.counters["discovery.keys"] += 1
        tenant = resolve_tenant(state, segment)
    if tenant is None:
        return Response.json(400, _unknown_tenant(segment).body())
    issuer_tenant = "{tenantid}" if tenant in ("common", "organizations") else tenant
    return Response.json(200, state.signing_key.jwks(f"{base_url}/{issuer_tenant}/v2.0"))


def instance_discovery(state: MicrosoftState, request: Request, base_url: str) -> Response:
    """``/common/discovery/instance``: msal asks it (unless ``instance_discovery=False``) whether an authority is
    known. This emulator vouches for itself only."""
    with state.lock:
        state.counters["discovery.instance"] += 1
    endpoint = request.one("authorization_endpoint") or ""
    split = urlsplit(endpoint)
    host = urlsplit(base_url).netloc
    # msal sends the authority's host without its port ("https://{instance}{path}/oauth2/v2.0/authorize").
    if split.scheme != "https" or split.hostname != urlsplit(base_url).hostname:
        return Response.json(
            400,
            OAuthError("invalid_instance", 50049, "Unknown or invalid instance.").body(),
        )
    tenant = split.path.strip("/").split("/")[0] or "common"
    return Response.json(
        200,
        {
            "tenant_discovery_endpoint": f"{base_url}/{tenant}/v2.0/.well-known/openid-configuration",
            "api-version": request.one("api-version") or "1.1",
            "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
        },
    )


# ---- authorization endpoint -----------------------------------------------------------------------------------


def _error_page(status: int, error: str, aadsts: int, description: str) -> Response:
    """What the browser shows when the platform will not redirect (unknown app, unregistered redirect URI)."""
    text = (
        f"<html><body><h1>Sign in</h1><p>Sorry, but we're having trouble signing you in.</p>"
        f"<p>AADSTS{aadsts}: {html.escape(description)}</p></body></html>"
    )
    return Response(
        status,
        text.encode(),
        {"Content-Type": "text/html; charset=utf-8", "X-Emulator-Error": f"{error} AADSTS{aadsts}"},
    )


def _reply(redirect_uri: str, params: dict[str, str], mode: str) -> Response:
    if mode == "form_post":
        fields = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}"/>' for k, v in params.items()
        )
        page = (
            f'<html><body onload="document.forms[0].submit()"><form method="POST" action="{html.escape(redirect_uri)}">'
            f"{fields}</form></body></html>"
        )
        return Response(200, page.encode(), {"Content-Type": "text/html; charset=utf-8", "X-Form-Post": "1"})
    separator = "#" if mode == "fragment" else ("&" if "?" in redirect_uri else "?")
    return Response.redirect(redirect_uri + separator + urlencode(params))


def _redirect_error(
    redirect_uri: str, mode: str, state_param: dict[str, str], error: str, aadsts: int, description: str, **extra: str
) -> Response:
    params = {
        "error": error,
        "error_description": f"AADSTS{aadsts}: {description}",
        "error_uri": f"https://login.microsoftonline.com/error?code={aadsts}",
        **extra,
        **state_param,
    }
    return _reply(redirect_uri, params, mode)


def authorize(state: MicrosoftState, request: Request, segment: str) -> Response:
    if request.method != "GET":
        return _error_page(405, "invalid_request", 900561, "The endpoint only accepts GET requests.")
    params: dict[str, str] = {}
    for name, values in request.query.items():
        if len(values) != 1:
            return _error_page(400, "invalid_request", 90015, f"Requested query string is too long or repeated: {name}")
        params[name] = values[0]
    with state.lock:
        state.counters["authorize"] += 1
        state.authorization_requests.append(dict(params))
        tenant = resolve_tenant(state, segment)
        if tenant is None:
            return _error_page(400, "invalid_tenant", 90002, f"Tenant '{segment}' not found.")
        app = state.apps.get(params.get("client_id", ""))
        if app is None:
            return _error_page(
                400, "unauthorized_client", 700016, "Application with identifier was not found in the directory."
            )
        redirect_uri = params.get("redirect_uri", "")
        if redirect_uri not in app.redirect_uris:
            return _error_page(
                400,
                "invalid_request",
                50011,
                "The redirect URI specified in the request does not match the "
                "redirect URIs configured for the application.",
            )
        mode = params.get("response_mode", "query")
        if mode not in ("query", "fragment", "form_post"):
            return _error_page(400, "invalid_request", 900144, "Invalid response_mode.")
        reply_state = {"state": params["state"]} if "state" in params else {}
        problem = _check_authorization_params(state, params, app)
        if problem is not None:
            return _redirect_error(redirect_uri, mode, reply_state, *problem)
        requested = canonical_scopes(params["scope"], app)

        ticket = _cookie(request, CONSENT_COOKIE)
        consent = state.consents.pop(ticket, None) if ticket else None
        if consent is None:
            page = b"<html><body><h1>Sign in to your account (emulator)</h1></body></html>"
            return Response(200, page, {"Content-Type": "text/html; charset=utf-8"})
        user = state.users[consent.user]
        if tenant not in ("common", "organizations") and user.tenant_id != tenant:
            return _error_page(
                400,
                "invalid_request",
                50020,
                "User account from identity provider does not exist in tenant and "
                "cannot access the application in that tenant.",
            )
        prompt = set(params.get("prompt", "").split())
        grant = state.live_grant(user.email, app.client_id)
        if "none" in prompt and not set(requested) <= grant.scopes:
            return _redirect_error(
                redirect_uri,
                mode,
                reply_state,
                "consent_required",
                65001,
                "The user or administrator has not "
                "consented to use the application. Send an interactive authorization request for this user and "
                "resource.",
                suberror="consent_required",
            )
        if consent.deny:
            state.counters["authorize.denied"] += 1
            return _redirect_error(
                redirect_uri,
                mode,
                reply_state,
                "access_denied",
                65004,
                "User declined to consent to access the app.",
                error_subcode="cancel",
            )
        untick = {canonical_scope(s) for s in consent.untick}
        if "openid" in untick:
            raise ValueError("openid cannot be unticked: it is what signs the user in")
        granted = {s for s in requested if s not in untick}
        grant.scopes |= granted
        user.interaction_required = False
        code = AuthCode(
            code="1.A" + secrets.token_urlsafe(96),
            client_id=app.client_id,
            user=user.email,
            tenant_path=tenant,
            redirect_uri=redirect_uri,
            scopes=frozenset(granted),
            code_challenge=params.get("code_challenge"),
            code_challenge_method=params.get("code_challenge_method", "plain" if "code_challenge" in params else None),
            nonce=params.get("nonce"),
            expires_at=state.clock.now() + CODE_LIFETIME,
            grant=grant,
        )
        state.codes[code.code] = code
        state.counters["authorize.granted"] += 1
        reply = {"code": code.code, **reply_state, "session_state": str(uuid.uuid4())}
        if params.get("client_info") == "1":
            reply["client_info"] = _client_info(user)
        return _reply(redirect_uri, reply, mode)


def _check_authorization_params(state: MicrosoftState, params: dict[str, str], app: App) -> tuple[str, int, str] | None:
    if params.get("response_type") != "code":
        return "unsupported_response_type", 700054, "response_type must be 'code' (the emulator does only code)."
    if not params.get("scope", "").strip():
        return "invalid_request", 900144, "The request body must contain the following parameter: 'scope'."
    try:
        requested = canonical_scopes(params["scope"], app)
    except OAuthError as exc:
        return exc.error, exc.aadsts, exc.description
    if "openid" not in requested:
        # Stricter than needed for OAuth alone, but this is a sign-in: the broker must learn whose mailbox it is.
        return "invalid_request", 900144, "The emulator requires the openid scope (a sign-in identifies the user)."
    if state.policy.require_state and not params.get("state"):
        return "invalid_request", 900144, "Missing state (the emulator requires it)."
    method = params.get("code_challenge_method")
    challenge = params.get("code_challenge")
    if method is not None and method not in ("S256", "plain"):
        return "invalid_request", 501491, "Invalid size of Code_Challenge parameter or unsupported method."
    if state.policy.require_pkce_s256 and (challenge is None or method != "S256"):
        return "invalid_request", 900144, "PKCE with code_challenge_method=S256 is required (emulator policy)."
    if challenge is not None and (method or "plain") == "S256" and not _CHALLENGE.fullmatch(challenge):
        return "invalid_request", 501491, "Invalid size of Code_Challenge parameter."
    prompt = set(params.get("prompt", "").split())
    if not prompt <= _PROMPTS or len(prompt) > 1:
        return "invalid_request", 90023, "Invalid prompt value."
    return None


def _cookie(request: Request, name: str) -> str | None:
    for item in (request.header("cookie") or "").split(";"):
        key, _, value = item.strip().partition("=")
        if key == name:
            return value
    return None


def _client_info(user: User) -> str:
    return b64url(json.dumps({"uid": user.oid, "utid": user.tenant_id}).encode())


# ---- token endpoint -------------------------------------------------------------------------------------------


def token(state: MicrosoftState, request: Request, segment: str) -> Response:
    correlation = request.header("client-request-id")
    try:
        if request.method != "POST":
            raise OAuthError("invalid_request", 900561, "The endpoint only accepts POST requests.", 405)
        with state.lock:
            fault = _take_token_fault(state)
            if fault is not None:
                state.counters["token.fault"] += 1
                raise OAuthError(
                    fault.error,
                    fault.aadsts,
                    fault.description,
                    fault.status,
                    fault.suberror,
                    fault.retry_after,
                    fault.html,
                )
            body = _token_response(state, request, segment)
        return Response.json(200, body, _NO_STORE)
    except OAuthError as exc:
        with state.lock:
            state.counters["token.error"] += 1
            state.counters[f"token.error.{exc.error}"] += 1
        headers = dict(_NO_STORE)
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        if exc.html is not None:
            return Response(exc.status, exc.html.encode(), {"Content-Type": "text/html; charset=utf-8", **headers})
        return Response.json(exc.status, exc.body(correlation), headers)


def _take_token_fault(state: MicrosoftState) -> TokenFault | None:
    if not state.token_faults:
        return None
    fault = state.token_faults[0]
    fault.remaining -= 1
    if fault.remaining <= 0:
        state.token_faults.pop(0)
    return fault


def _single_params(form: dict[str, list[str]]) -> dict[str, str]:
    params = {}
    for name, values in form.items():
        if len(values) != 1:
            raise OAuthError("invalid_request", 90015, f"Requested parameter is repeated: '{name}'.")
        params[name] = values[0]
    return params


def _authenticate_client(state: MicrosoftState, request: Request, params: dict[str, str]) -> App:
    """client_secret_post or client_secret_basic (one of them)."""
    authorization = request.header("authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except ValueError:
            decoded = ""
        raw_id, sep, raw_secret = decoded.partition(":")
        if scheme.lower() != "basic" or not sep:
            raise OAuthError("invalid_client", 7000218, "Malformed client credentials.", 401)
        if "client_secret" in params:
            raise OAuthError("invalid_request", 90015, "Client authenticated by more than one method.")
        client_id, secret = unquote(raw_id.replace("+", " ")), unquote(raw_secret.replace("+", " "))
        if params.get("client_id", client_id) != client_id:
            raise OAuthError("invalid_request", 700021, "client_id does not match the Basic credentials.")
    else:
        client_id = params.get("client_id", "")
        secret = params.get("client_secret", "")
        if not client_id:
            raise OAuthError(
                "invalid_request", 900144, "The request body must contain the following parameter: 'client_id'."
            )
    app = state.apps.get(client_id)
    if app is None:
        raise OAuthError("unauthorized_client", 700016, "Application with identifier was not found in the directory.")
    if not secret:
        raise OAuthError(
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            401,
        )
    if not secrets.compare_digest(app.client_secret.encode(), secret.encode()):
        raise OAuthError(
            "invalid_client",
            7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request "
            "is the client secret value, not the client secret ID.",
            401,
        )
    return app


def _token_response(state: MicrosoftState, request: Request, segment: str) -> dict[str, Any]:
    content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", 900144, "The request body must be application/x-www-form-urlencoded.")
    tenant = resolve_tenant(state, segment)
    if tenant is None:
        raise _unknown_tenant(segment)
    params = _single_params(request.form())
    grant_type = params.get("grant_type", "")
    state.counters[f"token.{grant_type}"] += 1
    if grant_type not in ("authorization_code", "refresh_token"):
        raise OAuthError(
            "unsupported_grant_type", 70003, f"The app requested an unsupported grant type '{grant_type}'."
        )
    app = _authenticate_client(state, request, params)
    if grant_type == "authorization_code":
        return _exchange_code(state, params, app, tenant)
    return _refresh(state, params, app, tenant)


def _check_tenant(user: User, tenant: str) -> None:
    if tenant not in ("common", "organizations") and tenant != user.tenant_id:
        raise OAuthError("invalid_grant", 50020, "User account from identity provider does not exist in tenant.")


def _exchange_code(state: MicrosoftState, params: dict[str, str], app: App, tenant: str) -> dict[str, Any]:
    code = state.codes.get(params.get("code", ""))
    if code is None:
        raise OAuthError("invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.")
    if code.used:
        raise OAuthError(
            "invalid_grant",
            54005,
            "OAuth2 Authorization code was already redeemed, please retry with "
            "a new valid code or use an existing refresh token.",
        )
    if code.client_id != app.client_id:
        raise OAuthError(
            "invalid_grant",
            70000,
            "The provided value for the 'code' parameter is not valid. The code was issued to a different client.",
        )
    if code.expires_at <= state.clock.now():
        raise OAuthError(
            "invalid_grant",
            70008,
            "The provided authorization code or refresh token has expired due "
            "to inactivity. Send a new interactive authorization request for this user and resource.",
        )
    if code.grant.revoked:
        raise OAuthError(
            "invalid_grant",
            65001,
            "The user or administrator has not consented to use the application.",
            suberror="consent_required",
        )
    _check_tenant(state.users[code.user], tenant)
    if params.get("redirect_uri") != code.redirect_uri:
        raise OAuthError(
            "invalid_grant", 50148, "The redirect_uri does not match the one used to obtain the authorization code."
        )
    if code.code_challenge is not None:
        verifier = params.get("code_verifier")
        if verifier is None:
            raise OAuthError(
                "invalid_request", 900144, "The request body must contain the following parameter: 'code_verifier'."
            )
        expected = s256(verifier) if code.code_challenge_method == "S256" else verifier
        if not _VERIFIER.fullmatch(verifier) or not secrets.compare_digest(expected, code.code_challenge):
            raise OAuthError(
                "invalid_grant",
                501481,
                "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
            )
    if "scope" in params:
        canonical_scopes(params["scope"], app)  # validated; what the user consented to decides what is issued
    code.used = True
    return _issue(state, code.grant, set(code.scopes), params, nonce=code.nonce, rotating=False)


def _refresh(state: MicrosoftState, params: dict[str, str], app: App, tenant: str) -> dict[str, Any]:
    if "scope" not in params:
        raise OAuthError("invalid_request", 900144, "The request body must contain the following parameter: 'scope'.")
    record = state.refresh_tokens.get(params.get("refresh_token", ""))
    if record is None:
        raise OAuthError("invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.")
    if record.grant.client_id != app.client_id:
        raise OAuthError(
            "invalid_grant", 70000, "The provided value for the 'refresh_token' is not valid for this client."
        )
    user = state.users[record.grant.user]
    now = state.clock.now()
    if record.grant.revoked:
        raise OAuthError(
            "invalid_grant",
            65001,
            "The user or administrator has not consented to use the "
            "application. Send an interactive authorization request for this user and resource.",
            suberror="consent_required",
        )
    if record.issued_at < user.sessions_revoked_at:
        raise OAuthError(
            "invalid_grant",
            50173,
            "The provided grant has expired due to it being revoked, a fresh "
            "auth token is needed. The user might have changed or reset their password.",
        )
    rotated_limit = state.policy.rotated_refresh_token_lifetime
    if record.expires_at <= now or (
        record.rotated_at is not None and rotated_limit is not None and record.rotated_at + rotated_limit <= now
    ):
        raise OAuthError("invalid_grant", 700082, "The refresh token has expired due to inactivity.")
    if user.interaction_required:
        raise OAuthError(
            "interaction_required",
            50076,
            "Due to a configuration change made by your administrator, "
            "or because you moved to a new location, you must use multi-factor authentication.",
        )
    _check_tenant(user, tenant)
    asked = set(canonical_scopes(params["scope"], app))
    if graph_scopes(asked) - record.grant.scopes:
        raise OAuthError(
            "invalid_grant",
            65001,
            "The user or administrator has not consented to use the "
            "application. Send an interactive authorization request for this user and resource.",
            suberror="consent_required",
        )
    body = _issue(state, record.grant, asked, params, nonce=None, rotating=True)
    if "refresh_token" in body:
        state.counters["token.refresh.rotated"] += 1
        if record.rotated_at is None:
            record.rotated_at = now
    return body


def _issue(
    state: MicrosoftState, grant: Grant, scopes: set[str], params: dict[str, str], nonce: str | None, rotating: bool
) -> dict[str, Any]:
    """A token response. A refresh always brings a new refresh token (Microsoft rotates them on every use). The
    access token carries every Graph permission the user consented to for the app (the platform adds earlier
    consents); the OpenID scopes follow what was granted and asked."""
    now = state.clock.now()
    user = state.users[grant.user]
    permissions = graph_scopes(grant.scopes)
    lifetime = state.policy.access_token_lifetime
    access = AccessToken(state.new_token("eyJ0eXAiOiJKV1Qi.emulator."), grant, permissions, now + lifetime)
    state.access_tokens[access.token] = access
    listed = set(permissions) | {s for s in scopes if s in ("openid", "profile", "email") and s in grant.scopes}
    body: dict[str, Any] = {
        "token_type": "Bearer",
        "scope": scope_text(state, listed),
        "expires_in": lifetime,
        "ext_expires_in": lifetime,
        "access_token": access.token,
    }
    if "offline_access" in grant.scopes and ("offline_access" in scopes or rotating):
        refresh = RefreshToken(state.new_token("1.AXkA"), grant, now, now + REFRESH_TOKEN_LIFETIME)
        state.refresh_tokens[refresh.token] = refresh
        body["refresh_token"] = refresh.token
    if "openid" in grant.scopes:
        body["id_token"] = _id_token(state, grant, user, listed, nonce, now)
    if params.get("client_info") == "1":
        body["client_info"] = _client_info(user)
    return body


def _id_token(state: MicrosoftState, grant: Grant, user: User, scopes: set[str], nonce: str | None, now: float) -> str:
    base = state.base_url
    pairwise = hashlib.sha256(f"{user.oid}:{grant.client_id}".encode()).digest()
    claims: dict[str, Any] = {
        "ver": "2.0",
        "iss": f"{base}/{user.tenant_id}/v2.0",
        "sub": b64url(pairwise),
        "aud": grant.client_id,
        "exp": int(now) + ID_TOKEN_LIFETIME,
        "iat": int(now),
        "nbf": int(now),
        "oid": user.oid,
        "tid": user.tenant_id,
        "aio": b64url(secrets.token_bytes(24)),
        "uti": b64url(secrets.token_bytes(16)),
        "rh": "0.emulator",
    }
    if "profile" in scopes:  # "The profile scope is required to receive" name and preferred_username
        claims["name"] = user.display_name
        claims["preferred_username"] = user.email
    if "email" in scopes:
        claims["email"] = user.email
    if nonce is not None:
        claims["nonce"] = nonce
    return state.signing_key.sign(claims)


# ---- userinfo -------------------------------------------------------------------------------------------------


def userinfo(state: MicrosoftState, request: Request) -> Response:
    scheme, _, value = (request.header("authorization") or "").partition(" ")
    with state.lock:
        record = state.access_token(value) if scheme.lower() == "bearer" else None
        if record is None:
            return Response.json(
                401, {"error": {"code": "InvalidAuthenticationToken", "message": "Access token validation failure."}}
            )
        user = state.users[record.grant.user]
        pairwise = hashlib.sha256(f"{user.oid}:{record.grant.client_id}".encode()).digest()
        body: dict[str, Any] = {"sub": b64url(pairwise)}
        if "profile" in record.grant.scopes:
            body["name"] = user.display_name
        if "email" in record.grant.scopes:
            body["email"] = user.email
    return Response.json(200, body)
