"""The emulator's OAuth 2.0 / OpenID Connect endpoints, driven the way the broker will drive Google's."""

from __future__ import annotations

import base64

import google_auth_httplib2
import jwt
import pytest
from google.auth.exceptions import RefreshError
from google.oauth2 import id_token

from tests.emulators.google import AuthorizationRefused, GoogleEmulator
from tests.emulators.google.flows import (
    METADATA,
    READONLY,
    REDIRECT_URI,
    SEND,
    Pkce,
    authorization_url,
    credentials,
    exchange_code,
    http,
    post_form,
    redirect_params,
    sign_in,
)
from tests.emulators.google.state import Client

USER = "alice@example.test"
EMAIL_SCOPE = "https://www.googleapis.com/auth/userinfo.email"


@pytest.fixture
def client(google_emulator: GoogleEmulator) -> Client:
    google_emulator.add_user(USER)
    return google_emulator.register_client([REDIRECT_URI])


def _authorize(google: GoogleEmulator, client: Client, scopes: list[str], **extra: str) -> tuple[Pkce, dict[str, str]]:
    pkce = Pkce.new()
    location = google.authorize(authorization_url(google, client, scopes, pkce, **extra), user=USER)
    assert location.startswith(REDIRECT_URI + "?")
    return pkce, redirect_params(location)


def test_code_flow_issues_tokens_as_google_does(google_emulator: GoogleEmulator, client: Client) -> None:
    pkce, params = _authorize(google_emulator, client, ["openid", "email", READONLY], access_type="offline")
    assert params["state"] == "state-canary"
    assert params["scope"].split() == ["openid", EMAIL_SCOPE, READONLY]  # "email" granted as its userinfo scope

    status, body = exchange_code(google_emulator, client, params["code"], pkce.verifier)

    assert status == 200
    assert set(body) == {"access_token", "expires_in", "scope", "token_type", "id_token", "refresh_token"}
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3599
    assert set(body["scope"].split()) == {"openid", EMAIL_SCOPE, READONLY}
    assert google_emulator.counters()["token.authorization_code"] == 1


def test_online_access_gets_no_refresh_token(google_emulator: GoogleEmulator, client: Client) -> None:
    pkce, params = _authorize(google_emulator, client, [READONLY])  # access_type defaults to online
    status, body = exchange_code(google_emulator, client, params["code"], pkce.verifier)
    assert status == 200
    assert "refresh_token" not in body
    assert "id_token" not in body  # no openid scope, no id_token


def test_refresh_token_only_on_first_offline_exchange_unless_prompt_consent(
    google_emulator: GoogleEmulator, client: Client
) -> None:
    assert "refresh_token" in sign_in(google_emulator, client, USER, [READONLY])
    assert "refresh_token" not in sign_in(google_emulator, client, USER, [READONLY])
    assert "refresh_token" in sign_in(google_emulator, client, USER, [READONLY], prompt="consent")


def test_id_token_verifies_against_both_key_formats(google_emulator: GoogleEmulator, client: Client) -> None:
    tokens = sign_in(google_emulator, client, USER, ["openid", "email", READONLY])
    request = google_auth_httplib2.Request(http(google_emulator))
    sub = google_emulator.state.users[USER].sub

    for certs_url in (google_emulator.certs_url, google_emulator.certs_v1_url):
        claims = id_token.verify_token(tokens["id_token"], request, audience=client.client_id, certs_url=certs_url)
        assert claims["iss"] == "https://accounts.google.com"
        assert claims["aud"] == client.client_id and claims["sub"] == sub
        assert claims["email"] == USER and claims["email_verified"] is True
        assert claims["exp"] > claims["iat"]

    header, payload, signature = tokens["id_token"].split(".")
    forged = base64.urlsafe_b64encode(base64.urlsafe_b64decode(payload + "==").replace(sub.encode(), b"1" * len(sub)))
    forged_token = f"{header}.{forged.decode().rstrip('=')}.{signature}"
    # google-auth checks PEM certificates itself (ValueError) and a JWK Set through PyJWT (PyJWTError).
    for certs_url in (google_emulator.certs_url, google_emulator.certs_v1_url):
        with pytest.raises((ValueError, jwt.PyJWTError), match=r"(?i)audience"):
            id_token.verify_token(tokens["id_token"], request, audience="another-client", certs_url=certs_url)
        with pytest.raises((ValueError, jwt.PyJWTError), match=r"(?i)signature"):
            id_token.verify_token(forged_token, request, audience=client.client_id, certs_url=certs_url)


