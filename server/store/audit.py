"""The hash-chained audit log: each event's digest covers its fields and the digest of the event before it.

``digest = SHA-256(canonical JSON of sequence, event_id, event_time, action, tenant, actor, account_id, details,
previous_digest)``, canonical meaning sorted keys, no whitespace, ASCII only; the first event's previous digest is
64 zeros. Editing, deleting, reordering or inserting a row breaks the chain at or just after that row.

Sequences run from 1 without gaps, so a deleted or inserted row also shows as a sequence out of place.

A plain hash chain is tamper-evident, not tamper-proof: someone who can write the database can rewrite the whole
tail consistently, and dropping the newest rows leaves a valid chain. :mod:`server.store.audit_anchor` closes
that gap as far as a single host can: the broker records the head (sequence, digest) under a keyed MAC in a file
outside the database after every append, and ``mailbroker audit verify`` checks the chain against it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, select, text
from sqlalchemy.engine import Connection

from server.domain.models import AuditEvent
from server.store.schema import audit_events

GENESIS_DIGEST = "0" * 64
# PostgreSQL advisory lock key serialising audit appends across replicas ("mbaudit" as a 64-bit integer).
AUDIT_APPEND_LOCK = int.from_bytes(b"mbaudit\0", "big") >> 1


def append_event(
    connection: Connection,
    *,
    event_id: str,
    event_time: datetime,
    action: str,
    tenant: str,
    actor: str,
    account_id: str,
    details: Mapping[str, object],
) -> AuditEvent:
    """Chain a new event onto the newest one, inside the caller's transaction, and return it.

    Appends are serialised: SQLite's write lock does it within one file; on PostgreSQL, where several replicas
    append at once under READ COMMITTED, a transaction-scoped advisory lock does (the sequence primary key would
    otherwise turn the race into a failed insert, never into a fork).
    """
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": AUDIT_APPEND_LOCK})
    newest = connection.execute(
        select(audit_events.c.sequence, audit_events.c.digest).order_by(audit_events.c.sequence.desc()).limit(1)
    ).one_or_none()
    sequence, previous_digest = (1, GENESIS_DIGEST) if newest is None else (newest.sequence + 1, newest.digest)
    event = AuditEvent(
        sequence=sequence,
        event_id=event_id,
        event_time=event_time.astimezone(UTC),
        action=action,
        tenant=tenant,
        actor=actor,
        account_id=account_id,
        details=json.loads(_canonical(dict(details))),  # a private copy, exactly as it will read back
        previous_digest=previous_digest,
    )
    event = dataclasses.replace(event, digest=event_digest(event))
    connection.execute(
        audit_events.insert().values(
            sequence=event.sequence,
            event_id=event.event_id,
            event_time=event.event_time,
            action=event.action,
            tenant=event.tenant,
            actor=event.actor,
            account_id=event.account_id,
            details=_canonical(event.details),
            previous_digest=event.previous_digest,
            digest=event.digest,
        )
    )
    return event


def list_events(
    connection: Connection, tenant: str | None, account_id: str | None, page_size: int, after_sequence: int | None
) -> list[AuditEvent]:
    """Return up to ``page_size`` events after ``after_sequence`` in chain order, optionally of one tenant/account."""
    query = select(audit_events).order_by(audit_events.c.sequence).limit(page_size)
    if tenant is not None:
        query = query.where(audit_events.c.tenant == tenant)
    if account_id is not None:
        query = query.where(audit_events.c.account_id == account_id)
    if after_sequence is not None:
        query = query.where(audit_events.c.sequence > after_sequence)
    return [_event_from_row(row) for row in connection.execute(query)]


@dataclass(frozen=True)
class ChainHead:
    """The newest event of the chain: its sequence and digest (0 and the genesis digest for an empty log)."""

    sequence: int
    digest: str


@dataclass(frozen=True)
class ChainBreak:
    """The first place the log does not check out: the event there (when there is one) and what is wrong."""

    sequence: int | None
    event_id: str
    problem: str


def verify_chain(connection: Connection) -> tuple[ChainHead, ChainBreak | None]:
    """Walk the whole chain in order; return its head and the first broken link (None if every link holds)."""
    expected_sequence, expected_previous = 1, GENESIS_DIGEST
    query = select(audit_events).order_by(audit_events.c.sequence)
    with connection.execution_options(yield_per=1000).execute(query) as rows:  # closes a server-side cursor early
        for row in rows:
            broken = _check_row(row, expected_sequence, expected_previous)
            if broken is not None:
                head = ChainHead(expected_sequence - 1, expected_previous)
                return head, ChainBreak(row.sequence, row.event_id, broken)
            expected_sequence, expected_previous = row.sequence + 1, row.digest
    return ChainHead(expected_sequence - 1, expected_previous), None


def _check_row(row: Row[Any], expected_sequence: int, expected_previous: str) -> str | None:
    if row.sequence != expected_sequence:
        return (
            f"sequence {row.sequence} where {expected_sequence} was expected: events were deleted or inserted"
            if row.sequence > expected_sequence
            else f"sequence {row.sequence} out of order"
        )
    if row.previous_digest != expected_previous:
        what = "the genesis digest" if expected_sequence == 1 else f"the digest of event {expected_sequence - 1}"
        return f"previous_digest is not {what}: an event before it was edited, deleted, inserted or reordered"
    try:
        event = _event_from_row(row)
    except ValueError:
        return "details are not a JSON object: the event was edited"
    if row.details != _canonical(event.details):
        return "details are not in canonical form: the event was edited"
    if event.digest != event_digest(event):
        return "digest does not match the event's content: the event was edited"
    return None


def first_broken_link(connection: Connection) -> int | None:
    """Return the sequence of the first event whose digest or link does not check out, or None if all do."""
    _, broken = verify_chain(connection)
    return None if broken is None else broken.sequence


def event_digest(event: AuditEvent) -> str:
    """Return the hex SHA-256 of the event's canonical encoding (every field but ``digest``)."""
    document = {
        "sequence": event.sequence,
        "event_id": event.event_id,
        "event_time": event.event_time.astimezone(UTC).isoformat(timespec="microseconds"),
        "action": event.action,
        "tenant": event.tenant,
        "actor": event.actor,
        "account_id": event.account_id,
        "details": event.details,
        "previous_digest": event.previous_digest,
    }
    return hashlib.sha256(_canonical(document).encode("ascii")).hexdigest()


def _canonical(value: Mapping[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _event_from_row(row: Row[Any]) -> AuditEvent:
    details = json.loads(row.details)
    if not isinstance(details, dict):
        raise ValueError("audit details are not a JSON object")
    return AuditEvent(
        sequence=row.sequence,
        event_id=row.event_id,
        event_time=row.event_time,
        action=row.action,
        tenant=row.tenant,
        actor=row.actor,
        account_id=row.account_id,
        details=details,
        previous_digest=row.previous_digest,
        digest=row.digest,
    )
