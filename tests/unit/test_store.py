"""Tests for server.store: SQLite hardening, migrations, sealed accounts and secrets, erasure, and the audit chain.

Secret and personal test values are random canaries. Failure messages never echo file contents or canaries: each
check computes a boolean first, so pytest's assertion rewriting has nothing to print but True or False.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, delete, event, func, inspect, select, update
from sqlalchemy.engine import make_url

from server.crypto.aead import DecryptionError
from server.crypto.datakeys import unwrap_data_key
from server.crypto.keyring import Keyring, KeyringError
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
from server.errors import AlreadyExists, ConfigurationError, DeadlineExceeded, NotFound
from server.store.audit import GENESIS_DIGEST, event_digest
from server.store.engine import checkpoint_and_vacuum, create_engine
from server.store.ids import new_account_id, new_event_id
from server.store.migrate import upgrade
from server.store.repository import Store
from server.store.rotation import rewrap_data_keys
from server.store.schema import (
    account_secrets,
    accounts,
    audit_events,
    consents,
    data_keys,
    feed_cursors,
    idempotency_records,
    metadata,
    oauth_states,
)
from tests.postgres import PostgresServer

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
HEAD_REVISION = "0002"
ACCOUNT_TABLES = (accounts, data_keys, account_secrets, consents, feed_cursors, idempotency_records, oauth_states)


def canary(kind: str) -> str:
    return f"canary-{kind}-{secrets.token_hex(8)}"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def new_keyring(*versions: int) -> Keyring:
    versions = versions or (1,)
    return Keyring(current_version=max(versions), keys={v: secrets.token_bytes(32) for v in versions})


def make_account(
    tenant: str = "tenant-a",
    *,
    account_id: str | None = None,
    profile: AccountProfile | None = None,
    state: AccountState = AccountState.ACTIVE,
    created: datetime = T0,
) -> Account:
    return Account(
        id=account_id or new_account_id(),
        tenant=tenant,
        provider=Provider.IMAP,
        state=state,
        capabilities=frozenset({Capability.READ, Capability.METADATA}),
        profile=profile
        or AccountProfile(
            email_address="user@example.test",
            username="user",
            imap_server=MailServer("imap.example.test", 993, TransportSecurity.IMPLICIT_TLS),
            smtp_server=MailServer("smtp.example.test", 587, TransportSecurity.STARTTLS),
        ),
        create_time=created,
        update_time=created,
    )


class Clock:
    """A settable clock for the store."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every store test runs on SQLite and on PostgreSQL, but those about the SQLite file itself (``db_path``)."""
    if "backend" in metafunc.fixturenames:
        sqlite_only = "db_path" in metafunc.fixturenames
        metafunc.parametrize("backend", ["sqlite"] if sqlite_only else ["sqlite", "postgresql"])


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "broker.sqlite3"


@pytest.fixture
def store_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'broker.sqlite3'}"
    postgres: PostgresServer = request.getfixturevalue("postgres")
    return postgres.new_database()


