"""Google's OAuth 2.0 / OpenID Connect endpoints, as "Using OAuth 2.0 for Web Server Applications" and the
OpenID Connect guide describe them.

    GET  /o/oauth2/v2/auth                  authorization endpoint (consent simulated, see GoogleEmulator.authorize)
    POST /token                             authorization_code and refresh_token grants
    POST /revoke                            token in the form body or the query; revokes the whole grant
    GET  /oauth2/v3/certs, /oauth2/v1/certs id_token keys (JWK Set; PEM certificates by kid)
    GET  /v1/userinfo, /oauth2/v3/userinfo  OpenID userinfo
    GET  /.well-known/openid-configuration
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
import secrets
from typing import Any
from urllib.parse import unquote, urlencode

from tests.emulators.google.discovery import gmail_discovery
from tests.emulators.google.errors import OAuthError
from tests.emulators.google.state import (
    ACCESS_TOKEN_LIFETIME,
    CODE_LIFETIME,
    AccessToken,
    AuthCode,
    GoogleState,
    Grant,
    RefreshToken,
)
from tests.emulators.google.wire import Request, Response

CONSENT_COOKIE = "emulator_consent"
OPENID = "openid"
EMAIL_SCOPE = "https://www.googleapis.com/auth/userinfo.email"
PROFILE_SCOPE = "https://www.googleapis.com/auth/userinfo.profile"
# Google grants the short OpenID names as their userinfo scopes (and reports them so in `scope`).
_ALIASES = {"email": EMAIL_SCOPE, "profile": PROFILE_SCOPE}
# The identity scopes are not offered as checkboxes on Google's consent screen: they cannot be unticked.
IDENTITY_SCOPES = frozenset({OPENID, EMAIL_SCOPE, PROFILE_SCOPE})
_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")
_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")
_PROMPTS = frozenset({"none", "consent", "select_account"})


def known_scopes() -> frozenset[str]:
    return frozenset(gmail_discovery()["auth"]["oauth2"]["scopes"]) | IDENTITY_SCOPES


def canonical_scopes(text: str) -> list[str]:
    return list(dict.fromkeys(_ALIASES.get(scope, scope) for scope in text.split()))


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode("ascii")


def _error_page(status: int, error: str, description: str) -> Response:
    """What the browser shows when Google will not redirect back (the redirect URI cannot be trusted, or the
    request is malformed): an error page, never a redirect."""
    text = f"<html><body><h1>Error {status}: {html.escape(error)}</h1><p>{html.escape(description)}</p></body></html>"
    return Response(status, text.encode(), {"Content-Type": "text/html; charset=utf-8", "X-Emulator-Error": error})


def _append_query(uri: str, params: dict[str, str]) -> str:
    return uri + ("&" if "?" in uri else "?") + urlencode(params)


def authorize(state: GoogleState, request: Request) -> Response:
    if request.method != "GET":
        return _error_page(405, "invalid_request", "The authorization endpoint takes GET.")
    state.counters["authorize"] += 1
    params: dict[str, str] = {}
    for name, values in request.query.items():
        if len(values) != 1:
            return _error_page(400, "invalid_request", f"Parameter repeated: {name}")
        params[name] = values[0]
    with state.lock:
        state.authorization_requests.append(dict(params))
        client = state.clients.get(params.get("client_id", ""))
        if client is None:
            return _error_page(401, "invalid_client", "The OAuth client was not found.")
        redirect_uri = params.get("redirect_uri", "")
        if redirect_uri not in client.redirect_uris:
            return _error_page(400, "redirect_uri_mismatch", "The redirect URI is not registered for this client.")
        problem = _check_authorization_params(state, params)
        if problem:
            return _error_page(400, *problem)

        ticket = _cookie(request, CONSENT_COOKIE)
        consent = state.consents.pop(ticket, None) if ticket else None
        if consent is None:
            page = b"<html><body><h1>Sign in with Google (emulator)</h1><p>Choose an account.</p></body></html>"
            return Response(200, page, {"Content-Type": "text/html; charset=utf-8"})
        reply = {"state": params["state"]} if "state" in params else {}
        if consent.deny:
            state.counters["authorize.denied"] += 1
            return Response.redirect(_append_query(redirect_uri, {"error": "access_denied", **reply}))

        requested = canonical_scopes(params["scope"])
        untick = {_ALIASES.get(s, s) for s in consent.untick}
        granted = {scope for scope in requested if scope not in untick or scope in IDENTITY_SCOPES}
        grant = state.live_grant(consent.user, client.client_id)
        prompt = frozenset(params.get("prompt", "").split())
        if "none" in prompt and not set(requested) <= grant.scopes:
            return Response.redirect(_append_query(redirect_uri, {"error": "consent_required", **reply}))
        if params.get("include_granted_scopes") == "true":
            granted |= grant.scopes
        grant.scopes |= granted
        code = AuthCode(
            code="4/0" + secrets.token_urlsafe(48),
            client_id=client.client_id,
            user=consent.user,
            redirect_uri=redirect_uri,
            scopes=frozenset(granted),
            code_challenge=params.get("code_challenge"),
            code_challenge_method=params.get("code_challenge_method", "plain" if "code_challenge" in params else None),
            access_type=params.get("access_type", "online"),
            prompt=prompt,
            nonce=params.get("nonce"),
            expires_at=state.clock.now() + CODE_LIFETIME,
            grant=grant,
        )
        state.codes[code.code] = code
        state.counters["authorize.granted"] += 1
        ordered = [s for s in requested if s in granted] + sorted(granted - set(requested))
        return Response.redirect(
            _append_query(
                redirect_uri,
                {**reply, "code": code.code, "scope": " ".join(ordered), "authuser": "0", "prompt": "consent"},
            )
        )


def _check_authorization_params(state: GoogleState, params: dict[str, str]) -> tuple[str, str] | None:
    if params.get("response_type") != "code":
        return "unsupported_response_type", "response_type must be code for a web server application."
    if not params.get("scope", "").strip():
        return "invalid_request", "Missing required parameter: scope"
    unknown = [s for s in canonical_scopes(params["scope"]) if s not in known_scopes()]
    if unknown:
        return "invalid_scope", "Some requested scopes were invalid."
    if state.policy.require_state and not params.get("state"):
        return "invalid_request", "Missing state (the emulator requires it)."
    method = params.get("code_challenge_method")
    challenge = params.get("code_challenge")
    if method is not None and method not in ("S256", "plain"):
        return "invalid_request", "Invalid code_challenge_method."
    if method is not None and challenge is None:
        return "invalid_request", "Missing code_challenge."
    if state.policy.require_pkce_s256 and (challenge is None or method != "S256"):
        return "invalid_request", "PKCE with code_challenge_method=S256 is required (emulator policy)."
    if challenge is not None and (method or "plain") == "S256" and not _CHALLENGE.fullmatch(challenge):
        return "invalid_request", "Invalid code_challenge."
    if params.get("access_type", "online") not in ("online", "offline"):
        return "invalid_request", "Invalid access_type."
    if params.get("include_granted_scopes", "false") not in ("true", "false"):
        return "invalid_request", "Invalid include_granted_scopes."
    prompt = set(params.get("prompt", "").split())
    if not prompt <= _PROMPTS or ("none" in prompt and len(prompt) > 1):
        return "invalid_request", "Invalid prompt."
    return None


def _cookie(request: Request, name: str) -> str | None:
    for item in (request.header("cookie") or "").split(";"):
        key, _, value = item.strip().partition("=")
        if key == name:
            return value
    return None


# ---- token endpoint ---------------------------------------------------------------------------------------------

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def token(state: GoogleState, request: Request) -> Response:
    try:
        if request.method != "POST":
            raise OAuthError("invalid_request", "The token endpoint takes POST.", 405)
        with state.lock:
            fault = _take_token_fault(state)
            if fault is not None:
                return fault
            body = _token_response(state, request)
        return Response.json(200, body, _NO_STORE)
    except OAuthError as exc:
        with state.lock:
            state.counters["token.error"] += 1
            state.counters[f"token.error.{exc.error}"] += 1
        headers = dict(_NO_STORE)
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="token"'
        return Response.json(exc.status, exc.body(), headers)


def _take_token_fault(state: GoogleState) -> Response | None:
    if not state.token_faults:
        return None
    fault = state.token_faults[0]
    fault.remaining -= 1
    if fault.remaining <= 0:
        state.token_faults.pop(0)
    state.counters["token.fault"] += 1
    headers = dict(_NO_STORE)
    if fault.retry_after is not None:
        headers["Retry-After"] = str(fault.retry_after)
    if fault.html is not None:
        return Response(fault.status, fault.html.encode(), {"Content-Type": "text/html; charset=UTF-8", **headers})
    return Response.json(fault.status, fault.body, headers)


def _single_params(form: dict[str, list[str]]) -> dict[str, str]:
    params = {}
    for name, values in form.items():
        if len(values) != 1:
            raise OAuthError("invalid_request", f"Parameter repeated: {name}")
        params[name] = values[0]
    return params


def _authenticate_client(state: GoogleState, request: Request, params: dict[str, str]) -> str:
    """client_secret_basic or client_secret_post (exactly one of them, RFC 6749 2.3.1)."""
    authorization = request.header("authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "basic":
            raise OAuthError("invalid_client", "Unsupported client authentication.", 401)
        if "client_secret" in params:
            raise OAuthError("invalid_request", "Client authenticated by more than one method.")
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except ValueError:
            raise OAuthError("invalid_client", "Malformed Basic credentials.", 401) from None
        raw_id, sep, raw_secret = decoded.partition(":")
        if not sep:
            raise OAuthError("invalid_client", "Malformed Basic credentials.", 401)
        client_id, secret = unquote(raw_id.replace("+", " ")), unquote(raw_secret.replace("+", " "))
        if params.get("client_id", client_id) != client_id:
            raise OAuthError("invalid_request", "client_id does not match the Basic credentials.")
    else:
        client_id = params.get("client_id", "")
        secret = params.get("client_secret")
        if not client_id:
            raise OAuthError("invalid_client", "The OAuth client was not found.", 401)
        if secret is None:
            raise OAuthError("invalid_request", "client_secret is missing.")
    client = state.clients.get(client_id)
    if client is None:
        raise OAuthError("invalid_client", "The OAuth client was not found.", 401)
    if not secrets.compare_digest(client.client_secret.encode(), secret.encode()):
        raise OAuthError("invalid_client", "Unauthorized", 401)
    return client_id


def _token_response(state: GoogleState, request: Request) -> dict[str, Any]:
    content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "Content-Type must be application/x-www-form-urlencoded.")
    params = _single_params(request.form())
    grant_type = params.get("grant_type")
    state.counters[f"token.{grant_type}"] += 1
    if grant_type not in ("authorization_code", "refresh_token"):
        raise OAuthError("unsupported_grant_type", f"Invalid grant_type: {grant_type}")
    client_id = _authenticate_client(state, request, params)
    if grant_type == "authorization_code":
        return _exchange_code(state, params, client_id)
    return _refresh(state, params, client_id)


def _exchange_code(state: GoogleState, params: dict[str, str], client_id: str) -> dict[str, Any]:
    code = state.codes.get(params.get("code", ""))
    if code is None:
        raise OAuthError("invalid_grant", "Malformed auth code.")
    if code.used:
        # RFC 6749 4.1.2: a replayed code is refused and the tokens issued from it SHOULD be revoked.
        for issued in code.issued:
            for table in (state.access_tokens, state.refresh_tokens):
                if issued in table:
                    table[issued].revoked = True
        raise OAuthError("invalid_grant", "Bad Request")
    if code.client_id != client_id or code.expires_at <= state.clock.now() or code.grant.revoked:
        raise OAuthError("invalid_grant", "Bad Request")
    if params.get("redirect_uri") != code.redirect_uri:
        raise OAuthError("redirect_uri_mismatch", "Bad Request")
    if code.code_challenge is not None:
        verifier = params.get("code_verifier")
        if verifier is None:
            raise OAuthError("invalid_grant", "Missing code verifier.")
        expected = s256(verifier) if code.code_challenge_method == "S256" else verifier
        if not _VERIFIER.fullmatch(verifier) or not secrets.compare_digest(expected, code.code_challenge):
            raise OAuthError("invalid_grant", "Invalid code verifier.")
    elif "code_verifier" in params:
        raise OAuthError("invalid_grant", "code_verifier given without a code_challenge.")
    code.used = True
    body = _issue(state, code.grant, code.scopes, nonce=code.nonce)
    code.issued.append(body["access_token"])
    grant = code.grant
    wants_refresh = code.access_type == "offline"
    if wants_refresh and (
        state.policy.refresh_token_on_every_exchange or not grant.refresh_issued or "consent" in code.prompt
    ):
        refresh = RefreshToken(state.new_token("1//0e"), grant, code.scopes)
        state.refresh_tokens[refresh.token] = refresh
        grant.refresh_issued = True
        code.issued.append(refresh.token)
        body["refresh_token"] = refresh.token
    return body


def _refresh(state: GoogleState, params: dict[str, str], client_id: str) -> dict[str, Any]:
    record = state.refresh_tokens.get(params.get("refresh_token", ""))
    if record is None or record.revoked or record.grant.revoked:
        raise OAuthError("invalid_grant", "Token has been expired or revoked.")
    if record.grant.client_id != client_id:
        raise OAuthError("unauthorized_client", "Unauthorized")
    scopes = record.scopes
    if "scope" in params:
        asked = frozenset(canonical_scopes(params["scope"]))
        if not asked <= record.scopes:
            raise OAuthError("invalid_scope", "Bad Request")
        scopes = asked
    body = _issue(state, record.grant, scopes, nonce=None)
    if state.policy.rotate_refresh_tokens:
        record.revoked = True
        rotated = RefreshToken(state.new_token("1//0e"), record.grant, record.scopes)
        state.refresh_tokens[rotated.token] = rotated
        body["refresh_token"] = rotated.token
    return body


def _issue(state: GoogleState, grant: Grant, scopes: frozenset[str], nonce: str | None) -> dict[str, Any]:
    now = state.clock.now()
    access = AccessToken(state.new_token("ya29.a0"), grant, scopes, now + ACCESS_TOKEN_LIFETIME)
    state.access_tokens[access.token] = access
    body: dict[str, Any] = {
        "access_token": access.token,
        "expires_in": ACCESS_TOKEN_LIFETIME,
        "scope": " ".join(sorted(scopes)),
        "token_type": "Bearer",
    }
    if OPENID in scopes:
        body["id_token"] = _id_token(state, grant, scopes, access.token, nonce, now)
    return body


def _id_token(
    state: GoogleState, grant: Grant, scopes: frozenset[str], access_token: str, nonce: str | None, now: float
) -> str:
    user = state.users[grant.user]
    digest = hashlib.sha256(access_token.encode("ascii")).digest()
    claims: dict[str, Any] = {
        "iss": state.issuer,
        "azp": grant.client_id,
        "aud": grant.client_id,
        "sub": user.sub,
        "at_hash": base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode("ascii"),
        "iat": int(now),
        "exp": int(now) + 3600,
    }
    if EMAIL_SCOPE in scopes:  # "Provided only if your scope included the email scope value."
        claims["email"] = user.email
        claims["email_verified"] = True
    if nonce is not None:
        claims["nonce"] = nonce
    return state.signing_key.sign(claims)


# ---- revocation, keys, userinfo, discovery ----------------------------------------------------------------------


def revoke(state: GoogleState, request: Request) -> Response:
    if request.method != "POST":
        return Response.json(405, {"error": "invalid_request", "error_description": "Use POST."})
    form = request.form() if request.body else {}
    values = form.get("token") or request.query.get("token") or []
    with state.lock:
        state.counters["revoke"] += 1
        now = state.clock.now()
        token_value = values[-1] if values else ""
        grant = None
        access = state.access_tokens.get(token_value)
        refresh = state.refresh_tokens.get(token_value)
        if access is not None and not access.revoked and not access.grant.revoked and access.expires_at > now:
            grant = access.grant
        elif refresh is not None and not refresh.revoked and not refresh.grant.revoked:
            grant = refresh.grant
        if grant is None:
            state.counters["revoke.invalid_token"] += 1
            return Response.json(400, {"error": "invalid_token", "error_description": "Token expired or revoked"})
        state.revoke_grant(grant)
        state.counters["revoke.ok"] += 1
    return Response.json(200, {})


def certs_v3(state: GoogleState, request: Request) -> Response:
    return Response.json(200, state.signing_key.jwks(), {"Cache-Control": "public, max-age=300"})


def certs_v1(state: GoogleState, request: Request) -> Response:
    return Response.json(200, state.signing_key.pem_certs(), {"Cache-Control": "public, max-age=300"})


def userinfo(state: GoogleState, request: Request) -> Response:
    scheme, _, value = (request.header("authorization") or "").partition(" ")
    with state.lock:
        record = state.access_token(value) if scheme.lower() == "bearer" else None
        if record is None:
            return Response.json(
                401,
                {"error": "invalid_request", "error_description": "Invalid Credentials"},
                {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", error="invalid_token"'},
            )
        if not record.scopes & IDENTITY_SCOPES:
            return Response.json(403, {"error": "insufficient_scope", "error_description": "Insufficient scope"})
        user = state.users[record.grant.user]
        body: dict[str, Any] = {"sub": user.sub}
        if EMAIL_SCOPE in record.scopes:
            body.update(email=user.email, email_verified=True)
    return Response.json(200, body)


def openid_configuration(state: GoogleState, request: Request, base_url: str) -> Response:
    return Response.json(
        200,
        {
            "issuer": state.issuer,
            "authorization_endpoint": f"{base_url}/o/oauth2/v2/auth",
            "token_endpoint": f"{base_url}/token",
            "userinfo_endpoint": f"{base_url}/v1/userinfo",
            "revocation_endpoint": f"{base_url}/revoke",
            "jwks_uri": f"{base_url}/oauth2/v3/certs",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "email", "profile"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
            "claims_supported": ["aud", "email", "email_verified", "exp", "iat", "iss", "sub"],
            "code_challenge_methods_supported": ["plain", "S256"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
        },
    )
