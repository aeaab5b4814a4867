"""The Microsoft identity platform through msal: the authorization URL (auth code flow, PKCE S256 by msal), the code
exchange, the id_token claims that name the mailbox, and refresh (Microsoft rotates the refresh token every time).

msal keeps tokens in a cache of its own; here that cache keeps nothing (:class:`_NoTokenCache`), so access tokens
live only in the broker's token manager and refresh tokens only sealed in the store.

Blocking (msal, requests): the domain runs these methods in the provider thread pool. Tokens never reach a log line
or an exception message; provider error bodies are reduced to their ``error`` code.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import msal
import requests

from server.config import MicrosoftConfig
from server.domain.models import Account, Capability, Provider
from server.domain.oauth import Grant
from server.errors import FailedPrecondition, InvalidArgument, ProviderUnavailable, Unauthenticated
from server.providers.http import ThreadSessions

log = logging.getLogger("mailbroker.microsoft")

GRAPH_RESOURCE = "https://graph.microsoft.com/"
METADATA_SCOPE = "Mail.ReadBasic"
READ_SCOPE = "Mail.Read"
SEND_SCOPE = "Mail.Send"
# msal adds openid, profile and offline_access to every request itself (and refuses them from the caller);
# email puts the address in the id_token.
IDENTITY_SCOPES = ("email",)
# msal adds these to every request and refuses them from the caller.
_MSAL_RESERVED = frozenset({"openid", "profile", "offline_access"})
BROAD_SCOPES = frozenset({"mail.readwrite", "mail.readwrite.shared", "mail.read.shared", "mail.send.shared"})
# Resource prefixes a granted scope may come back with (the public and national Graph clouds, Graph's app id).
_RESOURCE_PREFIXES = (
    GRAPH_RESOURCE,
    "https://graph.microsoft.us/",
    "https://dod-graph.microsoft.us/",
    "https://microsoftgraph.chinacloudapi.cn/",
    "00000003-0000-0000-c000-000000000000/",
)
# A grant the user or an administrator took back, or one that expired: only a new consent helps.
_REFUSED_GRANT = frozenset(
    {"invalid_grant", "interaction_required", "consent_required", "login_required", "unauthorized_client"}
)
MICROSOFT_AUTHORITY_HOSTS = frozenset(
    {"login.microsoftonline.com", "login.microsoft.com", "login.windows.net", "login.microsoftonline.us",
     "login.chinacloudapi.cn", "login.partner.microsoftonline.cn", "login.microsoftonline.de"}
)  # fmt: skip
APP_REMOVAL_HINT = (
    "Microsoft offers no per-app revocation of a user's consent: the user removes the app at "
    "https://myapps.microsoft.com (work or school account) or https://account.live.com/consent/Manage "
    "(personal account)"
)


def normalize_scope(scope: str) -> str:
    """A granted scope without its resource prefix, lower case (Microsoft may return ``https://graph.microsoft.com/
    Mail.Read`` for ``Mail.Read``; permission names are case-insensitive)."""
    lowered = scope.strip().lower()
    for prefix in _RESOURCE_PREFIXES:
        if lowered.startswith(prefix):
            return lowered[len(prefix) :]
    return lowered


def seal_credential(refresh_token: str, scopes: Iterable[str]) -> str:
    """What the broker stores for a Microsoft account: the refresh token and the scopes it was granted.

    Microsoft's refresh request must name scopes, equal to or a subset of those consented ("scope ... must be
    equivalent to or a subset of the scopes requested in the original authorization_code request"); the stored
    credential carries them, so a refresh asks for exactly what the user granted (never ``.default``, which names
    every permission of the app registration and fails for a user who consented to fewer)."""
    kept = sorted({normalize_scope(s) for s in scopes} - _MSAL_RESERVED - {""})
    return json.dumps({"v": 1, "refresh_token": refresh_token, "scopes": kept}, separators=(",", ":"))


def open_credential(credential: str) -> tuple[str, list[str]]:
    """(refresh token, scopes to refresh with) of a stored credential (a bare refresh token: identity only)."""
    if credential.startswith("{"):
        try:
            data = json.loads(credential)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("refresh_token"), str):
            scopes = [s for s in data.get("scopes") or [] if isinstance(s, str) and s not in _MSAL_RESERVED]
            return data["refresh_token"], scopes or list(IDENTITY_SCOPES)
    return credential, list(IDENTITY_SCOPES)


def scopes_for(capabilities: Iterable[Capability]) -> list[str]:
    """The narrowest Graph scopes for ``capabilities`` plus ``email`` (msal adds openid, profile, offline_access).

    READ asks for Mail.Read alone: it includes all that Mail.ReadBasic gives."""
    wanted = set(capabilities)
    scopes: list[str] = []
    if Capability.READ in wanted:
        scopes.append(READ_SCOPE)
    elif Capability.METADATA in wanted:
        scopes.append(METADATA_SCOPE)
    if Capability.SEND in wanted:
        scopes.append(SEND_SCOPE)
    return [*scopes, *IDENTITY_SCOPES]


def capabilities_for(scopes: Iterable[str]) -> frozenset[Capability]:
    """What the granted ``scopes`` let the broker do (Graph permissions add up: Mail.Read covers Mail.ReadBasic)."""
    granted = {normalize_scope(s) for s in scopes}
    capabilities: set[Capability] = set()
    if READ_SCOPE.lower() in granted:
        capabilities |= {Capability.METADATA, Capability.READ}
    elif METADATA_SCOPE.lower() in granted:
        capabilities.add(Capability.METADATA)
    if SEND_SCOPE.lower() in granted:
        capabilities.add(Capability.SEND)
    return frozenset(capabilities)


class _NoTokenCache(msal.TokenCache):  # type: ignore[misc]
    """An msal token cache that keeps nothing: access tokens stay in the broker's own memory-only cache, refresh
    tokens only sealed in the store, and nothing of one account lingers in msal after erasure."""

    def add(self, event: Any, **kwargs: Any) -> None:
        return None

    def modify(self, credential_type: Any, old_entry: Any, new_key_value_pairs: Any = None) -> None:
        return None


class MicrosoftOAuth:
    """The Microsoft side of BeginOAuth / CompleteOAuth and refresh, for one app registration."""

    provider = Provider.MICROSOFT

    def __init__(self, config: MicrosoftConfig) -> None:
        self._client_id = config.client_id
        self._client_secret = config.secret()
        self.redirect_uris = config.redirect_uris
        self._authority = f"{config.authority_host.rstrip('/')}/{config.authority}"
        self._microsoft_host = (urlsplit(config.authority_host).hostname or "").lower() in MICROSOFT_AUTHORITY_HOSTS
        self._http = ThreadSessions(str(config.ca_file) if config.ca_file else True, config.timeout_seconds)
        self._app: msal.ConfidentialClientApplication | None = None
        self._app_lock = threading.Lock()

    scopes_for = staticmethod(scopes_for)
    capabilities_for = staticmethod(capabilities_for)

    def _application(self) -> msal.ConfidentialClientApplication:
        """The msal application, made on first use: making it fetches the authority's OpenID configuration, and
        the broker must start even when Microsoft cannot be reached."""
        with self._app_lock:
            if self._app is None:
                try:
                    self._app = msal.ConfidentialClientApplication(
                        self._client_id,
                        client_credential=self._client_secret,
                        authority=self._authority,
                        token_cache=_NoTokenCache(),
                        http_client=self._http,
                        # Instance discovery asks login.microsoftonline.com about the authority host: only for
                        # Microsoft's own hosts (a sovereign cloud, a test emulator is not known there).
                        instance_discovery=None if self._microsoft_host else False,
                        validate_authority=self._microsoft_host,
                    )
                except requests.RequestException as exc:
                    raise ProviderUnavailable(
                        "the identity platform cannot be reached", reason="PROVIDER_UNREACHABLE"
                    ) from exc
                except msal.exceptions.MsalServiceError as exc:  # the OpenID configuration endpoint answered 5xx
                    raise _server_error() from exc
                except ValueError as exc:  # msal: the OpenID configuration could not be read
                    raise ProviderUnavailable(
                        "the identity platform's configuration could not be read", reason="PROVIDER_ERROR"
                    ) from exc
            return self._app

    # -- consent ---------------------------------------------------------------------------------------------------

    def begin(self, scopes: list[str], redirect_uri: str, state: str, login_hint: str) -> tuple[str, dict[str, Any]]:
        """The authorization URL, and msal's flow (PKCE verifier, nonce) to be kept server-side, sealed."""
        flow: dict[str, Any] = self._application().initiate_auth_code_flow(
            scopes,
            redirect_uri=redirect_uri,
            state=state,
            login_hint=login_hint or None,
            # The code comes back in a form POSTed to the redirect URI, not in its query: it stays out of browser
            # history, referrers and access logs (RFC 9700 4.3.1; msal warns about anything else).
            response_mode="form_post",
        )
        return str(flow["auth_uri"]), flow

    def exchange(self, flow: Mapping[str, Any], code: str) -> Grant:
        """Redeem the code (msal checks the state and sends the PKCE verifier); the id_token names the mailbox."""
        app = self._application()
        try:
            result = app.acquire_token_by_auth_code_flow(dict(flow), {"code": code, "state": flow.get("state")})
        except requests.RequestException as exc:
            raise ProviderUnavailable("the identity platform cannot be reached", reason="PROVIDER_UNREACHABLE") from exc
        except msal.exceptions.MsalServiceError as exc:
            raise _server_error() from exc
        except json.JSONDecodeError:
            raise _not_json() from None
        except ValueError:
            # msal validates the id_token (audience, issuer, nonce, expiry) and the flow; the values stay out.
            raise ProviderUnavailable(
                "the provider's id_token did not verify", reason="PROVIDER_IDENTITY_INVALID"
            ) from None
        error = result.get("error")
        if error:
            if error in ("invalid_grant", "invalid_request"):
                raise InvalidArgument(
                    "the authorization code was refused; start the authorization again", reason="OAUTH_CODE_REJECTED"
                )
            raise _token_error(str(error))
        access_token = result.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise ProviderUnavailable("the provider's token response had no access token", reason="PROVIDER_ERROR")
        claims = result.get("id_token_claims") or {}
        subject = claims.get("oid") or claims.get("sub")
        address = claims.get("email") or claims.get("preferred_username")
        if not subject or not isinstance(address, str) or "@" not in address:
            raise FailedPrecondition(
                "the provider did not identify the mailbox (the openid and email scopes are needed)",
                reason="IDENTITY_NOT_GRANTED",
            )
        refresh_token = result.get("refresh_token")
        scopes = frozenset(str(result.get("scope", "")).split())
        return Grant(
            access_token=access_token,
            expire_time=_expiry(result.get("expires_in")),
            refresh_token=(
                seal_credential(refresh_token, scopes) if isinstance(refresh_token, str) and refresh_token else None
            ),
            scopes=scopes,
            subject=str(subject),
            email_address=address,
        )

    # -- tokens ----------------------------------------------------------------------------------------------------

    def refresh(self, refresh_token: str) -> Grant:
        """A new access token, and the new refresh token Microsoft sends with it (it rotates on every use), for
        the scopes the stored credential was granted (``refresh_token`` is a :func:`seal_credential`).
        A refused grant → Unauthenticated PROVIDER_AUTH_FAILED."""
        app = self._application()
        token, scopes = open_credential(refresh_token)
        try:
            result = app.acquire_token_by_refresh_token(token, scopes)
        except requests.RequestException as exc:
            raise ProviderUnavailable("the identity platform cannot be reached", reason="PROVIDER_UNREACHABLE") from exc
        except msal.exceptions.MsalServiceError as exc:
            raise _server_error() from exc
        except json.JSONDecodeError:
            raise _not_json() from None
        except ValueError:
            raise ProviderUnavailable("the provider's token response did not verify", reason="PROVIDER_ERROR") from None
        error = result.get("error")
        if error:
            if error in _REFUSED_GRANT:
                raise Unauthenticated("the provider refused the account's grant", reason="PROVIDER_AUTH_FAILED")
            raise _token_error(str(error))
        access_token = result.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise ProviderUnavailable("the provider's token response had no access token", reason="PROVIDER_ERROR")
        rotated = result.get("refresh_token")
        return Grant(
            access_token=access_token,
            expire_time=_expiry(result.get("expires_in")),
            refresh_token=(
                seal_credential(rotated, scopes) if isinstance(rotated, str) and rotated and rotated != token else None
            ),
            scopes=frozenset(str(result.get("scope", "")).split()),
        )

    def revoke(self, token: str) -> None:
        """Microsoft has no endpoint for an app to revoke one user's delegated grant (revokeSignInSessions ends
        every session of the user in every app, and needs a broad permission): nothing to call."""
        raise FailedPrecondition(APP_REMOVAL_HINT, reason="REVOCATION_NOT_SUPPORTED")

    def close(self) -> None:
        """Close every thread's kept-alive connections (at shutdown)."""
        self._http.close()


