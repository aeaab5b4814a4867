"""The mail users that the test Dovecot and the test submission server both authenticate."""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable, Iterator


class MailUsers:
    """A thread-safe table of address -> password, shared by Dovecot's passwd-file and the SMTP server's AUTH.

    Addresses are compared without regard to case, as Dovecot does (its ``auth_username_format`` is ``%Lu``) and
    the table keeps them lowercased. Listeners (Dovecot rewriting its passwd-file) are told of every change while the
    table's lock is held, so the file always matches the table, whichever thread changed it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._passwords: dict[str, str] = {}
        self._listeners: list[Callable[[dict[str, str]], None]] = []

    def add(self, address: str, password: str) -> None:
        """Add a user, or change the password of an existing one."""
        _check_field("address", address)
        _check_field("password", password)
        with self._lock:
            self._passwords[address.lower()] = password
            self._notify()

    def remove(self, address: str) -> None:
        """Remove a user (a missing one is fine); their mail stays where it is."""
        with self._lock:
            if self._passwords.pop(address.lower(), None) is not None:
                self._notify()

    def check(self, address: str, password: str) -> bool:
        """Return True if ``address`` is a user whose password is ``password`` (compared in constant time)."""
        with self._lock:
            expected = self._passwords.get(address.lower())
        if expected is None:
            return False
        return hmac.compare_digest(expected.encode(), password.encode())

    def password(self, address: str) -> str | None:
        """Return the password of ``address`` (None if no such user), for harness code that acts as the user."""
        with self._lock:
            return self._passwords.get(address.lower())

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        with self._lock:
            return address.lower() in self._passwords

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._passwords))

    def __len__(self) -> int:
        with self._lock:
            return len(self._passwords)

    def subscribe(self, listener: Callable[[dict[str, str]], None]) -> None:
        """Call ``listener`` with a copy of the whole table now and after every change."""
        with self._lock:
            self._listeners.append(listener)
            listener(dict(self._passwords))

    def unsubscribe(self, listener: Callable[[dict[str, str]], None]) -> None:
        """Stop calling ``listener``."""
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _notify(self) -> None:
        snapshot = dict(self._passwords)
        for listener in self._listeners:
            listener(snapshot)


def _check_field(name: str, value: str) -> None:
    # Both end up as fields of a passwd-file line (and the address as a directory name): a colon, a line break or a
    # slash would corrupt the file or escape the mail directory.
    if not value or any(char in value for char in ":\n\r\0"):
        raise ValueError(f"invalid {name} for a test mail user")
    if name == "address" and ("/" in value or "@" not in value or value.startswith(".")):
        raise ValueError("a test mail user's address must be local@domain, without '/' and not starting with '.'")
