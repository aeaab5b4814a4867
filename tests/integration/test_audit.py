"""The audit trail: `mailbroker audit verify` against tampering done on the raw SQLite file, and ListAuditEvents
(paging, filtering, tenancy, no personal data).

Events come from real DeleteAccount calls on a running broker. Canaries only; failure messages never print them.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import resources_pb2 as rpb
from sqlalchemy import select

from server.domain.models import (
    Account,
    AccountProfile,
    AccountState,
    AuditEvent,
    Capability,
    MailServer,
    Provider,
    TransportSecurity,
)
from server.store.audit import event_digest
from server.store.ids import new_account_id
from server.store.schema import audit_events
from tests.broker import RunningBroker, broker_config, error_reason, running_broker, seed_account, stubs
from tests.integration import operator_cli
from tests.pki import TestPki

EVENTS = 5


async def _erase_accounts(broker: RunningBroker, count: int, client: object = None) -> list[str]:
    """Seed ``count`` accounts for the client (alice by default), DeleteAccount each; return their ids in order."""
    who = client or broker.pki.alice
    store = broker.store()
    ids = [seed_account(store, who.identity).id for _ in range(count)]  # type: ignore[attr-defined]
    async with broker.channel(who) as channel:  # type: ignore[arg-type]
        accounts, _ = stubs(channel)
        for account_id in ids:
            await accounts.DeleteAccount(apb.DeleteAccountRequest(name=f"accounts/{account_id}"), timeout=10)
    return ids


@pytest.fixture
async def audited(tmp_path: Path, pki: TestPki) -> tuple[Path, Path]:
    """A stopped broker's store holding EVENTS audit events written by the broker; returns (config file, db)."""
    config = broker_config(tmp_path, pki)
    async with running_broker(config, pki) as broker:
        await _erase_accounts(broker, EVENTS)
    database = Path(config.store_url.removeprefix("sqlite:///"))
    return operator_cli.write_config(config, tmp_path / "mailbroker.toml"), database


# Tampering, as someone with write access to the database file would do it: sqlite3, no broker code.


def _raw(database: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    connection = sqlite3.connect(database)
    try:
        with connection:
            for sql, parameters in statements:
                connection.execute(sql, parameters)
    finally:
        connection.close()


def _event_ids(database: Path) -> dict[int, str]:
    connection = sqlite3.connect(database)
    try:
        return dict(connection.execute("SELECT sequence, event_id FROM audit_events").fetchall())
    finally:
        connection.close()


def _events(database: Path) -> list[AuditEvent]:
    """The stored events decoded as the store decodes them (the forger may use the published digest recipe)."""
    from server.store.engine import create_engine

    engine = create_engine(f"sqlite:///{database}")
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(audit_events).order_by(audit_events.c.sequence)).all()
    finally:
        engine.dispose()
    return [AuditEvent(**{**row._mapping, "details": json.loads(row.details)}) for row in rows]


def _rechain(database: Path, events: list[AuditEvent], previous: str) -> None:
    """Rewrite ``events`` in place with links and digests that are consistent among themselves."""
    statements = []
    for event in events:
        event = dataclasses.replace(event, previous_digest=previous, digest="")
        event = dataclasses.replace(event, digest=event_digest(event))
        statements.append(
            (
                "UPDATE audit_events SET details = ?, previous_digest = ?, digest = ? WHERE sequence = ?",
                (
                    json.dumps(event.details, sort_keys=True, separators=(",", ":")),
                    event.previous_digest,
                    event.digest,
                    event.sequence,
                ),
            )
        )
        previous = event.digest
    _raw(database, *statements)


def edit(database: Path) -> None:
    _raw(database, ("UPDATE audit_events SET actor = 'root' WHERE sequence = 3", ()))


def delete(database: Path) -> None:
    _raw(database, ("DELETE FROM audit_events WHERE sequence = 3", ()))


def insert(database: Path) -> None:
    """Make room after event 3 and insert a forged event 4 that links correctly to 3 and has a correct digest."""
    events = _events(database)
    forged = dataclasses.replace(
        events[2], sequence=4, event_id="forged" + secrets.token_hex(4), previous_digest=events[2].digest, digest=""
    )
    forged = dataclasses.replace(forged, digest=event_digest(forged))
    _raw(
        database,
        ("UPDATE audit_events SET sequence = sequence + 1000 WHERE sequence >= 4", ()),
        ("UPDATE audit_events SET sequence = sequence - 999 WHERE sequence >= 1000", ()),
        (
            "INSERT INTO audit_events (sequence, event_id, event_time, action, tenant, actor, account_id, details,"
            " previous_digest, digest) SELECT 4, ?, event_time, action, tenant, actor, account_id, details, ?, ?"
            " FROM audit_events WHERE sequence = 3",
            (forged.event_id, forged.previous_digest, forged.digest),
        ),
    )


