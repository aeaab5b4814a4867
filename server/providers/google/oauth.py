"""Google OAuth 2.0 for installed mailboxes: the authorization URL (code flow with PKCE S256), the code exchange,
the id_token that names the mailbox, refresh through google-auth, and revocation.

Blocking (requests, google-auth): the domain runs these methods in the provider thread pool. Tokens never reach a
log line or an exception message; provider error bodies are reduced to their ``error`` code.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import google.auth.exceptions
import google.auth.transport.requests
import google.oauth2.credentials
import google.oauth2.id_token
import requests

from server.config import GoogleConfig
from server.domain.models import Capability, Provider
from server.domain.oauth import Grant
from server.errors import FailedPrecondition, InvalidArgument, ProviderUnavailable, Unauthenticated
from server.providers.http import ThreadSessions

log = logging.getLogger("mailbroker.google")

SCOPE_PREFIX = "https://www.googleapis.com/auth/"
METADATA_SCOPE = SCOPE_PREFIX + "gmail.metadata"
READONLY_SCOPE = SCOPE_PREFIX + "gmail.readonly"
SEND_SCOPE = SCOPE_PREFIX + "gmail.send"
IDENTITY_SCOPES = ("openid", "email")
# Scopes that give more than the broker ever needs. Never requested; a grant carrying one is still used only for
# what the capabilities allow, and the broker asks for nothing that would add them.
BROAD_SCOPES = frozenset(
    {
        "https://mail.google.com/",
        SCOPE_PREFIX + "gmail.modify",
        SCOPE_PREFIX + "gmail.compose",
        SCOPE_PREFIX + "gmail.insert",
        SCOPE_PREFIX + "gmail.settings.basic",
        SCOPE_PREFIX + "gmail.settings.sharing",
    }
)
# The email scope may come back in either spelling.
_EMAIL_SCOPES = frozenset({"email", SCOPE_PREFIX + "userinfo.email"})


def scopes_for(capabilities: Iterable[Capability]) -> list[str]:
    """The narrowest Gmail scopes for ``capabilities`` plus the identity scopes.

    READ asks for ``gmail.readonly`` alone, never with ``gmail.metadata``: a token holding the metadata scope is
    held to its limits (no bodies) whatever else it holds.
    """
    wanted = set(capabilities)
    scopes: list[str] = []
    if Capability.READ in wanted:
        scopes.append(READONLY_SCOPE)
    elif Capability.METADATA in wanted:
        scopes.append(METADATA_SCOPE)
    if Capability.SEND in wanted:
        scopes.append(SEND_SCOPE)
    return [*scopes, *IDENTITY_SCOPES]


def capabilities_for(scopes: Iterable[str]) -> frozenset[Capability]:
    """What the granted ``scopes`` let the broker do."""
    granted = set(scopes)
    capabilities: set[Capability] = set()
    if READONLY_SCOPE in granted:
        # The metadata scope, when also present, restricts every read to metadata.
        capabilities |= {Capability.METADATA} if METADATA_SCOPE in granted else {Capability.METADATA, Capability.READ}
    elif METADATA_SCOPE in granted:
        capabilities.add(Capability.METADATA)
    if SEND_SCOPE in granted:
        capabilities.add(Capability.SEND)
    return frozenset(capabilities)


def _pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(64)[:96]  # 43-128 characters of [A-Za-z0-9-._~] (RFC 7636)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()
    return verifier, challenge


@dataclass(frozen=True)
class _Endpoints:
    authorization: str
    token: str
    revoke: str
    certs: str


class GoogleOAuth:
    """The Google side of BeginOAuth / CompleteOAuth, refresh and revocation, for one OAuth client."""

    provider = Provider.GOOGLE

    def __init__(self, config: GoogleConfig) -> None:
        self._client_id = config.client_id
        self._client_secret = config.secret()
        self.redirect_uris = config.redirect_uris
        self._issuers = frozenset(config.issuers)
        self._endpoints = _Endpoints(
            config.authorization_endpoint, config.token_endpoint, config.revoke_endpoint, config.certs_url
        )
        self._http = ThreadSessions(str(config.ca_file) if config.ca_file else True, config.timeout_seconds)

    # -- consent ---------------------------------------------------------------------------------------------------

    scopes_for = staticmethod(scopes_for)
    capabilities_for = staticmethod(capabilities_for)

    def begin(self, scopes: list[str], redirect_uri: str, state: str, login_hint: str) -> tuple[str, dict[str, Any]]:
        """The authorization URL, and what the exchange will need (kept server-side, sealed)."""
        verifier, challenge = _pkce_pair()
        query = {
            "client_id": self._client_id,
            "redirect_uri": redirect_uri,
            "response_type": "code",
            "scope": " ".join(scopes),
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "access_type": "offline",
            "include_granted_scopes": "true",
            # Without consent on screen Google returns no refresh token for a user who consented before.
            "prompt": "consent",
        }
        if login_hint:
            query["login_hint"] = login_hint
        return f"{self._endpoints.authorization}?{urlencode(query)}", {
            "verifier": verifier,
            "redirect_uri": redirect_uri,
        }

    def exchange(self, flow: Mapping[str, Any], code: str) -> Grant:
        """Trade the authorization code (with the PKCE verifier) for tokens; the id_token names the mailbox."""
        response = self._post_token(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": flow["redirect_uri"],
                "code_verifier": flow["verifier"],
                "client_id": self._client_id,
                "client_secret": self._client_secret,
            },
            exchanging=True,
        )
        access_token = response.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise ProviderUnavailable("the provider's token response had no access token", reason="PROVIDER_ERROR")
        claims = self._identity(response.get("id_token"))
        refresh_token = response.get("refresh_token")
        return Grant(
            access_token=access_token,
            expire_time=_expiry(response.get("expires_in")),
            refresh_token=refresh_token if isinstance(refresh_token, str) and refresh_token else None,
            scopes=frozenset(str(response.get("scope", "")).split()),
            subject=str(claims["sub"]),
            email_address=str(claims["email"]),
        )

    def _identity(self, id_token: object) -> Mapping[str, Any]:
        if not isinstance(id_token, str) or not id_token:
            raise FailedPrecondition(
                "the provider did not identify the mailbox (the openid and email scopes are needed)",
                reason="IDENTITY_NOT_GRANTED",
            )
        try:
            claims = google.oauth2.id_token.verify_token(
                id_token, self._request(), audience=self._client_id, certs_url=self._endpoints.certs
            )
        except (ValueError, google.auth.exceptions.GoogleAuthError) as exc:
            raise ProviderUnavailable(
                "the provider's id_token did not verify", reason="PROVIDER_IDENTITY_INVALID"
            ) from exc
        if claims.get("iss") not in self._issuers or not claims.get("sub"):
            raise ProviderUnavailable("the provider's id_token did not verify", reason="PROVIDER_IDENTITY_INVALID")
        if not claims.get("email") or claims.get("email_verified") is not True:
            raise FailedPrecondition(
                "the provider did not give a verified address for the mailbox", reason="IDENTITY_NOT_GRANTED"
            )
        return claims

    # -- tokens ----------------------------------------------------------------------------------------------------

    def refresh(self, refresh_token: str) -> Grant:
        """A new access token through google-auth. A refused grant → Unauthenticated PROVIDER_AUTH_FAILED."""
        credentials = google.oauth2.credentials.Credentials(  # type: ignore[no-untyped-call]
            token=None,
            refresh_token=refresh_token,
            token_uri=self._endpoints.token,
            client_id=self._client_id,
            client_secret=self._client_secret,
        )
        try:
            credentials.refresh(self._request())  # type: ignore[no-untyped-call]
        except google.auth.exceptions.RefreshError as exc:
            raise _refresh_error(exc) from None
        except google.auth.exceptions.TransportError as exc:
            raise ProviderUnavailable(
                "the provider's token endpoint cannot be reached", reason="PROVIDER_UNREACHABLE"
            ) from exc
        expiry = credentials.expiry
        return Grant(
            access_token=str(credentials.token),
            expire_time=expiry.replace(tzinfo=UTC) if expiry else _expiry(None),
            # google-auth keeps the old refresh token when the response carries none.
            refresh_token=credentials.refresh_token if credentials.refresh_token != refresh_token else None,
            scopes=frozenset(credentials.granted_scopes or ()),
        )

    def revoke(self, token: str) -> None:
        """Revoke the grant behind ``token`` at Google. An already revoked grant counts as revoked."""
        try:
            response = self._http.post(
                self._endpoints.revoke,
                data={"token": token},
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
        except requests.RequestException as exc:
            raise ProviderUnavailable(
                "the provider's revoke endpoint cannot be reached", reason="PROVIDER_UNREACHABLE"
            ) from exc
        if response.status_code == 200:
            return
        code = _error_code(response)
        if response.status_code == 400 and code in ("invalid_token", "invalid_grant"):
            return  # nothing left to revoke
        raise ProviderUnavailable(
            "the provider refused the revocation",
            reason="PROVIDER_REVOKE_FAILED",
            metadata={"http_status": str(response.status_code)},
        )

    def close(self) -> None:
        """Close every thread's kept-alive connections (at shutdown)."""
        self._http.close()

    # -- HTTP ------------------------------------------------------------------------------------------------------

    def _request(self) -> google.auth.transport.requests.Request:
        return google.auth.transport.requests.Request(self._http.session())

    def _post_token(self, form: Mapping[str, str], *, exchanging: bool) -> dict[str, Any]:
        try:
            response = self._http.post(self._endpoints.token, data=dict(form))
        except requests.RequestException as exc:
            raise ProviderUnavailable(
                "the provider's token endpoint cannot be reached", reason="PROVIDER_UNREACHABLE"
            ) from exc
        if response.status_code == 200:
            try:
                body = response.json()
            except ValueError:
                body = None
            if isinstance(body, dict):
                return body
            raise ProviderUnavailable("the provider's token response was not JSON", reason="PROVIDER_ERROR")
        code = _error_code(response)
        if exchanging and code in ("invalid_grant", "invalid_request"):
            # A used, expired or foreign code, or a verifier that does not match: the user must start again.
            raise InvalidArgument(
                "the authorization code was refused; start the authorization again", reason="OAUTH_CODE_REJECTED"
            )
        if code in ("invalid_client", "unauthorized_client"):
            raise FailedPrecondition(
                "the broker's OAuth client was refused by the provider", reason="OAUTH_CLIENT_REJECTED"
            )
        if response.status_code == 429:
            raise ProviderUnavailable("the provider's token endpoint is rate limiting", reason="PROVIDER_RATE_LIMITED")
        raise ProviderUnavailable(
            "the provider's token endpoint failed",
            reason="PROVIDER_ERROR",
            metadata={"http_status": str(response.status_code)},
        )


def _error_code(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    code = body.get("error") if isinstance(body, dict) else None
    return code if isinstance(code, str) else ""


def _refresh_error(exc: google.auth.exceptions.RefreshError) -> Exception:
    details = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
    code = details.get("error")
    if code == "invalid_grant":
        # The user removed the app, changed the password, or the grant expired: only a new consent helps.
        return Unauthenticated("the provider refused the account's grant", reason="PROVIDER_AUTH_FAILED")
    if code in ("invalid_client", "unauthorized_client"):
        # The broker's own client (its id, secret or type) was refused: true of every account at once, and no user
        # can fix it by consenting again. The account keeps its state; the operator fixes [google].
        return FailedPrecondition(
            "the broker's OAuth client was refused by the provider", reason="OAUTH_CLIENT_REJECTED"
        )
    return ProviderUnavailable("the provider's token endpoint failed", reason="PROVIDER_ERROR")


def _expiry(expires_in: object) -> datetime:
    seconds = expires_in if isinstance(expires_in, int | float) and expires_in > 0 else 3600
    return datetime.now(UTC) + timedelta(seconds=float(seconds))