@pytest.fixture
def engine(store_url: str) -> Iterator[Engine]:
    engine = create_engine(store_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_engine(postgres: PostgresServer) -> Iterator[Engine]:
    """A migrated engine on a fresh PostgreSQL database, for the tests about PostgreSQL alone."""
    engine = create_engine(postgres.new_database())
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def unchecked_engine(store_url: str, backend: str) -> Iterator[Engine]:
    """An engine on the same database that does not enforce foreign keys, as a careless operator's tool would."""
    engine = sqlalchemy.create_engine(create_engine(store_url).url)
    if backend == "postgresql":
        # Superuser only: foreign keys are triggers, and "replica" mode skips them.
        event.listen(
            engine,
            "connect",
            lambda connection, _record: connection.execute("SET session_replication_role = replica"),
        )
    yield engine
    engine.dispose()


@pytest.fixture
def on_disk(backend: str, store_url: str, engine: Engine, request: pytest.FixtureRequest) -> Callable[[], bytes]:
    """A function returning every byte the database has on disk: SQLite's file, WAL and shared-memory index; or,
    after a CHECKPOINT, PostgreSQL's files of this database and its write-ahead log."""
    if backend == "sqlite":
        path = Path(make_url(store_url).database or "")
        return lambda: disk_bytes(path)
    postgres: PostgresServer = request.getfixturevalue("postgres")
    return lambda: postgres.disk_bytes(engine.url.database or "")


@pytest.fixture
def keyring() -> Keyring:
    return new_keyring(1)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(engine: Engine, keyring: Keyring, clock: Clock) -> Store:
    return Store(engine, keyring, clock=clock)


def sql(engine: Engine, statement: Any) -> None:
    """Run one statement behind the store's back, as an attacker with write access to the database would."""
    with engine.begin() as connection:
        connection.execute(statement)


def count_rows(engine: Engine, table: sqlalchemy.Table, account_id: str) -> int:
    with engine.connect() as connection:
        return int(
            connection.scalar(select(func.count()).select_from(table).where(table.c.account_id == account_id)) or 0
        )


# --- engine: SQLite hardening --------------------------------------------------------------------------------------


def test_pragmas_are_in_effect_on_a_fresh_connection(db_path: Path) -> None:
    engine = create_engine(f"sqlite:///{db_path}")
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA secure_delete").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    finally:
        engine.dispose()


def test_foreign_keys_are_enforced(store: Store, engine: Engine) -> None:
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        sql(engine, data_keys.insert().values(account_id="nobody", kek_version=1, wrapped=b"x", create_time=T0))


def test_database_directory_is_0700_and_its_files_0600(store: Store, db_path: Path) -> None:
    store.create_account(make_account(), {"imap_password": b"pw"})
    wal, shm = Path(f"{db_path}-wal"), Path(f"{db_path}-shm")
    assert wal.exists()
    assert shm.exists()
    assert mode(db_path.parent) == 0o700
    assert (mode(db_path), mode(wal), mode(shm)) == (0o600, 0o600, 0o600)


def test_an_existing_database_file_with_loose_permissions_is_tightened(tmp_path: Path) -> None:
    db_path = tmp_path / "loose.sqlite3"
    db_path.touch(mode=0o644)
    db_path.chmod(0o644)
    create_engine(f"sqlite:///{db_path}").dispose()
    assert mode(db_path) == 0o600


def test_concurrent_appends_and_creates_neither_fail_nor_fork_the_chain(store: Store, engine: Engine) -> None:
    """Threads appending audit events while others create accounts: no lock errors, no fork, no gaps."""
    errors: list[BaseException] = []

    def append(worker: int) -> None:
        try:
            for i in range(10):
                store.append_audit_event("test.append", "tenant-a", f"worker-{worker}", "", {"i": i})
        except BaseException as exc:  # reported below, after the threads finish
            errors.append(exc)

    def create() -> None:
        try:
            for _ in range(10):
                store.create_account(make_account(), {"imap_password": b"pw"})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(n,)) for n in range(6)]
    threads += [threading.Thread(target=create) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [type(e).__name__ for e in errors] == []
    events = store.list_audit_events(None, None, page_size=1000)
    assert [e.sequence for e in events] == list(range(1, 61))
    assert store.verify_audit_chain() is None
    assert len(store.list_accounts("tenant-a", page_size=1000)) == 30


# --- migrations ----------------------------------------------------------------------------------------------------


def revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def test_upgrade_on_an_empty_database_creates_every_table(engine: Engine) -> None:
    tables = set(inspect(engine).get_table_names())
    assert tables == set(metadata.tables) | {"alembic_version"}
    assert revision(engine) == HEAD_REVISION


def test_upgrade_twice_is_a_no_op(engine: Engine, store: Store) -> None:
    account = make_account()
    store.create_account(account, {"imap_password": b"pw"})

    upgrade(engine)

    assert revision(engine) == HEAD_REVISION
    assert store.get_account(account.tenant, account.id) == account


def test_the_migrated_database_matches_the_schema_module(engine: Engine) -> None:
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), metadata)
    assert differences == []


# --- accounts ------------------------------------------------------------------------------------------------------


def test_an_account_round_trips_with_its_profile_and_secrets(store: Store) -> None:
    account = make_account(state=AccountState.NEEDS_REAUTH)
    store.create_account(account, {"imap_password": b"pw-1", "token_cache": b"{}"})

    assert store.get_account(account.tenant, account.id) == account
    assert store.read_secret(account.id, "imap_password") == b"pw-1"
    assert store.read_secret(account.id, "token_cache") == b"{}"
    assert store.read_secret(account.id, "refresh_token") is None
    assert store.read_secret("a-missing", "imap_password") is None


def test_an_account_without_mail_servers_round_trips(store: Store) -> None:
    account = make_account(profile=AccountProfile(email_address="someone@example.test"))
    store.create_account(account, {})
    assert store.get_account(account.tenant, account.id) == account


def test_times_come_back_as_the_same_instant_in_utc(store: Store) -> None:
    created = datetime(2025, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    account = make_account(created=created)
    store.create_account(account, {})
    stored = store.get_account(account.tenant, account.id)
    assert stored is not None
    assert stored.create_time == created
    assert stored.create_time.tzinfo is UTC


def test_naive_datetimes_are_refused(store: Store) -> None:
    with pytest.raises(sqlalchemy.exc.StatementError):
        store.create_account(make_account(created=datetime(2025, 1, 1)), {})


def test_an_unknown_secret_name_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="not a secret column"):
        store.create_account(make_account(), {"password": b"x"})
    account = make_account()
    store.create_account(account, {})
    with pytest.raises(ValueError, match="not a secret column"):
        store.read_secret(account.id, "profile")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a secret column"):
        store.write_secret(account.id, "tenant", b"x")  # type: ignore[arg-type]


def test_creating_an_existing_account_id_is_already_exists(store: Store) -> None:
    account = make_account()
    store.create_account(account, {})
    with pytest.raises(AlreadyExists):
        store.create_account(dataclasses.replace(account, tenant="tenant-b"), {})
    assert store.get_account("tenant-b", account.id) is None


