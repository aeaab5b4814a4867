from tests.emulators.google.fixtures import google_emulator  # noqa: F401
