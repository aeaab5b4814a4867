"""Benchmarks of the broker: figures printed as a table with their targets (``python -m bench``), never timed tests.

Modules: harness (Dovecot, the broker in its own process, clients), imap_reads and imap_feeds (the figures),
report (table and JSON), stats, proc (/proc readers), profiling (py-spy), messages (what the figures read).
"""
