"""pytest fixtures for the Microsoft emulator. To use them in a directory of tests, import them in its conftest.py::

from tests.emulators.microsoft.fixtures import microsoft_emulator  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.emulators.microsoft.server import MicrosoftEmulator


@pytest.fixture
def microsoft_emulator(tmp_path: Path) -> Iterator[MicrosoftEmulator]:
    """A fresh emulator per test (its own CA, keys, tenant, apps, users and clock). Fails the test if the emulator
    itself broke while serving it (as opposed to answering with a Microsoft error on purpose)."""
    with MicrosoftEmulator(tmp_path / "microsoft-emulator") as emulator:
        yield emulator
    assert not emulator.internal_errors(), emulator.internal_errors()[0]