def test_a_failed_create_leaves_no_half_written_rows(store: Store, engine: Engine, unchecked_engine: Engine) -> None:
    account_id = new_account_id()
    # An orphan secrets row (possible only with foreign keys off) makes the LAST insert of create_account fail.
    sql(unchecked_engine, account_secrets.insert().values(account_id=account_id, update_time=T0))

    with pytest.raises(AlreadyExists):
        store.create_account(make_account(account_id=account_id), {"imap_password": b"pw"})

    assert count_rows(engine, data_keys, account_id) == 0
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).where(accounts.c.id == account_id)) == 0


def test_state_changes_track_when_reauth_was_first_needed(store: Store, engine: Engine, clock: Clock) -> None:
    account = make_account()
    store.create_account(account, {})

    def since() -> datetime | None:
        with engine.connect() as connection:
            value: datetime | None = connection.scalar(
                select(accounts.c.needs_reauth_since).where(accounts.c.id == account.id)
            )
            return value

    clock.now = T0 + timedelta(hours=1)
    assert store.update_account_state(account.id, AccountState.NEEDS_REAUTH)
    clock.now = T0 + timedelta(hours=2)
    assert store.update_account_state(account.id, AccountState.NEEDS_REAUTH)
    assert since() == T0 + timedelta(hours=1)
    stored = store.get_account(account.tenant, account.id)
    assert stored is not None
    assert stored.state is AccountState.NEEDS_REAUTH
    assert stored.update_time == T0 + timedelta(hours=2)

    assert store.update_account_state(account.id, AccountState.ACTIVE)
    assert since() is None
    assert not store.update_account_state("a-missing", AccountState.ACTIVE)


def test_capabilities_are_replaced_and_stored_sorted(store: Store, engine: Engine) -> None:
    account = make_account()
    store.create_account(account, {})

    assert store.update_capabilities(account.id, frozenset({Capability.SEND, Capability.READ}))

    stored = store.get_account(account.tenant, account.id)
    assert stored is not None
    assert stored.capabilities == {Capability.SEND, Capability.READ}
    with engine.connect() as connection:
        assert connection.scalar(select(accounts.c.capabilities).where(accounts.c.id == account.id)) == "read,send"
    assert not store.update_capabilities("a-missing", frozenset())


def test_new_account_ids_are_random_and_url_safe() -> None:
    ids = {new_account_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"a[a-z2-7]{24}", account_id) for account_id in ids)
    assert re.fullmatch(r"e[a-z2-7]{24}", new_event_id())


# --- tenants and pagination ----------------------------------------------------------------------------------------


def test_another_tenant_never_sees_an_account(store: Store) -> None:
    account = make_account("tenant-a")
    store.create_account(account, {})

    assert store.get_account("tenant-b", account.id) is None
    assert store.list_accounts("tenant-b", page_size=100) == []
    assert store.get_account("tenant-a", account.id) == account
    assert store.get_account("tenant-a", new_account_id()) is None


def test_list_accounts_pages_by_id_within_the_tenant(store: Store) -> None:
    mine = [make_account("tenant-a") for _ in range(7)]
    theirs = [make_account("tenant-b") for _ in range(3)]
    for account in mine + theirs:
        store.create_account(account, {})

    pages: list[list[str]] = []
    after: str | None = None
    while True:
        page = store.list_accounts("tenant-a", page_size=3, after_id=after)
        if not page:
            break
        pages.append([account.id for account in page])
        after = page[-1].id

    assert [len(page) for page in pages] == [3, 3, 1]
    assert [account_id for page in pages for account_id in page] == sorted(a.id for a in mine)
    assert store.list_accounts("tenant-a", page_size=100) == sorted(mine, key=lambda a: a.id)
    with pytest.raises(ValueError, match="page_size"):
        store.list_accounts("tenant-a", page_size=0)


# --- secrets: writes and ciphertext binding ------------------------------------------------------------------------


def test_write_secret_sets_replaces_and_clears(store: Store) -> None:
    account = make_account()
    store.create_account(account, {})

    store.write_secret(account.id, "refresh_token", b"rt-1")
    store.write_secret(account.id, "refresh_token", b"rt-2")
    assert store.read_secret(account.id, "refresh_token") == b"rt-2"
    store.write_secret(account.id, "refresh_token", None)
    assert store.read_secret(account.id, "refresh_token") is None
    with pytest.raises(NotFound):
        store.write_secret("a-missing", "refresh_token", b"x")


def raw_value(engine: Engine, column: sqlalchemy.Column[Any], account_id: str) -> Any:
    with engine.connect() as connection:
        return connection.scalar(select(column).where(column.table.c["account_id"] == account_id))


@pytest.fixture
def two_accounts(store: Store) -> tuple[Account, Account]:
    first, second = make_account(), make_account()
    store.create_account(first, {"imap_password": b"first-pw", "refresh_token": b"first-rt"})
    store.create_account(second, {"imap_password": b"second-pw"})
    return first, second


