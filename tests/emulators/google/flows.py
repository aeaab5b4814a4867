"""The client side of the flows, done by hand the way a broker does them, for tests against the emulator:
PKCE, the authorization URL, the code exchange, and google-auth / googleapiclient objects wired to the emulator."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import google_auth_httplib2
import httplib2
from google.oauth2.credentials import Credentials
from googleapiclient.discovery import build

from tests.emulators.google.server import GoogleEmulator
from tests.emulators.google.state import Client

GMAIL = "https://www.googleapis.com/auth/gmail."
READONLY = GMAIL + "readonly"
METADATA = GMAIL + "metadata"
SEND = GMAIL + "send"
REDIRECT_URI = "https://broker.test/oauth/google/callback"


@dataclass(frozen=True)
class Pkce:
    verifier: str
    challenge: str

    @classmethod
    def new(cls) -> Pkce:
        verifier = secrets.token_urlsafe(64)
        digest = hashlib.sha256(verifier.encode("ascii")).digest()
        return cls(verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii"))


def authorization_url(
    google: GoogleEmulator, client: Client, scopes: Iterable[str], pkce: Pkce, state: str = "state-canary", **extra: str
) -> str:
    params = {
        "client_id": client.client_id,
        "redirect_uri": client.redirect_uris[0],
        "response_type": "code",
        "scope": " ".join(scopes),
        "state": state,
        "code_challenge": pkce.challenge,
        "code_challenge_method": "S256",
        **extra,
    }
    return f"{google.authorize_url}?{urlencode(params)}"


def redirect_params(location: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(location).query).items()}


def http(google: GoogleEmulator) -> httplib2.Http:
    """An httplib2 client that trusts only the emulator's CA (not the machine's variables); closed with it."""
    return google.http()


def post_form(
    google: GoogleEmulator, url: str, fields: dict[str, str], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST a form; returns (status, JSON body, response headers)."""
    response, content = http(google).request(
        url,
        "POST",
        body=urlencode(fields),
        headers={"Content-Type": "application/x-www-form-urlencoded", **(headers or {})},
    )
    return response.status, json.loads(content or b"null"), dict(response)


def exchange_code(
    google: GoogleEmulator, client: Client, code: str, verifier: str, **overrides: str
) -> tuple[int, dict[str, Any]]:
    fields = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": client.redirect_uris[0],
        "client_id": client.client_id,
        "client_secret": client.client_secret,
        "code_verifier": verifier,
        **overrides,
    }
    status, body, _ = post_form(google, google.token_url, {k: v for k, v in fields.items() if v is not None})
    return status, body


def sign_in(
    google: GoogleEmulator,
    client: Client,
    user: str,
    scopes: Iterable[str],
    *,
    untick: Iterable[str] = (),
    **extra: str,
) -> dict[str, Any]:
    """Authorize (offline access by default) and exchange the code; returns the token response."""
    pkce = Pkce.new()
    extra.setdefault("access_type", "offline")
    location = google.authorize(authorization_url(google, client, scopes, pkce, **extra), user=user, untick=untick)
    status, body = exchange_code(google, client, redirect_params(location)["code"], pkce.verifier)
    assert status == 200, body.get("error")
    return body


def credentials(google: GoogleEmulator, client: Client, tokens: dict[str, Any]) -> Credentials:
    return Credentials(
        tokens["access_token"],
        refresh_token=tokens.get("refresh_token"),
        token_uri=google.token_url,
        client_id=client.client_id,
        client_secret=client.client_secret,
    )


def gmail_service(google: GoogleEmulator, creds: Credentials) -> Any:
    """googleapiclient's Gmail service from the shipped discovery document, pointed at the emulator."""
    authorized = google_auth_httplib2.AuthorizedHttp(creds, http=http(google))
    return build(
        "gmail",
        "v1",
        http=authorized,
        static_discovery=True,
        client_options=google.client_options(),
        cache_discovery=False,
    )
