"""A local Google for tests: OAuth 2.0 / OpenID Connect and the Gmail REST subset the broker uses, over HTTPS.

Written from Google's documentation (OAuth 2.0 for Web Server Applications, OpenID Connect, the Gmail API
reference and its discovery document); it refuses what Google refuses. See :class:`GoogleEmulator` for the
control API and ``fixtures.py`` for the pytest fixture.
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
