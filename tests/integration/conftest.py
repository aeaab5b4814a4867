from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.broker import RunningBroker, broker_config, running_broker
from tests.mailserver.fixtures import mail_servers, mail_servers_allowing_plaintext, mailbox  # noqa: F401
from tests.pki import TestPki, make_test_pki


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return make_test_pki(tmp_path)


@pytest.fixture
async def broker(tmp_path: Path, pki: TestPki) -> AsyncIterator[RunningBroker]:
    async with running_broker(broker_config(tmp_path, pki), pki) as running:
        yield running