def test_a_secret_copied_to_another_account_does_not_decrypt(
    store: Store, engine: Engine, two_accounts: tuple[Account, Account]
) -> None:
    first, second = two_accounts
    stolen = raw_value(engine, account_secrets.c.imap_password, first.id)
    sql(engine, update(account_secrets).where(account_secrets.c.account_id == second.id).values(imap_password=stolen))
    with pytest.raises(DecryptionError):
        store.read_secret(second.id, "imap_password")


def test_a_secret_copied_to_another_column_does_not_decrypt(
    store: Store, engine: Engine, two_accounts: tuple[Account, Account]
) -> None:
    first, _ = two_accounts
    password = raw_value(engine, account_secrets.c.imap_password, first.id)
    sql(engine, update(account_secrets).where(account_secrets.c.account_id == first.id).values(refresh_token=password))
    with pytest.raises(DecryptionError):
        store.read_secret(first.id, "refresh_token")


def test_a_data_key_copied_to_another_account_does_not_unwrap(
    store: Store, engine: Engine, keyring: Keyring, two_accounts: tuple[Account, Account]
) -> None:
    first, second = two_accounts
    stolen = raw_value(engine, data_keys.c.wrapped, first.id)
    sql(engine, update(data_keys).where(data_keys.c.account_id == second.id).values(wrapped=stolen))
    with pytest.raises(DecryptionError):
        store.read_secret(second.id, "imap_password")
    with pytest.raises(DecryptionError):
        store.get_account(second.tenant, second.id)
    # The unwrap itself fails, not only the values sealed under the other account's key.
    with pytest.raises(DecryptionError):
        unwrap_data_key(keyring, second.id, raw_value(engine, data_keys.c.kek_version, first.id), stolen)


def test_a_secret_and_data_key_copied_together_still_do_not_decrypt(
    store: Store, engine: Engine, two_accounts: tuple[Account, Account]
) -> None:
    first, second = two_accounts
    wrapped = raw_value(engine, data_keys.c.wrapped, first.id)
    password = raw_value(engine, account_secrets.c.imap_password, first.id)
    sql(engine, update(data_keys).where(data_keys.c.account_id == second.id).values(wrapped=wrapped))
    sql(engine, update(account_secrets).where(account_secrets.c.account_id == second.id).values(imap_password=password))
    with pytest.raises(DecryptionError):
        store.read_secret(second.id, "imap_password")


def test_a_profile_copied_to_another_account_does_not_decrypt(
    store: Store, engine: Engine, two_accounts: tuple[Account, Account]
) -> None:
    first, second = two_accounts
    with engine.connect() as connection:
        profile = connection.scalar(select(accounts.c.profile).where(accounts.c.id == first.id))
    sql(engine, update(accounts).where(accounts.c.id == second.id).values(profile=profile))
    with pytest.raises(DecryptionError):
        store.get_account(second.tenant, second.id)


def test_accounts_made_before_a_kek_rotation_still_open_after_it(engine: Engine, keyring: Keyring) -> None:
    before = make_account()
    Store(engine, keyring).create_account(before, {"imap_password": b"pw"})

    rotated = Keyring(current_version=2, keys={1: keyring.kek(1), 2: secrets.token_bytes(32)})
    store = Store(engine, rotated)
    after = make_account()
    store.create_account(after, {})

    assert store.get_account(before.tenant, before.id) == before
    assert store.read_secret(before.id, "imap_password") == b"pw"
    assert raw_value(engine, data_keys.c.kek_version, after.id) == 2


# --- at rest and erasure -------------------------------------------------------------------------------------------


