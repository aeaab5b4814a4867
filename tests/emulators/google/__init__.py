"""A local Google for tests: OAuth 2.0 / OpenID Connect and the Gmail REST subset the broker uses, over HTTPS.

Written from Google's documentation (OAuth 2.0 for Web Server Applications, OpenID Connect, the Gmail API
reference and its discovery document); it refuses what Google refuses. See :class:`GoogleEmulator` for the
control API and ``fixtures.py`` for the pytest fixture (``google_emulator``, one emulator per test)::

    google = google_emulator                                # https://127.0.0.1:<port>, CA at google.ca_path
    client = google.register_client([redirect_uri])         # .client_id, .client_secret (fakes)
    google.add_user("alice@example.test")
    location = google.authorize(url, user="alice@example.test", untick={...}, deny=False)
    google.deliver("alice@example.test", raw_bytes, ["INBOX", "UNREAD"])  # -> Delivered(id, thread_id, history_id)

Endpoints: authorize_url, token_url, revoke_url, certs_url (JWK Set), certs_v1_url (PEM), userinfo_url,
openid_configuration_url, batch_url; Gmail: ``client_options()`` == {"api_endpoint": gmail_api_endpoint}.
``flows.py`` does the client side by hand (PKCE, code exchange, googleapiclient wiring) for tests.
"""

from tests.emulators.google.server import AuthorizationRefused, Delivered, GoogleEmulator
from tests.emulators.google.state import Client, Policy, SeenRequest, SentMessage, User

__all__ = [
    "AuthorizationRefused",
    "Client",
    "Delivered",
    "GoogleEmulator",
    "Policy",
    "SeenRequest",
    "SentMessage",
    "User",
]