def test_id_token_names_the_email_only_with_the_email_scope(google_emulator: GoogleEmulator, client: Client) -> None:
    tokens = sign_in(google_emulator, client, USER, ["openid", READONLY])
    request = google_auth_httplib2.Request(http(google_emulator))
    claims = id_token.verify_token(tokens["id_token"], request, client.client_id, google_emulator.certs_url)
    assert "email" not in claims


def test_pkce_verifier_must_match_the_challenge(google_emulator: GoogleEmulator, client: Client) -> None:
    pkce, params = _authorize(google_emulator, client, [READONLY])
    status, body = exchange_code(google_emulator, client, params["code"], Pkce.new().verifier)
    assert (status, body["error"]) == (400, "invalid_grant")
    status, body = exchange_code(google_emulator, client, params["code"], None)  # type: ignore[arg-type]
    assert (status, body["error"], body["error_description"]) == (400, "invalid_grant", "Missing code verifier.")
    # The failed attempts did not burn the code: the right verifier still works.
    assert exchange_code(google_emulator, client, params["code"], pkce.verifier)[0] == 200


def test_a_code_works_once_and_its_replay_revokes_what_it_gave(google_emulator: GoogleEmulator, client: Client) -> None:
    pkce, params = _authorize(google_emulator, client, [READONLY], access_type="offline")
    status, first = exchange_code(google_emulator, client, params["code"], pkce.verifier)
    assert status == 200

    status, body = exchange_code(google_emulator, client, params["code"], pkce.verifier)

    assert (status, body["error"]) == (400, "invalid_grant")
    status, body, _ = post_form(
        google_emulator,
        google_emulator.token_url,
        {
            "grant_type": "refresh_token",
            "refresh_token": first["refresh_token"],
            "client_id": client.client_id,
            "client_secret": client.client_secret,
        },
    )
    assert (status, body["error"]) == (400, "invalid_grant")


def test_redirect_uri_at_the_token_endpoint_must_match(google_emulator: GoogleEmulator, client: Client) -> None:
    pkce, params = _authorize(google_emulator, client, [READONLY])
    status, body = exchange_code(
        google_emulator, client, params["code"], pkce.verifier, redirect_uri=REDIRECT_URI + "/other"
    )
    assert (status, body["error"]) == (400, "redirect_uri_mismatch")


def test_expired_code_is_refused(google_emulator: GoogleEmulator, client: Client) -> None:
    pkce, params = _authorize(google_emulator, client, [READONLY])
    google_emulator.advance_clock(601)
    status, body = exchange_code(google_emulator, client, params["code"], pkce.verifier)
    assert (status, body["error"]) == (400, "invalid_grant")


def test_client_authentication(google_emulator: GoogleEmulator, client: Client) -> None:
    pkce, params = _authorize(google_emulator, client, [READONLY])
    status, body = exchange_code(google_emulator, client, params["code"], pkce.verifier, client_secret="wrong")
    assert (status, body["error"]) == (401, "invalid_client")

    basic = base64.b64encode(f"{client.client_id}:{client.client_secret}".encode()).decode()
    fields = {
        "grant_type": "authorization_code",
        "code": params["code"],
        "redirect_uri": REDIRECT_URI,
        "code_verifier": pkce.verifier,
    }
    both = {**fields, "client_secret": client.client_secret}
    status, body, _ = post_form(google_emulator, google_emulator.token_url, both, {"Authorization": f"Basic {basic}"})
    assert (status, body["error"]) == (400, "invalid_request")
    status, body, headers = post_form(
        google_emulator, google_emulator.token_url, fields, {"Authorization": f"Basic {basic}"}
    )
    assert status == 200 and "access_token" in body
    assert headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": None, "code_challenge_method": None}, "invalid_request"),
        ({"redirect_uri": "https://evil.test/callback"}, "redirect_uri_mismatch"),
        ({"client_id": "unknown.apps.googleusercontent.com"}, "invalid_client"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "https://www.googleapis.com/auth/gmail.everything"}, "invalid_scope"),
        ({"state": None}, "invalid_request"),
        ({"prompt": "none consent"}, "invalid_request"),
    ],
)
def test_authorization_requests_google_refuses(
    google_emulator: GoogleEmulator, client: Client, change: dict[str, str | None], error: str
) -> None:
    from urllib.parse import parse_qs, urlencode, urlsplit

    url = authorization_url(google_emulator, client, [READONLY], Pkce.new())
    params = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    params.update(change)
    url = f"{google_emulator.authorize_url}?{urlencode({k: v for k, v in params.items() if v is not None})}"
    with pytest.raises(AuthorizationRefused) as refused:
        google_emulator.authorize(url, user=USER)
    assert refused.value.error == error


