"""pytest fixtures for the test mail servers. To use them in a directory of tests, import them in its conftest.py::

    from tests.mailserver.fixtures import mail_servers, mail_servers_allowing_plaintext, mailbox  # noqa: F401

(pytest finds fixtures by name, so the import only has to bring them into the conftest's namespace.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.mailserver import Mailbox, MailServers


@pytest.fixture(scope="session")
def mail_servers() -> Iterator[MailServers]:
    """Dovecot and the submission server, started once for the whole session (tests use fresh mailboxes)."""
    with MailServers() as servers:
        yield servers


@pytest.fixture
def mailbox(mail_servers: MailServers) -> Mailbox:
    """A fresh mail user for one test: ``address, password = mailbox``."""
    return mail_servers.new_mailbox()


@pytest.fixture(scope="session")
def mail_servers_allowing_plaintext() -> Iterator[MailServers]:
    """Servers whose Dovecot also accepts a password before STARTTLS (``disable_plaintext_auth = no``)."""
    with MailServers(allow_plaintext_auth=True) as servers:
        yield servers
