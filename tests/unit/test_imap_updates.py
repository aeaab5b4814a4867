"""ImapSession.take_updates: the server's EXISTS/EXPUNGE/FETCH reports, in order, keep the message count right and
tell a read by UID that its message was expunged by another session (GetMessage sends no NOOP first)."""

from __future__ import annotations

import imaplib
from typing import Any

from server.providers.imap.pool import ImapSession


class NoConnection:
    pass


def session(exists: int, updates: list[tuple[str, int]]) -> ImapSession:
    made = ImapSession(NoConnection())  # type: ignore[arg-type]
    made.exists = exists
    made.updates.extend(updates)
    return made


def test_counts_follow_the_reports_in_order() -> None:
    s = session(5, [("EXPUNGE", 2), ("EXISTS", 7), ("EXPUNGE", 1)])
    assert not s.take_updates()
    assert s.exists == 6
    assert s.updates == []


def test_the_fetched_message_expunged_after_its_fetch_is_gone() -> None:
    assert session(5, [("FETCH", 3), ("EXPUNGE", 3)]).take_updates(follow=3)


def test_earlier_expunges_renumber_the_fetched_message() -> None:
    # "* 1 EXPUNGE" makes message 3 number 2; then "* 2 EXPUNGE" removes it.
    assert session(5, [("FETCH", 3), ("EXPUNGE", 1), ("EXPUNGE", 2)]).take_updates(follow=3)
    # "* 4 EXPUNGE" is a later message; "* 1 EXPUNGE" renumbers ours to 2, and "* 3 EXPUNGE" is another one.
    assert not session(5, [("FETCH", 3), ("EXPUNGE", 4), ("EXPUNGE", 1), ("EXPUNGE", 3)]).take_updates(follow=3)


def test_expunges_before_the_fetch_are_already_in_its_number() -> None:
    assert not session(5, [("EXPUNGE", 3), ("FETCH", 3)]).take_updates(follow=3)


def test_a_real_connection_reports_in_arrival_order() -> None:
    class Imap(imaplib.IMAP4):
        def __init__(self) -> None:  # no socket: only the untagged-response bookkeeping is exercised
            self.untagged_responses: dict[str, Any] = {}
            self.debug = 0

    class Client:
        _imap = Imap()

    made = ImapSession(Client())  # type: ignore[arg-type]
    imap = Client._imap
    imap._append_untagged("EXISTS", b"4")
    imap._append_untagged("FETCH", (b"2 (UID 9 BODY[HEADER] {10}", b"0123456789"))
    imap._append_untagged("FETCH", b")")
    imap._append_untagged("EXPUNGE", b"2")
    assert made.updates == [("EXISTS", 4), ("FETCH", 2), ("EXPUNGE", 2)]
    assert imap.untagged_responses["EXISTS"] == [b"4"]  # imaplib still sees everything (SELECT reads EXISTS there)
    assert made.take_updates(follow=2)
    assert made.exists == 3
