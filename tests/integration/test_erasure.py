"""Erasure, proven on disk: after DeleteAccount no byte of the account is left in the SQLite file, its WAL or its
shared-memory file (free pages included), its open feeds end, another account keeps working; and the automatic
erasure of accounts that stayed NEEDS_REAUTH too long.

Canaries only. Each check computes a list of indexes or a boolean first, so a failure never prints a canary.
"""

from __future__ import annotations

import base64
import dataclasses
import secrets
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import mail_service_pb2 as mpb
from mailbroker.v1 import resources_pb2 as rpb

from server.config import ErasureConfig
from server.crypto.keyring import load_keyring
from server.domain.models import Account, AccountProfile, AccountState, Capability, MailServer, Provider
from server.domain.models import TransportSecurity as Security
from server.store.engine import create_engine
from server.store.ids import new_account_id
from server.store.migrate import upgrade
from server.store.repository import Store
from tests.broker import RunningBroker, broker_config, error_reason, running_broker, seed_account, stubs
from tests.integration.test_imap import _live_feed, connect_request, imap_config
from tests.mailserver import Mailbox, MailServers
from tests.pki import TestPki


def _canary(kind: str) -> str:
    return f"canary-{kind}-{secrets.token_hex(8)}"


def _encodings(value: str) -> list[bytes]:
    raw = value.encode()
    return [
        raw,
        value.encode("utf-16-le"),
        value.encode("utf-16-be"),
        base64.b64encode(raw),
        base64.urlsafe_b64encode(raw).rstrip(b"="),
        raw.hex().encode(),
    ]


def _disk(database: Path) -> bytes:
    """Every byte of the database, its WAL and its shared-memory index, as they are on disk."""
    return b"".join(
        path.read_bytes() for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")) if path.exists()
    )


def _sealed_values(database: Path, account_id: str) -> list[bytes]:
    """The account's ciphertexts as stored: profile, password, wrapped data key."""
    connection = sqlite3.connect(database)
    try:
        return [
            bytes(connection.execute(sql, (account_id,)).fetchone()[0])
            for sql in (
                "SELECT profile FROM accounts WHERE id = ?",
                "SELECT imap_password FROM account_secrets WHERE account_id = ?",
                "SELECT wrapped FROM data_keys WHERE account_id = ?",
            )
        ]
    finally:
        connection.close()


async def _read_to_the_end(stream: Any) -> None:
    """Read until the stream ends: raises its error status, returns if it ended OK."""
    while await stream.read() is not grpc.aio.EOF:
        pass


@pytest.fixture
async def broker(tmp_path: Path, pki: TestPki, mail_servers: MailServers) -> AsyncIterator[RunningBroker]:
    async with running_broker(imap_config(tmp_path, pki, mail_servers), pki) as running:
        yield running


async def test_delete_account_leaves_no_byte_on_disk_ends_feeds_and_spares_other_accounts(
    broker: RunningBroker, mail_servers: MailServers, mailbox: Mailbox
) -> None:
    database = Path(broker.config.store_url.removeprefix("sqlite:///"))
    # A real Dovecot account with a canary login, password and address, and a live feed on it.
    doomed_box = Mailbox(_canary("user") + "@example.test", _canary("pw"))
    mail_servers.add_user(doomed_box.address, doomed_box.password)
    # An account with canary hosts too (nothing needs to listen there: it is only stored, then erased).
    host, username, password = _canary("imap") + ".example.test", _canary("login"), _canary("pass")
    email = _canary("addr") + "@example.test"
    now = datetime.now(UTC)
    stored_only = Account(
        id=new_account_id(),
        tenant=broker.pki.alice.identity,
        provider=Provider.IMAP,
        state=AccountState.ACTIVE,
        capabilities=frozenset(Capability),
        profile=AccountProfile(
            email_address=email,
            username=username,
            imap_server=MailServer(host, 993, Security.IMPLICIT_TLS),
            smtp_server=MailServer(host, 465, Security.IMPLICIT_TLS),
        ),
        create_time=now,
        update_time=now,
    )
    broker.store().create_account(stored_only, {"imap_password": password.encode()})
    canaries = [
        *_encodings(doomed_box.address),
        *_encodings(doomed_box.password),
        *_encodings(host),
        *_encodings(username),
        *_encodings(password),
        *_encodings(email),
    ]

    async with broker.channel(broker.pki.alice) as channel:
        accounts, mail = stubs(channel)
        bystander = await accounts.ConnectImapAccount(connect_request(mail_servers, mailbox), timeout=20)
        _, doomed, stream = await _live_feed(channel, mail_servers, doomed_box)
        doomed_id = doomed.name.removeprefix("accounts/")

        sealed = [*_sealed_values(database, doomed_id), *_sealed_values(database, stored_only.id)]
        before = _disk(database)
        assert all(value in before for value in sealed), "the scan does not see the stored rows"
        found = [i for i, value in enumerate(canaries) if value in before]
        assert found == [], "canaries (by index) in plaintext on disk even before erasure"

        receipts = [
            await accounts.DeleteAccount(apb.DeleteAccountRequest(name=name), timeout=20)
            for name in (doomed.name, f"accounts/{stored_only.id}")
        ]
        # The open feed ended with a clear status.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _read_to_the_end(stream)
        assert (caught.value.code(), error_reason(caught.value)) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_ERASED")

        after = _disk(database)
        found = [i for i, value in enumerate(canaries) if value in after]
        assert found == [], "canaries (by index) on disk after erasure"
        remaining = [i for i, value in enumerate(sealed) if value in after]
        assert remaining == [], "ciphertexts (by index) of the erased accounts still on disk"

        for receipt in receipts:
            assert [(s.kind, s.outcome) for s in receipt.steps] == [
                (rpb.ERASURE_STEP_KIND_REVOKE_AT_PROVIDER, rpb.ERASURE_OUTCOME_NOT_APPLICABLE),
                (rpb.ERASURE_STEP_KIND_STOP_WATCHES, rpb.ERASURE_OUTCOME_DONE),
                (rpb.ERASURE_STEP_KIND_PURGE_ROWS, rpb.ERASURE_OUTCOME_DONE),
                (rpb.ERASURE_STEP_KIND_SCRUB_STORAGE, rpb.ERASURE_OUTCOME_DONE),
                (rpb.ERASURE_STEP_KIND_RECORD_AUDIT, rpb.ERASURE_OUTCOME_DONE),
            ]
            assert receipt.audit_event.startswith("auditEvents/") and len(receipt.audit_event) > len("auditEvents/")
        assert not receipts[0].steps[1].detail.startswith("0 ")  # the live feed's watchers were among those stopped

        # A second DeleteAccount is NOT_FOUND, like any unknown account (documented in server/domain/erasure.py).
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await accounts.DeleteAccount(apb.DeleteAccountRequest(name=doomed.name), timeout=10)
        assert (caught.value.code(), error_reason(caught.value)) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")

        # The other account is untouched and works against its real server.
        folders = await mail.ListFolders(mpb.ListFoldersRequest(parent=bystander.name), timeout=20)
        assert any(folder.display_name == "INBOX" or "INBOX" in folder.name for folder in folders.folders)
        assert broker.store().read_secret(bystander.name.removeprefix("accounts/"), "imap_password") == (
            mailbox.password.encode()
        )