def test_a_browser_without_a_signed_in_user_gets_no_code(google_emulator: GoogleEmulator, client: Client) -> None:
    url = authorization_url(google_emulator, client, [READONLY], Pkce.new())
    response, _ = http(google_emulator).request(url, "GET", redirections=0)
    assert response.status == 200
    assert "location" not in response
    assert google_emulator.counters().get("authorize.granted", 0) == 0


def test_denied_consent_redirects_with_access_denied(google_emulator: GoogleEmulator, client: Client) -> None:
    url = authorization_url(google_emulator, client, [READONLY], Pkce.new())
    params = redirect_params(google_emulator.authorize(url, user=USER, deny=True))
    assert params == {"error": "access_denied", "state": "state-canary"}


def test_unticked_scopes_are_not_granted(google_emulator: GoogleEmulator, client: Client) -> None:
    pkce = Pkce.new()
    url = authorization_url(google_emulator, client, ["openid", READONLY, SEND], pkce)
    params = redirect_params(google_emulator.authorize(url, user=USER, untick={SEND, "openid"}))
    assert params["scope"].split() == ["openid", READONLY]  # openid is not a checkbox: it stays
    status, body = exchange_code(google_emulator, client, params["code"], pkce.verifier)
    assert status == 200 and SEND not in body["scope"].split()


def test_include_granted_scopes_adds_earlier_grants(google_emulator: GoogleEmulator, client: Client) -> None:
    sign_in(google_emulator, client, USER, [READONLY])
    without = sign_in(google_emulator, client, USER, [SEND])
    with_earlier = sign_in(google_emulator, client, USER, [SEND], include_granted_scopes="true")
    assert without["scope"].split() == [SEND]
    assert set(with_earlier["scope"].split()) == {READONLY, SEND}


def test_prompt_none_without_earlier_consent(google_emulator: GoogleEmulator, client: Client) -> None:
    url = authorization_url(google_emulator, client, [READONLY], Pkce.new(), prompt="none")
    assert redirect_params(google_emulator.authorize(url, user=USER))["error"] == "consent_required"
    sign_in(google_emulator, client, USER, [READONLY])
    assert "code" in redirect_params(google_emulator.authorize(url, user=USER))


def test_authorization_request_parameters_are_recorded(google_emulator: GoogleEmulator, client: Client) -> None:
    sign_in(google_emulator, client, USER, [READONLY], prompt="consent", login_hint=USER, include_granted_scopes="true")
    seen = google_emulator.authorization_requests()[-1]
    assert seen["access_type"] == "offline" and seen["prompt"] == "consent"
    assert seen["login_hint"] == USER and seen["include_granted_scopes"] == "true"


def test_google_auth_credentials_refresh(google_emulator: GoogleEmulator, client: Client) -> None:
    tokens = sign_in(google_emulator, client, USER, [READONLY])
    creds = credentials(google_emulator, client, {**tokens, "access_token": None})

    creds.refresh(google_auth_httplib2.Request(http(google_emulator)))

    assert creds.valid and creds.token != tokens["access_token"]
    assert creds.refresh_token == tokens["refresh_token"]  # Google keeps the refresh token by default
    assert google_emulator.counters()["token.refresh_token"] == 1


