"""The emulator's identity platform, driven by the real msal the way the broker drives Microsoft's."""

from __future__ import annotations

import base64
import json
import warnings
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest

from tests.emulators.microsoft import App, AuthorizationRefused, MicrosoftEmulator, fixtures
from tests.emulators.microsoft.flows import REDIRECT_URI, graph, msal_app, sign_in

microsoft_emulator = fixtures.microsoft_emulator
USER = "alice@contoso.test"
READ = ["Mail.Read", "email"]


@pytest.fixture
def app(microsoft_emulator: MicrosoftEmulator) -> App:
    microsoft_emulator.add_user(USER, display_name="Alice Liddell")
    return microsoft_emulator.register_app([REDIRECT_URI])


def _claims(ms: MicrosoftEmulator, app: App, id_token: str) -> dict[str, Any]:
    keys = ms.session().get(ms.jwks_url()).json()
    key = jwt.PyJWK(keys["keys"][0])
    return jwt.decode(id_token, key.key, algorithms=["RS256"], audience=app.client_id, issuer=ms.issuer(ms.tenant_id))


def test_discovery_documents_the_authority_as_microsoft_does(microsoft_emulator: MicrosoftEmulator) -> None:
    ms = microsoft_emulator
    session = ms.session()
    common = session.get(ms.openid_configuration_url("common")).json()
    assert common["issuer"] == f"{ms.base_url}/{{tenantid}}/v2.0"  # the documented template
    assert common["token_endpoint"] == ms.token_url("common")
    assert common["authorization_endpoint"] == ms.authorize_url("common")
    assert common["jwks_uri"] == ms.jwks_url("common")
    own = session.get(ms.openid_configuration_url(ms.tenant_id)).json()
    assert own["issuer"] == ms.issuer(ms.tenant_id)
    unknown = session.get(ms.openid_configuration_url("nosuchtenant.example"))
    assert unknown.status_code == 400
    assert (unknown.json()["error"], unknown.json()["error_codes"]) == ("invalid_tenant", [90002])
    jwk = session.get(ms.jwks_url()).json()["keys"][0]
    assert jwk["kid"] == jwk["x5t"] and jwk["kty"] == "RSA" and jwk["x5c"]


@pytest.mark.parametrize("validate_authority", [True, False])
@pytest.mark.parametrize("tenant", ["common", "organizations", "tenant-id"])
def test_msal_signs_in_and_refresh_tokens_rotate(
    microsoft_emulator: MicrosoftEmulator, app: App, validate_authority: bool, tenant: str
) -> None:
    ms = microsoft_emulator
    cca = msal_app(ms, app, ms.tenant_id if tenant == "tenant-id" else tenant, validate_authority=validate_authority)

    first = sign_in(ms, app, USER, READ, cca=cca)

    assert "error" not in first, first.get("error_description")
    assert set(first["scope"].split()) == {"Mail.Read", "openid", "profile", "email"}
    claims = _claims(ms, app, first["id_token"])
    user = ms.state.users[USER]
    assert (claims["oid"], claims["tid"]) == (user.oid, ms.tenant_id)
    assert claims["preferred_username"] == USER and claims["email"] == USER
    assert claims["sub"] != user.oid  # pairwise per app
    assert first["id_token_claims"]["nonce"] == claims["nonce"]

    second = cca.acquire_token_by_refresh_token(first["refresh_token"], ["Mail.Read"])
    assert "error" not in second, second.get("error_description")
    assert second["refresh_token"] != first["refresh_token"]  # rotated on every use
    # "The Microsoft identity platform doesn't revoke old refresh tokens when used to fetch new access tokens."
    third = cca.acquire_token_by_refresh_token(first["refresh_token"], ["Mail.Read"])
    assert "error" not in third
    counters = ms.counters()
    assert counters["token.authorization_code"] == 1 and counters["token.refresh_token"] == 2
    assert counters.get("discovery.instance", 0) == 0
    assert all(r.path.startswith(("/common", "/organizations", f"/{ms.tenant_id}")) for r in ms.requests())