def reorder(database: Path) -> None:
    """Swap the contents of events 2 and 4 (each keeps its own digest)."""
    _raw(
        database,
        ("UPDATE audit_events SET sequence = -2 WHERE sequence = 2", ()),
        ("UPDATE audit_events SET sequence = 2 WHERE sequence = 4", ()),
        ("UPDATE audit_events SET sequence = 4 WHERE sequence = -2", ()),
    )


def truncate(database: Path) -> None:
    _raw(database, ("DELETE FROM audit_events WHERE sequence = ?", (EVENTS,)))


def rewrite_consistently(database: Path) -> None:
    """Edit event 3 and recompute every link and digest from there on: the chain alone still checks out."""
    events = _events(database)
    events[2] = dataclasses.replace(events[2], details={**events[2].details, "provider": "google"})
    _rechain(database, events[2:], events[1].digest)


def append_consistently(database: Path) -> None:
    """Append a forged event with a correct link and a correct digest."""
    last = _events(database)[-1]
    forged = dataclasses.replace(
        last, sequence=EVENTS + 1, event_id="forged" + secrets.token_hex(4), previous_digest=last.digest, digest=""
    )
    forged = dataclasses.replace(forged, digest=event_digest(forged))
    _raw(
        database,
        (
            "INSERT INTO audit_events (sequence, event_id, event_time, action, tenant, actor, account_id, details,"
            " previous_digest, digest) SELECT ?, ?, event_time, action, tenant, actor, account_id, details, ?, ?"
            " FROM audit_events WHERE sequence = ?",
            (forged.sequence, forged.event_id, forged.previous_digest, forged.digest, EVENTS),
        ),
    )


TAMPERINGS: dict[str, tuple[Callable[[Path], None], int, str]] = {
    # name: (tampering, sequence reported, what it says)
    "edited": (edit, 3, "digest does not match"),
    "deleted": (delete, 4, "deleted or inserted"),
    "inserted": (insert, 5, "previous_digest is not the digest of event 4"),
    "reordered": (reorder, 2, "previous_digest is not the digest of event 1"),
    "truncated tail": (truncate, EVENTS, "truncated tail"),
    "rewritten consistently": (rewrite_consistently, EVENTS, "rewritten"),
    "appended consistently": (append_consistently, EVENTS + 1, "not covered by the anchor"),
}


async def test_an_untouched_log_verifies(audited: tuple[Path, Path]) -> None:
    config_file, _ = audited
    result = operator_cli.run(config_file, "audit", "verify")
    assert result.status == 0, result.stderr
    assert f"intact, {EVENTS} event(s)" in result.stdout


@pytest.mark.parametrize(("tamper", "sequence", "problem"), TAMPERINGS.values(), ids=TAMPERINGS.keys())
async def test_audit_verify_names_the_first_broken_link(
    audited: tuple[Path, Path], tamper: Callable[[Path], None], sequence: int, problem: str
) -> None:
    config_file, database = audited
    ids = _event_ids(database)
    tamper(database)
    result = operator_cli.run(config_file, "audit", "verify")
    assert result.status == 1
    assert f"BROKEN at sequence {sequence}" in result.stdout
    assert problem in result.stdout
    if tamper in (edit, delete, reorder):  # the event found there is named
        assert f"(event {_event_ids(database)[sequence]})" in result.stdout
        assert _event_ids(database)[sequence] in ids.values()


@pytest.mark.parametrize("anchor_tampering", ["edited", "deleted"])
async def test_a_tampered_or_missing_anchor_fails_verification(
    audited: tuple[Path, Path], tmp_path: Path, anchor_tampering: str
) -> None:
    config_file, database = audited
    anchor = tmp_path / "audit-anchor.json"
    document = json.loads(anchor.read_text())
    assert document["sequence"] == EVENTS
    if anchor_tampering == "edited":
        # Hide a truncation by moving the anchor back one event, without the key to recompute the MAC.
        truncate(database)
        events = _events(database)
        anchor.write_text(json.dumps({**document, "sequence": EVENTS - 1, "digest": events[-1].digest}))
        expected = "does not carry a valid MAC"
    else:
        anchor.unlink()
        expected = "no anchor file"
    result = operator_cli.run(config_file, "audit", "verify")
    assert result.status == 1
    assert expected in result.stdout