def test_rotation_switch_invalidates_the_old_refresh_token(google_emulator: GoogleEmulator, client: Client) -> None:
    google_emulator.set_policy(rotate_refresh_tokens=True)
    tokens = sign_in(google_emulator, client, USER, [READONLY])
    creds = credentials(google_emulator, client, tokens)
    request = google_auth_httplib2.Request(http(google_emulator))

    creds.refresh(request)

    assert creds.refresh_token != tokens["refresh_token"]
    stale = credentials(google_emulator, client, tokens)
    with pytest.raises(RefreshError, match="invalid_grant"):
        stale.refresh(request)
    creds.refresh(request)  # the new one works


def test_revoke_ends_the_grant(google_emulator: GoogleEmulator, client: Client) -> None:
    tokens = sign_in(google_emulator, client, USER, ["openid", READONLY])

    status, body, _ = post_form(google_emulator, google_emulator.revoke_url, {"token": tokens["refresh_token"]})

    assert status == 200
    request = google_auth_httplib2.Request(http(google_emulator))
    with pytest.raises(RefreshError, match="invalid_grant"):
        credentials(google_emulator, client, tokens).refresh(request)
    status, body, _ = post_form(google_emulator, google_emulator.revoke_url, {"token": tokens["access_token"]})
    assert (status, body["error"]) == (400, "invalid_token")  # the access token went with the grant
    assert google_emulator.counters()["revoke"] == 2 and google_emulator.counters()["revoke.ok"] == 1


def test_revoke_accepts_the_token_in_the_query(google_emulator: GoogleEmulator, client: Client) -> None:
    tokens = sign_in(google_emulator, client, USER, [READONLY])
    status, _, _ = post_form(google_emulator, f"{google_emulator.revoke_url}?token={tokens['access_token']}", {})
    assert status == 200
    assert google_emulator.granted_scopes(USER, client.client_id) == set()


def test_revoke_of_an_unknown_token(google_emulator: GoogleEmulator, client: Client) -> None:
    status, body, _ = post_form(google_emulator, google_emulator.revoke_url, {"token": "ya29.not-a-token"})
    assert (status, body["error"]) == (400, "invalid_token")


def test_user_revocation_and_injected_token_faults(google_emulator: GoogleEmulator, client: Client) -> None:
    tokens = sign_in(google_emulator, client, USER, [READONLY])
    request = google_auth_httplib2.Request(http(google_emulator))
    # (google-auth retries 5xx and temporarily_unavailable by itself, with back-off: a 400 is not retried.)
    google_emulator.fail_next_token_requests(status=400, error="invalid_grant", description="Bad Request")
    with pytest.raises(RefreshError, match="invalid_grant"):
        credentials(google_emulator, client, tokens).refresh(request)
    credentials(google_emulator, client, tokens).refresh(request)  # only the next one failed

    assert google_emulator.revoke_user(USER) == 1

    with pytest.raises(RefreshError, match="invalid_grant"):
        credentials(google_emulator, client, tokens).refresh(request)


def test_refresh_may_narrow_but_not_widen_scopes(google_emulator: GoogleEmulator, client: Client) -> None:
    tokens = sign_in(google_emulator, client, USER, [READONLY, METADATA])
    fields = {
        "grant_type": "refresh_token",
        "refresh_token": tokens["refresh_token"],
        "client_id": client.client_id,
        "client_secret": client.client_secret,
    }
    status, body, _ = post_form(google_emulator, google_emulator.token_url, {**fields, "scope": READONLY})
    assert (status, body["scope"]) == (200, READONLY)
    status, body, _ = post_form(google_emulator, google_emulator.token_url, {**fields, "scope": f"{READONLY} {SEND}"})
    assert (status, body["error"]) == (400, "invalid_scope")


def test_userinfo(google_emulator: GoogleEmulator, client: Client) -> None:
    import json

    tokens = sign_in(google_emulator, client, USER, ["openid", "email"])
    response, content = http(google_emulator).request(
        google_emulator.userinfo_url, headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert response.status == 200
    assert json.loads(content) == {"sub": google_emulator.state.users[USER].sub, "email": USER, "email_verified": True}
    response, _ = http(google_emulator).request(google_emulator.userinfo_url, headers={"Authorization": "Bearer x"})
    assert response.status == 401