def disk_bytes(db_path: Path) -> bytes:
    """The raw bytes of the database, its WAL and its shared-memory index, whichever exist."""
    parts = [db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")]
    return b"".join(path.read_bytes() for path in parts if path.exists())


def encodings(value: str) -> list[bytes]:
    raw = value.encode()
    return [
        raw,
        value.encode("utf-16-le"),
        value.encode("utf-16-be"),
        base64.b64encode(raw),
        base64.urlsafe_b64encode(raw).rstrip(b"="),
        raw.hex().encode(),
        raw.hex().upper().encode(),
    ]


def test_no_secret_or_personal_value_is_on_disk_and_erasure_leaves_no_trace(
    store: Store, engine: Engine, db_path: Path
) -> None:
    password, refresh_token = canary("pw"), canary("rt")
    email, username = canary("email") + "@example.test", canary("user")
    imap_host, smtp_host = canary("imap") + ".example.test", canary("smtp") + ".example.test"
    profile = AccountProfile(
        email_address=email,
        username=username,
        imap_server=MailServer(imap_host, 993, TransportSecurity.IMPLICIT_TLS),
        smtp_server=MailServer(smtp_host, 465, TransportSecurity.IMPLICIT_TLS),
    )
    account = make_account(profile=profile)
    store.create_account(account, {"imap_password": password.encode()})
    store.write_secret(account.id, "refresh_token", refresh_token.encode())
    bystander = make_account()
    store.create_account(bystander, {"imap_password": b"bystander"})
    assert store.get_account(account.tenant, account.id) == account  # the values are really stored

    canaries = [
        *encodings(password),
        *encodings(refresh_token),
        email.encode(),
        username.encode(),
        imap_host.encode(),
        smtp_host.encode(),
    ]
    sealed = [
        raw_value(engine, account_secrets.c.imap_password, account.id),
        raw_value(engine, account_secrets.c.refresh_token, account.id),
        raw_value(engine, data_keys.c.wrapped, account.id),
    ]
    with engine.connect() as connection:
        sealed.append(connection.scalar(select(accounts.c.profile).where(accounts.c.id == account.id)))

    before = disk_bytes(db_path)
    assert Path(f"{db_path}-wal").exists()
    found = [i for i, value in enumerate(canaries) if value in before]
    assert found == [], "canaries (by index) found in plaintext on disk"
    assert all(blob in before for blob in sealed), "the scan does not see the stored rows"

    assert store.delete_account(account.id)
    assert checkpoint_and_vacuum(engine)

    after = disk_bytes(db_path)
    found = [i for i, value in enumerate(canaries) if value in after]
    assert found == [], "canaries (by index) found on disk after erasure"
    remaining = [i for i, blob in enumerate(sealed) if blob in after]
    assert remaining == [], "sealed values (by index) still on disk after erasure"
    assert store.read_secret(bystander.id, "imap_password") == b"bystander"


def test_checkpoint_reports_when_a_reader_keeps_the_wal_from_being_emptied(db_path: Path) -> None:
    engine = create_engine(f"sqlite:///{db_path}")
    # Registered after the engine's own listener, so it wins: the checkpoint gives up in 50 ms, not 5 s.
    event.listen(engine, "connect", lambda connection, _record: connection.execute("PRAGMA busy_timeout=50"))
    try:
        upgrade(engine)
        with engine.connect() as reader:
            reader.execute(select(func.count()).select_from(accounts))  # holds a read snapshot of the WAL
            assert not checkpoint_and_vacuum(engine)
        assert checkpoint_and_vacuum(engine)
        assert Path(f"{db_path}-wal").stat().st_size == 0
    finally:
        engine.dispose()


def add_rows_about(engine: Engine, account_id: str) -> None:
    """A consent, a feed cursor, an idempotency record and an OAuth state for the account."""
    with engine.begin() as connection:
        connection.execute(
            consents.insert().values(
                id=secrets.token_hex(8),
                account_id=account_id,
                tenant="tenant-a",
                provider="imap",
                scopes="",
                capabilities="read",
                grant_time=T0,
            )
        )
        connection.execute(
            feed_cursors.insert().values(account_id=account_id, feed_key="inbox", cursor=b"c", update_time=T0)
        )
        connection.execute(
            idempotency_records.insert().values(
                account_id=account_id, request_digest="d" * 64, result=b"r", create_time=T0
            )
        )
        connection.execute(
            oauth_states.insert().values(
                id=secrets.token_hex(32),
                tenant="tenant-a",
                caller="svc",
                provider="google",
                account_id=account_id,
                kek_version=1,
                payload=b"p",
                create_time=T0,
                expire_time=T0,
            )
        )


@pytest.mark.parametrize("foreign_keys", ["on", "off"])
def test_delete_account_removes_every_row_about_it(
    engine: Engine, unchecked_engine: Engine, keyring: Keyring, foreign_keys: str
) -> None:
    gone, kept = make_account(), make_account()
    setup = Store(engine, keyring)
    for account in (gone, kept):
        setup.create_account(account, {"imap_password": b"pw"})
        add_rows_about(engine, account.id)
    # With foreign keys off, only the store's explicit deletes can clear the child rows.
    store = Store(engine if foreign_keys == "on" else unchecked_engine, keyring)
    assert store.delete_account(gone.id)
    assert not store.delete_account(gone.id)

    assert {table.name: count_rows(engine, table, gone.id) for table in ACCOUNT_TABLES[1:]} == dict.fromkeys(
        (table.name for table in ACCOUNT_TABLES[1:]), 0
    )
    assert setup.get_account(gone.tenant, gone.id) is None
    assert {table.name: count_rows(engine, table, kept.id) for table in ACCOUNT_TABLES[1:]} == dict.fromkeys(
        (table.name for table in ACCOUNT_TABLES[1:]), 1
    )


# --- audit log -----------------------------------------------------------------------------------------------------


@pytest.fixture
def five_events(store: Store, clock: Clock) -> list[AuditEvent]:
    events = []
    for i in range(5):
        clock.now = T0 + timedelta(seconds=i)
        tenant = "tenant-a" if i % 2 == 0 else "tenant-b"
        events.append(store.append_audit_event("account.create", tenant, "svc", f"a{i % 3}", {"step": i}))
    return events


def test_appended_events_form_a_chain_that_verifies(store: Store, five_events: list[AuditEvent]) -> None:
    assert [e.sequence for e in five_events] == [1, 2, 3, 4, 5]
    assert five_events[0].previous_digest == GENESIS_DIGEST
    assert all(later.previous_digest == earlier.digest for earlier, later in itertools.pairwise(five_events))
    assert all(event.digest == event_digest(event) for event in five_events)
    assert store.list_audit_events(None, None, page_size=100) == five_events
    assert store.verify_audit_chain() is None


def test_an_empty_audit_log_verifies(store: Store) -> None:
    assert store.verify_audit_chain() is None


def test_list_audit_events_filters_and_pages(store: Store, five_events: list[AuditEvent]) -> None:
    assert [e.sequence for e in store.list_audit_events("tenant-a", None, page_size=100)] == [1, 3, 5]
    assert [e.sequence for e in store.list_audit_events(None, "a1", page_size=100)] == [2, 5]
    assert [e.sequence for e in store.list_audit_events("tenant-b", "a1", page_size=100)] == [2]
    assert [e.sequence for e in store.list_audit_events(None, None, page_size=2, after_sequence=2)] == [3, 4]
    assert [e.sequence for e in store.list_audit_events(None, None, page_size=2, after_sequence=0)] == [1, 2]
    assert store.list_audit_events(None, None, page_size=10, after_sequence=5) == []


def test_audit_details_must_be_json(store: Store) -> None:
    with pytest.raises(TypeError):
        store.append_audit_event("x", "t", "svc", "", {"when": T0})
    assert store.list_audit_events(None, None, page_size=10) == []


def _row(engine: Engine, sequence: int) -> dict[str, Any]:
    with engine.connect() as connection:
        return dict(connection.execute(select(audit_events).where(audit_events.c.sequence == sequence)).one()._mapping)


def _swap(engine: Engine, first: int, second: int) -> None:
    a, b = _row(engine, first), _row(engine, second)
    with engine.begin() as connection:
        connection.execute(delete(audit_events).where(audit_events.c.sequence.in_([first, second])))
        connection.execute(audit_events.insert().values({**b, "sequence": first}))
        connection.execute(audit_events.insert().values({**a, "sequence": second}))


def _replace_with_consistent_forgery(engine: Engine, sequence: int) -> None:
    """Rewrite a row with new details AND a correct digest of its own: only the next link can give it away."""
    row = _row(engine, sequence)
    forged = AuditEvent(**{**row, "details": {"step": 99}, "digest": ""})
    forged = dataclasses.replace(forged, digest=event_digest(forged))
    sql(
        engine,
        update(audit_events)
        .where(audit_events.c.sequence == sequence)
        .values(details='{"step":99}', digest=forged.digest),
    )


def _append_forgery(engine: Engine, previous_digest: str) -> None:
    sql(
        engine,
        audit_events.insert().values(
            sequence=6,
            event_id=new_event_id(),
            event_time=T0,
            action="account.delete",
            tenant="tenant-a",
            actor="svc",
            account_id="a0",
            details="{}",
            previous_digest=previous_digest,
            digest="f" * 64,
        ),
    )


Tampering = Callable[[Engine, list[AuditEvent]], None]


def edit(sequence: int, **values: Any) -> Tampering:
    return lambda engine, _events: sql(
        engine, update(audit_events).where(audit_events.c.sequence == sequence).values(**values)
    )


def remove(sequence: int) -> Tampering:
    return lambda engine, _events: sql(engine, delete(audit_events).where(audit_events.c.sequence == sequence))


TAMPERINGS: dict[str, tuple[Tampering, int]] = {
    "edit details": (edit(3, details='{"step":99}'), 3),
    "edit details whitespace only": (edit(3, details='{"step": 2}'), 3),
    "details not json": (edit(3, details="{"), 3),
    "edit actor": (edit(2, actor="root"), 2),
    "edit time": (edit(4, event_time=T0), 4),
    "edit the last digest": (edit(5, digest="0" * 64), 5),
    "delete a middle row": (remove(3), 4),
    "delete the first row": (remove(1), 2),
    "swap two rows": (lambda engine, _events: _swap(engine, 2, 4), 2),
    "forged row with a consistent digest": (lambda engine, _events: _replace_with_consistent_forgery(engine, 3), 4),
    "forged row appended": (lambda engine, events: _append_forgery(engine, events[-1].digest), 6),
    "forged row appended with a bad link": (lambda engine, _events: _append_forgery(engine, GENESIS_DIGEST), 6),
}


@pytest.mark.parametrize(("tamper", "first_broken"), TAMPERINGS.values(), ids=TAMPERINGS.keys())
def test_verify_audit_chain_finds_the_first_broken_link(
    store: Store, engine: Engine, five_events: list[AuditEvent], tamper: Tampering, first_broken: int
) -> None:
    assert store.verify_audit_chain() is None
    tamper(engine, five_events)
    assert store.verify_audit_chain() == first_broken


def test_appending_after_a_forgery_does_not_repair_the_chain(
    store: Store, engine: Engine, five_events: list[AuditEvent]
) -> None:
    sql(engine, update(audit_events).where(audit_events.c.sequence == 2).values(actor="root"))
    event = store.append_audit_event("account.delete", "tenant-a", "svc", "a0", {})
    assert event.sequence == 6
    assert store.verify_audit_chain() == 2


def test_audit_events_survive_account_deletion(store: Store) -> None:
    account = make_account()
    store.create_account(account, {})
    store.append_audit_event("account.create", account.tenant, "svc", account.id, {"provider": "imap"})
    assert store.delete_account(account.id)
    assert [e.account_id for e in store.list_audit_events(None, account.id, page_size=10)] == [account.id]
    assert store.verify_audit_chain() is None


def test_idempotency_claims_replays_and_releases(store: Store, on_disk: Callable[[], bytes]) -> None:
    account = make_account()
    store.create_account(account, {})
    message_id = canary("msgid")
    assert store.claim_request(account.id, "d1", "f1") is None
    assert store.claim_request(account.id, "d1", "f1") == {"fingerprint": "f1", "state": "pending", "result": None}
    store.complete_request(account.id, "d1", "f1", {"internet_message_id": message_id})
    replay = store.claim_request(account.id, "d1", "other")
    assert replay is not None
    assert replay["state"] == "done"
    assert replay["fingerprint"] == "f1"
    assert replay["result"] == {"internet_message_id": message_id}
    # The stored result is sealed: its bytes are not on disk in the clear.
    raw = on_disk()
    assert message_id.encode() not in raw, "idempotency result stored in the clear"
    store.release_request(account.id, "d1")
    assert store.claim_request(account.id, "d1", "f2") is None
    # Erasure takes the records with the account.
    store.delete_account(account.id)
    assert count_rows(store._engine, idempotency_records, account.id) == 0


# --- PostgreSQL: erasure by crypto-shredding ----------------------------------------------------------------------


def test_erasure_on_postgresql_leaves_only_ciphertext_that_no_remaining_key_opens(
    pg_engine: Engine, postgres: PostgresServer
) -> None:
    """PostgreSQL keeps deleted rows as dead tuples, in freed page space and in its write-ahead log. What it keeps
    of an erased account is sealed, and once the KEK version that wrapped the account's data key is retired (the
    README's procedure: rotate, rewrap, retire), no key the broker holds opens any of it."""
    engine = pg_engine
    v1 = new_keyring(1)
    store = Store(engine, v1)
    password, refresh_token = canary("pw"), canary("rt")
    email, imap_host = canary("email") + "@example.test", canary("imap") + ".example.test"
    profile = AccountProfile(
        email_address=email,
        username=canary("user"),
        imap_server=MailServer(imap_host, 993, TransportSecurity.IMPLICIT_TLS),
        smtp_server=None,
    )
    account, bystander = make_account(profile=profile), make_account()
    store.create_account(account, {"imap_password": password.encode(), "refresh_token": refresh_token.encode()})
    store.create_account(bystander, {"imap_password": b"bystander"})
    wrapped = raw_value(engine, data_keys.c.wrapped, account.id)
    sealed_password = raw_value(engine, account_secrets.c.imap_password, account.id)

    assert store.delete_account(account.id)
    assert checkpoint_and_vacuum(engine)
    disk = postgres.disk_bytes(engine.url.database or "")

    plaintext = [*encodings(password), *encodings(refresh_token), email.encode(), imap_host.encode()]
    assert [i for i, value in enumerate(plaintext) if value in disk] == [], "plaintext (by index) on disk"
    # The wrapped data key survives somewhere (the WAL at least): this is why the KEK has to be retired.
    assert wrapped in disk, "the scan does not see the write-ahead log"
    # Until then, the v1 KEK still opens it: erasure on PostgreSQL is complete only after retirement.
    dek = unwrap_data_key(v1, account.id, 1, wrapped)
    assert len(dek) == 32

    # Rotate: v2 becomes current, every live data key is rewrapped, then v1 is retired (deleted from the file).
    v1_v2 = Keyring(current_version=2, keys={1: v1.kek(1), 2: secrets.token_bytes(32)})
    assert rewrap_data_keys(engine, v1_v2) == 1  # the bystander only: the erased account has no row left
    v2 = Keyring(current_version=2, keys={2: v1_v2.kek(2)})
    with pytest.raises(KeyringError):
        unwrap_data_key(v2, account.id, 1, wrapped)
    with pytest.raises(DecryptionError):
        unwrap_data_key(v2, account.id, 2, wrapped)
    assert Store(engine, v2).read_secret(bystander.id, "imap_password") == b"bystander"
    assert sealed_password != password.encode()


@pytest.mark.parametrize(
    "url",
    [
        "mysql://user:canary-store-password@127.0.0.1/db",
        "postgresql+asyncpg://user:canary-store-password@127.0.0.1/db",
        "not a url canary-store-password",
    ],
)
def test_an_unsupported_store_url_is_a_configuration_error_that_does_not_repeat_it(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        create_engine(url)
    assert "canary-store-password" not in str(caught.value)


def test_an_unreachable_database_is_a_configuration_error_naming_neither_host_nor_password() -> None:
    engine = create_engine("postgresql://user:canary-store-password@127.0.0.1:1/db")
    try:
        with pytest.raises(ConfigurationError) as caught:
            upgrade(engine)
    finally:
        engine.dispose()
    assert "canary-store-password" not in str(caught.value)
    assert "127.0.0.1" not in str(caught.value)


def test_a_token_too_long_for_a_notify_does_not_cost_the_refresh(pg_engine: Engine) -> None:
    """A refresh stores its rotated refresh token even when the access token cannot be shared (PostgreSQL refuses
    NOTIFY payloads of 8,000 bytes): the transaction must not fail with it."""
    engine = pg_engine
    store = Store(engine, new_keyring(1))
    account = make_account()
    store.create_account(account, {"refresh_token": b"old"})
    for access_token in ("short", "x" * 20_000):
        with store.refresh_lease(account.id) as lease:
            assert lease.shared
            lease.save(f"rotated-{len(access_token)}".encode(), access_token, T0 + timedelta(hours=1))
        assert store.read_secret(account.id, "refresh_token") == f"rotated-{len(access_token)}".encode()
    with store.refresh_lease(account.id) as lease:
        assert lease.generation == 2


def test_idempotency_records_past_their_retention_are_purged(store: Store, clock: Clock) -> None:
    account = make_account()
    store.create_account(account, {})
    clock.now = T0
    assert store.claim_request(account.id, "old", "f") is None
    store.complete_request(account.id, "old", "f", {"internet_message_id": "<old@x>"})
    clock.now = T0 + timedelta(hours=23)
    assert store.claim_request(account.id, "new", "f") is None  # pending: purged by age all the same once old
    assert store.purge_requests(T0 + timedelta(hours=1)) == 1
    assert store.claim_request(account.id, "old", "f") is None  # forgotten: a retry would send again
    replay = store.claim_request(account.id, "new", "f")
    assert replay is not None and replay["state"] == "pending"
    assert store.purge_requests(T0 + timedelta(days=2)) == 2


def test_a_refresh_lease_held_elsewhere_is_waited_for_only_until_the_deadline(pg_engine: Engine) -> None:
    """Two replicas: the second waits on the first's row lock, but not past its caller's deadline."""
    engine = pg_engine
    store = Store(engine, new_keyring(1))
    account = make_account()
    store.create_account(account, {"refresh_token": b"rt"})
    with store.refresh_lease(account.id) as held:
        assert held.shared
        with pytest.raises(DeadlineExceeded) as caught, store.refresh_lease(account.id, wait_seconds=0.2):
            pass
        assert caught.value.reason == "TOKEN_REFRESH_BUSY"
    with store.refresh_lease(account.id, wait_seconds=0.2) as free:  # released: no wait at all
        assert free.refresh_token == b"rt"


def test_a_refresh_that_raced_a_new_consent_does_not_overwrite_it(store: Store, db_path: Path) -> None:
    """SQLite takes no lock for a refresh: a consent landing during the token endpoint call must win, or the
    account would show the new capabilities while holding the old grant's refresh token."""
    account = make_account()
    store.create_account(account, {"refresh_token": b"grant-1"})
    with store.refresh_lease(account.id) as lease:
        assert lease.refresh_token == b"grant-1"
        store.replace_grant(account.id, b"grant-2-with-send", frozenset({Capability.SEND}))
        assert lease.save(b"grant-1-rotated", "access", T0 + timedelta(hours=1)) is None
    assert store.read_secret(account.id, "refresh_token") == b"grant-2-with-send"
    with store.refresh_lease(account.id) as lease:  # the next refresh uses the new grant, and saves
        assert lease.save(b"grant-2-rotated", "access", T0 + timedelta(hours=1)) == lease.generation + 1
    assert store.read_secret(account.id, "refresh_token") == b"grant-2-rotated"


def test_a_rotated_refresh_token_survives_a_failed_commit_of_its_lease(pg_engine: Engine) -> None:
    """The provider has retired the old refresh token when the lease's COMMIT fails (a dropped connection): the
    new one is stored in a fresh transaction, not lost."""
    engine = pg_engine
    store = Store(engine, new_keyring(1))
    account = make_account()
    store.create_account(account, {"refresh_token": b"old"})
    failures = [sqlalchemy.exc.OperationalError("COMMIT", None, Exception("connection lost"))]

    def fail_once(_connection: Any) -> None:
        if failures:
            raise failures.pop()

    with store.refresh_lease(account.id) as lease:
        event.listen(engine, "commit", fail_once)
        assert lease.save(b"rotated", "access", T0 + timedelta(hours=1)) == 1
    event.remove(engine, "commit", fail_once)
    assert failures == []  # the COMMIT did fail
    assert store.read_secret(account.id, "refresh_token") == b"rotated"
    with store.refresh_lease(account.id) as lease:
        assert lease.generation == 1
