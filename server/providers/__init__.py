"""The mail provider drivers. Importing the package puts the filters on the client libraries' loggers that keep
provider response text out of log lines (:mod:`server.providers.library_logs`)."""

from server.providers import library_logs as library_logs
