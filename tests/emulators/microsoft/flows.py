"""The client side for tests: the real msal ConfidentialClientApplication wired to the emulator (response_mode
form_post, as msal recommends), and a requests session for Graph calls."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msal
import requests

from tests.emulators.microsoft.server import MicrosoftEmulator
from tests.emulators.microsoft.state import App

REDIRECT_URI = "https://broker.test/oauth/microsoft/callback"


def msal_app(
    ms: MicrosoftEmulator, app: App, tenant: str = "common", *, validate_authority: bool = True, **kwargs: Any
) -> msal.ConfidentialClientApplication:
    kwargs.setdefault("instance_discovery", False)
    return msal.ConfidentialClientApplication(
        app.client_id,
        client_credential=app.client_secret,
        authority=ms.authority(tenant),
        validate_authority=validate_authority,
        http_client=ms.session(),
        **kwargs,
    )


def sign_in(
    ms: MicrosoftEmulator,
    app: App,
    user: str,
    scopes: Iterable[str],
    *,
    untick: Iterable[str] = (),
    cca: msal.ConfidentialClientApplication | None = None,
) -> dict[str, Any]:
    """initiate_auth_code_flow -> the user consents -> acquire_token_by_auth_code_flow; returns msal's result."""
    cca = cca or msal_app(ms, app)
    flow = cca.initiate_auth_code_flow(list(scopes), redirect_uri=app.redirect_uris[0], response_mode="form_post")
    action, fields = ms.authorize_form_post(flow["auth_uri"], user=user, untick=untick)
    assert action == app.redirect_uris[0]
    result: dict[str, Any] = cca.acquire_token_by_auth_code_flow(flow, fields)
    return result


def graph(ms: MicrosoftEmulator, access_token: str) -> requests.Session:
    """A session for Graph calls with the bearer token, trusting only the emulator's CA."""
    session = ms.session()
    session.headers["Authorization"] = f"Bearer {access_token}"
    return session
