"""The request and response values the handlers take and return: the Google emulator's, which carry nothing
provider-specific."""

from tests.emulators.google.wire import Request, Response

__all__ = ["Request", "Response"]
