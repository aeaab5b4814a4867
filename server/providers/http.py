"""requests sessions for the OAuth providers (Google, the Microsoft identity platform, Graph): one per thread, the
configured CA only, nothing from the environment, a default timeout, all closed together."""

from __future__ import annotations

import threading
from typing import Any

import requests


class Session(requests.Session):
    """A session with a default timeout, whose own ``verify`` (the configured CA file) wins over REQUESTS_CA_BUNDLE
    (plain requests lets the environment override ``Session.verify``, psf/requests#3829)."""

    def __init__(self, verify: str | bool, timeout: float) -> None:
        super().__init__()
        # Not from the environment: a proxy variable would route tokens through a proxy, a netrc file would add
        # credentials of its own.
        self.trust_env = False
        self.verify = verify
        self._timeout = timeout

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._timeout
        return super().request(*args, **kwargs)

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> dict[str, Any]:
        settings: dict[str, Any] = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None and self.verify is not True:
            settings["verify"] = self.verify
        return settings


class ThreadSessions:
    """One :class:`Session` per thread (sessions are not documented as thread-safe), reused so their TLS connections
    are kept, and every one of them closed by :meth:`close`. Also msal's ``http_client`` (``get`` and ``post``)."""

    def __init__(self, verify: str | bool, timeout: float) -> None:
        self._verify = verify
        self._timeout = timeout
        self._local = threading.local()
        self._sessions: list[Session] = []
        self._lock = threading.Lock()

    def session(self) -> Session:
        session: Session | None = getattr(self._local, "session", None)
        if session is None:
            session = Session(self._verify, self._timeout)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self.session().get(url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        return self.session().post(url, **kwargs)

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
            # Threads that still hold one make a new one next time.
            self._local = threading.local()
        for session in sessions:
            session.close()
