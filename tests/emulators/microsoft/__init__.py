"""A local Microsoft for tests: the identity platform (v2.0, OpenID Connect) and the Microsoft Graph v1.0 mail subset
the broker uses, over HTTPS on 127.0.0.1.

Written from Microsoft's documentation (identity platform: auth code flow with PKCE, refresh tokens, ID token claims,
OpenID Connect discovery, scopes and permissions, AADSTS error codes; Graph v1.0: user, mailFolder, message,
attachment, sendMail, message delta, errors, throttling); it refuses what Microsoft refuses. The real msal works
against it unmodified with ``instance_discovery=False`` (validate_authority on or off) or with
``instance_discovery=emulator.instance_discovery_url``. See :class:`MicrosoftEmulator` for the control API and
``fixtures.py`` for the pytest fixture (``microsoft_emulator``, one emulator per test)::

    ms = microsoft_emulator                                   # https://127.0.0.1:<port>, CA at ms.ca_path
    app = ms.register_app([redirect_uri])                     # .client_id, .client_secret
    ms.add_user("alice@contoso.test")                         # mailbox with the well-known folders
    cca = msal.ConfidentialClientApplication(app.client_id, client_credential=app.client_secret,
                                             authority=ms.authority("common"), instance_discovery=False,
                                             http_client=ms.session())
    flow = cca.initiate_auth_code_flow(["Mail.Read", "email"], redirect_uri=redirect_uri)
    location = ms.authorize(flow["auth_uri"], user="alice@contoso.test", untick={"Mail.Send"}, deny=False)
    ms.deliver("alice@contoso.test", raw_bytes, "inbox")      # -> Delivered(id, immutable_id, folder_id)
    requests to ms.graph_url + "/me/mailFolders/inbox/messages" with the access token

Endpoints: authority(tenant), openid_configuration_url(tenant), jwks_url(tenant), authorize_url(tenant),
token_url(tenant), instance_discovery_url, graph_url (".../v1.0"), issuer(tenant_id).
"""

from tests.emulators.microsoft.server import AuthorizationRefused, Delivered, MicrosoftEmulator
from tests.emulators.microsoft.state import App, Policy, SeenRequest, SentMessage, User

__all__ = [
    "App",
    "AuthorizationRefused",
    "Delivered",
    "MicrosoftEmulator",
    "Policy",
    "SeenRequest",
    "SentMessage",
    "User",
]
