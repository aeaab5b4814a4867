"""The driver conformance suite: one set of behavioural tests that every mail provider driver passes.

The tests talk to a driver only through the ``MailDriver`` Protocol (server.providers.base) and to the provider's
test environment only through a :class:`tests.conformance.backends.Backend`; each test runs once per backend.
"""