def test_msal_with_the_emulators_instance_discovery(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    cca = msal_app(microsoft_emulator, app, instance_discovery=microsoft_emulator.instance_discovery_url)
    result = sign_in(microsoft_emulator, app, USER, READ, cca=cca)
    assert "access_token" in result, result.get("error_description")
    assert microsoft_emulator.counters()["discovery.instance"] == 1


def test_response_mode_query_redirects_with_the_code(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    cca = msal_app(microsoft_emulator, app)
    with pytest.warns(UserWarning, match="form_post"):  # msal's own advice; the platform accepts query
        flow = cca.initiate_auth_code_flow(READ, redirect_uri=REDIRECT_URI)
    location = microsoft_emulator.authorize(flow["auth_uri"], user=USER)
    params = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    assert set(params) >= {"code", "state", "session_state"} and "scope" not in params
    assert "access_token" in cca.acquire_token_by_auth_code_flow(flow, params)


def test_old_refresh_tokens_end_when_the_policy_says(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    microsoft_emulator.set_policy(rotated_refresh_token_lifetime=60)
    cca = msal_app(microsoft_emulator, app)
    first = sign_in(microsoft_emulator, app, USER, READ, cca=cca)
    second = cca.acquire_token_by_refresh_token(first["refresh_token"], ["Mail.Read"])
    microsoft_emulator.advance_clock(61)
    old = cca.acquire_token_by_refresh_token(first["refresh_token"], ["Mail.Read"])
    assert (old["error"], old["error_codes"]) == ("invalid_grant", [700082])
    assert "access_token" in cca.acquire_token_by_refresh_token(second["refresh_token"], ["Mail.Read"])


def test_refresh_tokens_expire_after_90_days_unused(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    cca = msal_app(microsoft_emulator, app)
    first = sign_in(microsoft_emulator, app, USER, READ, cca=cca)
    microsoft_emulator.advance_clock(90 * 24 * 3600 + 1)
    result = cca.acquire_token_by_refresh_token(first["refresh_token"], ["Mail.Read"])
    assert (result["error"], result["error_codes"]) == ("invalid_grant", [700082])


def test_revoked_consent_fails_every_refresh_token(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    cca = msal_app(microsoft_emulator, app)
    first = sign_in(microsoft_emulator, app, USER, READ, cca=cca)
    second = cca.acquire_token_by_refresh_token(first["refresh_token"], ["Mail.Read"])

    assert microsoft_emulator.revoke_consent(USER, app.client_id) == 1

    for refresh_token in (first["refresh_token"], second["refresh_token"]):
        result = cca.acquire_token_by_refresh_token(refresh_token, ["Mail.Read"])
        assert (result["error"], result["error_codes"], result["suberror"]) == (
            "invalid_grant",
            [65001],
            "consent_required",
        )
    # Access tokens are self-contained at Microsoft: the one issued stays good until it expires.
    assert graph(microsoft_emulator, second["access_token"]).get(microsoft_emulator.graph_url + "/me/mailFolders").ok


def test_revoked_sessions_and_required_interaction(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    cca = msal_app(microsoft_emulator, app)
    tokens = sign_in(microsoft_emulator, app, USER, READ, cca=cca)
    microsoft_emulator.require_interaction(USER)
    result = cca.acquire_token_by_refresh_token(tokens["refresh_token"], ["Mail.Read"])
    assert (result["error"], result["error_codes"]) == ("interaction_required", [50076])
    tokens = sign_in(microsoft_emulator, app, USER, READ, cca=cca)  # signing in again clears it
    assert "access_token" in cca.acquire_token_by_refresh_token(tokens["refresh_token"], ["Mail.Read"])
    microsoft_emulator.revoke_sessions(USER)
    result = cca.acquire_token_by_refresh_token(tokens["refresh_token"], ["Mail.Read"])
    assert (result["error"], result["error_codes"]) == ("invalid_grant", [50173])


def test_partial_consent_grants_only_what_was_left_ticked(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    cca = msal_app(microsoft_emulator, app)
    tokens = sign_in(microsoft_emulator, app, USER, ["Mail.Read", "Mail.Send", "email"], untick={"Mail.Send"}, cca=cca)

    assert set(tokens["scope"].split()) == {"Mail.Read", "openid", "profile", "email"}
    sent = graph(microsoft_emulator, tokens["access_token"]).post(
        microsoft_emulator.graph_url + "/me/sendMail", json={"message": {"toRecipients": []}}
    )
    assert (sent.status_code, sent.json()["error"]["code"]) == (403, "ErrorAccessDenied")
    asked_more = cca.acquire_token_by_refresh_token(tokens["refresh_token"], ["Mail.Read", "Mail.Send"])
    assert (asked_more["error"], asked_more["error_codes"]) == ("invalid_grant", [65001])
    assert "access_token" in cca.acquire_token_by_refresh_token(tokens["refresh_token"], ["Mail.Read"])

    # Incremental consent: a later sign-in for Mail.Send adds it; tokens then carry both.
    more = sign_in(microsoft_emulator, app, USER, ["Mail.Send"], cca=cca)
    assert set(more["scope"].split()) >= {"Mail.Read", "Mail.Send"}


def test_url_style_scopes_and_no_email_without_the_email_scope(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    microsoft_emulator.set_policy(scope_style="url")
    tokens = sign_in(microsoft_emulator, app, USER, ["https://graph.microsoft.com/mail.read"])
    assert set(tokens["scope"].split()) == {"https://graph.microsoft.com/Mail.Read", "openid", "profile"}
    assert "email" not in _claims(microsoft_emulator, app, tokens["id_token"])


def test_declined_consent_comes_back_as_access_denied(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    cca = msal_app(microsoft_emulator, app)
    flow = cca.initiate_auth_code_flow(READ, redirect_uri=REDIRECT_URI, response_mode="form_post")
    _, fields = microsoft_emulator.authorize_form_post(flow["auth_uri"], user=USER, deny=True)
    assert fields["error"] == "access_denied" and fields["error_description"].startswith("AADSTS65004")
    result = cca.acquire_token_by_auth_code_flow(flow, fields)
    assert result["error"] == "access_denied"
    assert microsoft_emulator.counters().get("token.authorization_code", 0) == 0


def test_the_authorize_endpoint_refuses_unknown_apps_and_redirects(
    microsoft_emulator: MicrosoftEmulator, app: App
) -> None:
    cca = msal_app(microsoft_emulator, app)
    flow = cca.initiate_auth_code_flow(READ, redirect_uri="https://evil.test/cb", response_mode="form_post")
    with pytest.raises(AuthorizationRefused, match="AADSTS50011"):
        microsoft_emulator.authorize_form_post(flow["auth_uri"], user=USER)
    other = microsoft_emulator.register_app([REDIRECT_URI])
    stranger = msal_app(microsoft_emulator, other)
    flow = stranger.initiate_auth_code_flow(READ, redirect_uri=REDIRECT_URI, response_mode="form_post")
    with microsoft_emulator.state.lock:
        del microsoft_emulator.state.apps[other.client_id]
    with pytest.raises(AuthorizationRefused, match="AADSTS700016"):
        microsoft_emulator.authorize_form_post(flow["auth_uri"], user=USER)


def _token_post(ms: MicrosoftEmulator, fields: dict[str, str]) -> tuple[int, dict[str, Any]]:
    response = ms.session().post(ms.token_url(), data=fields)
    return response.status_code, response.json()


def test_code_exchange_checks_pkce_secret_and_single_use(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    ms = microsoft_emulator
    cca = msal_app(ms, app)
    flow = cca.initiate_auth_code_flow(READ, redirect_uri=REDIRECT_URI, response_mode="form_post")
    _, fields = ms.authorize_form_post(flow["auth_uri"], user=USER)
    exchange = {
        "grant_type": "authorization_code",
        "code": fields["code"],
        "redirect_uri": REDIRECT_URI,
        "client_id": app.client_id,
        "client_secret": app.client_secret,
        "code_verifier": "x" * 43,
    }
    status, body = _token_post(ms, exchange)
    assert (status, body["error"], body["error_codes"]) == (400, "invalid_grant", [501481])
    status, body = _token_post(ms, {**exchange, "client_secret": "wrong", "code_verifier": flow["code_verifier"]})
    assert (status, body["error"], body["error_codes"]) == (401, "invalid_client", [7000215])
    status, body = _token_post(ms, {**exchange, "code_verifier": flow["code_verifier"]})
    assert status == 200 and body["token_type"] == "Bearer" and body["expires_in"] > 3000
    status, body = _token_post(ms, {**exchange, "code_verifier": flow["code_verifier"]})
    assert (status, body["error"], body["error_codes"]) == (400, "invalid_grant", [54005])


def test_client_info_names_the_user(microsoft_emulator: MicrosoftEmulator, app: App) -> None:
    tokens = sign_in(microsoft_emulator, app, USER, READ)
    info = json.loads(base64.urlsafe_b64decode(tokens["client_info"] + "=="))
    user = microsoft_emulator.state.users[USER]
    assert info == {"uid": user.oid, "utid": user.tenant_id}


def test_a_user_of_another_tenant_cannot_use_a_tenant_authority(
    microsoft_emulator: MicrosoftEmulator, app: App
) -> None:
    other = microsoft_emulator.add_tenant("fabrikam.test")
    microsoft_emulator.add_user("bob@fabrikam.test", tenant_id=other)
    cca = msal_app(microsoft_emulator, app, microsoft_emulator.tenant_id)
    flow = cca.initiate_auth_code_flow(READ, redirect_uri=REDIRECT_URI, response_mode="form_post")
    with pytest.raises(AuthorizationRefused, match="AADSTS50020"):
        microsoft_emulator.authorize_form_post(flow["auth_uri"], user="bob@fabrikam.test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokens = sign_in(microsoft_emulator, app, "bob@fabrikam.test", READ)  # common takes every tenant
    assert tokens["id_token_claims"]["tid"] == other