def microsoft_revoker(tokens: Any) -> Any:
    """The erasure step for Microsoft accounts: nothing can be revoked at Microsoft, so the receipt says
    NOT_SUPPORTED_BY_PROVIDER and where the user removes the app. The access token is dropped from memory; the
    refresh token goes with the purge of the account's rows."""
    from server.domain.erasure import RevokeResult

    async def revoke(account: Account) -> RevokeResult:
        tokens.forget(account.id)
        return RevokeResult("NOT_SUPPORTED_BY_PROVIDER", "PROVIDER_HAS_NO_APP_REVOCATION", APP_REMOVAL_HINT)

    return revoke


def _server_error() -> ProviderUnavailable:
    """The token endpoint answered 5xx: msal raises MsalServiceError("HTTP Error: <status>") rather than return the
    body, and answers the same request (same code or refresh token) from its throttle cache for the Retry-After time
    (5 s without one) without asking again."""
    return ProviderUnavailable("the identity platform is unavailable", reason="PROVIDER_UNAVAILABLE")


def _not_json() -> ProviderUnavailable:
    # msal logs the body (server.providers.library_logs withholds it) and raises json's error, whose message is
    # about the body's text: neither is kept.
    return ProviderUnavailable("the provider's token response was not JSON", reason="PROVIDER_ERROR")


def _token_error(code: str) -> Exception:
    if code in ("invalid_client", "unauthorized_client"):
        return FailedPrecondition(
            "the broker's OAuth client was refused by the provider", reason="OAUTH_CLIENT_REJECTED"
        )
    if code in ("temporarily_unavailable", "server_error"):
        return ProviderUnavailable("the identity platform is unavailable", reason="PROVIDER_UNAVAILABLE")
    return ProviderUnavailable("the provider's token endpoint failed", reason="PROVIDER_ERROR")


def _expiry(expires_in: object) -> datetime:
    seconds = expires_in if isinstance(expires_in, int | float) and expires_in > 0 else 3600
    return datetime.now(UTC) + timedelta(seconds=float(seconds))