# ListAuditEvents


def _canary_profile() -> tuple[AccountProfile, list[str]]:
    email = f"canary-{secrets.token_hex(6)}@example.test"
    user = f"canary-user-{secrets.token_hex(6)}"
    host = f"canary-{secrets.token_hex(6)}.example.test"
    profile = AccountProfile(
        email_address=email,
        username=user,
        imap_server=MailServer(host, 993, TransportSecurity.IMPLICIT_TLS),
        smtp_server=MailServer(host, 465, TransportSecurity.IMPLICIT_TLS),
    )
    return profile, [email, user, host]


async def test_list_audit_events_pages_filters_keeps_tenants_apart_and_carries_no_personal_data(
    tmp_path: Path, pki: TestPki
) -> None:
    config = broker_config(tmp_path, pki)
    async with running_broker(config, pki) as broker:
        store = broker.store()
        canaries: list[str] = []
        alices = []
        for _ in range(7):
            profile, values = _canary_profile()
            canaries += values
            now = datetime.now(UTC)
            account = Account(
                id=new_account_id(),
                tenant=pki.alice.identity,
                provider=Provider.IMAP,
                state=AccountState.ACTIVE,
                capabilities=frozenset(Capability),
                profile=profile,
                create_time=now,
                update_time=now,
            )
            store.create_account(account, {"imap_password": b"canary-pw"})
            alices.append(account.id)
        async with broker.channel(pki.alice) as a, broker.channel(pki.bob) as b:
            accounts_a, _ = stubs(a)
            accounts_b, _ = stubs(b)
            for account_id in alices:
                await accounts_a.DeleteAccount(apb.DeleteAccountRequest(name=f"accounts/{account_id}"), timeout=10)
            bobs = await _erase_accounts(broker, 2, pki.bob)

            pages = []
            token = ""
            while True:
                reply = await accounts_a.ListAuditEvents(
                    apb.ListAuditEventsRequest(page_size=3, page_token=token), timeout=5
                )
                pages.append(reply.audit_events)
                token = reply.next_page_token
                if not token:
                    break
            assert [len(page) for page in pages] == [3, 3, 1]
            events = [event for page in pages for event in page]
            assert [e.account for e in events] == [f"accounts/{i}" for i in alices]
            assert {e.tenant for e in events} == {pki.alice.identity}
            assert [e.sequence for e in events] == sorted(e.sequence for e in events)
            assert all(e.action == rpb.AUDIT_ACTION_ACCOUNT_ERASED for e in events)

            one = await accounts_a.ListAuditEvents(apb.ListAuditEventsRequest(account=f"accounts/{alices[3]}"))
            assert [e.account for e in one.audit_events] == [f"accounts/{alices[3]}"]
            # Bob sees his own events only, and none of Alice's even when he names her account.
            bob_events = await accounts_b.ListAuditEvents(apb.ListAuditEventsRequest(), timeout=5)
            assert [e.account for e in bob_events.audit_events] == [f"accounts/{i}" for i in bobs]
            foreign = await accounts_b.ListAuditEvents(apb.ListAuditEventsRequest(account=f"accounts/{alices[0]}"))
            assert list(foreign.audit_events) == []
            # A page token is bound to its tenant: Bob cannot continue Alice's listing.
            first = await accounts_a.ListAuditEvents(apb.ListAuditEventsRequest(page_size=3), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await accounts_b.ListAuditEvents(
                    apb.ListAuditEventsRequest(page_size=3, page_token=first.next_page_token), timeout=5
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_reason(caught.value) == "INVALID_PAGE_TOKEN"
            everything = await accounts_b.ListAuditEvents(apb.ListAuditEventsRequest(all_tenants=True), timeout=5)
            assert len(everything.audit_events) == 9

        served = b"".join(e.SerializeToString() for e in everything.audit_events)
        database = Path(config.store_url.removeprefix("sqlite:///"))
        connection = sqlite3.connect(database)
        try:
            stored = repr(connection.execute("SELECT * FROM audit_events").fetchall()).encode()
        finally:
            connection.close()
        leaked = [i for i, canary in enumerate(canaries) if canary.encode() in served or canary.encode() in stored]
        assert leaked == [], "canaries (by index) found in audit events"
        assert b"canary-pw" not in served + stored