async def test_the_receipt_says_record_audit_failed_when_the_audit_write_fails(
    tmp_path: Path, pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise OSError("the audit log is unavailable")

    async with running_broker(broker_config(tmp_path, pki), pki) as running:
        account = seed_account(running.store(), pki.alice.identity)
        monkeypatch.setattr(Store, "append_audit_event", refuse)
        async with running.channel(pki.alice) as channel:
            accounts, _ = stubs(channel)
            receipt = await accounts.DeleteAccount(apb.DeleteAccountRequest(name=f"accounts/{account.id}"), timeout=10)
        last = receipt.steps[-1]
        assert (last.kind, last.outcome, last.reason) == (
            rpb.ERASURE_STEP_KIND_RECORD_AUDIT,
            rpb.ERASURE_OUTCOME_FAILED,
            "AUDIT_WRITE_FAILED",
        )
        assert receipt.steps[2].outcome == rpb.ERASURE_OUTCOME_DONE  # the purge itself happened
        assert receipt.audit_event == ""  # no event to name
        assert running.store().get_account(pki.alice.identity, account.id) is None


def _needs_reauth_since(database: Path, account_id: str, since: datetime) -> None:
    """Put an account in NEEDS_REAUTH since ``since``, straight in the store."""
    connection = sqlite3.connect(database)
    try:
        with connection:
            connection.execute(
                "UPDATE accounts SET state = ?, needs_reauth_since = ? WHERE id = ?",
                (
                    AccountState.NEEDS_REAUTH.value,
                    since.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds"),
                    account_id,
                ),
            )
    finally:
        connection.close()


async def test_accounts_needing_reauth_for_too_long_are_erased_by_the_running_broker(
    tmp_path: Path, pki: TestPki
) -> None:
    config = dataclasses.replace(
        broker_config(tmp_path, pki),
        erasure=ErasureConfig(needs_reauth_erase_after_days=30, sweep_interval_seconds=3600),
    )
    engine = create_engine(config.store_url)
    upgrade(engine)
    store = Store(engine, load_keyring(config.keyring_file, {}))
    stale, recent, active, bobs_stale = (
        seed_account(store, pki.alice.identity),
        seed_account(store, pki.alice.identity),
        seed_account(store, pki.alice.identity),
        seed_account(store, pki.bob.identity),
    )
    database = Path(config.store_url.removeprefix("sqlite:///"))
    now = datetime.now(UTC)
    _needs_reauth_since(database, stale.id, now - timedelta(days=31))
    _needs_reauth_since(database, bobs_stale.id, now - timedelta(days=45))
    _needs_reauth_since(database, recent.id, now - timedelta(days=29))

    async with running_broker(config, pki) as running:
        eraser = running.broker.auto_eraser
        assert eraser is not None
        await eraser.wait_for_sweeps(1)  # the first sweep runs at start-up
        assert store.get_account(pki.alice.identity, stale.id) is None
        assert store.get_account(pki.bob.identity, bobs_stale.id) is None
        assert store.read_secret(stale.id, "imap_password") is None
        kept = store.get_account(pki.alice.identity, recent.id)
        assert kept is not None and kept.state is AccountState.NEEDS_REAUTH
        assert store.get_account(pki.alice.identity, active.id) is not None
        async with running.channel(pki.alice) as channel:
            accounts, _ = stubs(channel)
            events = await accounts.ListAuditEvents(apb.ListAuditEventsRequest(), timeout=5)
        assert [(e.action, e.actor, e.account) for e in events.audit_events] == [
            (rpb.AUDIT_ACTION_ACCOUNT_ERASED, "system", f"accounts/{stale.id}")
        ]
        assert [s.outcome for s in events.audit_events[0].erasure_steps][1:] == [rpb.ERASURE_OUTCOME_DONE] * 4
    engine.dispose()


async def test_automatic_erasure_is_off_by_default(tmp_path: Path, pki: TestPki) -> None:
    async with running_broker(broker_config(tmp_path, pki), pki) as running:
        assert running.broker.auto_eraser is None
