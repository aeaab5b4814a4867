"""pytest fixtures for the Google emulator. To use them in a directory of tests, import them in its conftest.py::

from tests.emulators.google.fixtures import google_emulator  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.emulators.google.server import GoogleEmulator


@pytest.fixture
def google_emulator(tmp_path: Path) -> Iterator[GoogleEmulator]:
    """A fresh emulator per test (its own CA, keys, clients, users and clock). Fails the test if the emulator
    itself broke while serving it (as opposed to answering with a Google error on purpose)."""
    with GoogleEmulator(tmp_path / "google-emulator") as emulator:
        yield emulator
    assert not emulator.internal_errors(), emulator.internal_errors()[0]
