"""The store's data-access class: domain types in and out, every secret and personal value sealed on the way down.

Each account has its own random data key, wrapped by the keyring's current KEK (``data_keys``). The account's
profile and its secrets are sealed with that data key, with AAD naming table, column, account id and
``SCHEMA_VERSION``, so a ciphertext moved to another row or column does not open. Callers never see ciphertext.

Thread safety: the engine's pool hands each call its own connection; no connection is shared between threads.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, get_args

from sqlalchemy import Row, Select, delete, func, literal, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from server.crypto.aead import open_sealed, seal
from server.crypto.datakeys import new_data_key, secret_aad, unwrap_data_key, wrap_data_key
from server.crypto.keyring import Keyring
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
from server.errors import AlreadyExists, DeadlineExceeded, NotFound
from server.store import account_cache, audit, fleet
from server.store.audit_anchor import AuditAnchor
from server.store.engine import WRITE_INTENT
from server.store.ids import new_event_id
from server.store.schema import (
    SCHEMA_VERSION,
    UTCDateTime,
    account_secrets,
    accounts,
    consents,
    data_keys,
    feed_cursors,
    idempotency_records,
    oauth_states,
)

log = logging.getLogger("mailbroker.store")

SecretColumn = Literal["imap_password", "refresh_token", "token_cache"]
SECRET_COLUMNS: Final = frozenset(get_args(SecretColumn))
# PostgreSQL's SQLSTATE when lock_timeout runs out.
LOCK_NOT_AVAILABLE: Final = "55P03"


class RefreshLease:
    """What :meth:`Store.refresh_lease` hands out: the refresh token as stored, the refresh generation, and
    :meth:`save` for the outcome of the refresh."""

    def __init__(
        self,
        store: Store,
        connection: Connection | None,
        account_id: str,
        dek: bytes,
        refresh_token: bytes | None,
        generation: int,
        refreshed_ago: timedelta | None,
    ) -> None:
        self._store = store
        self._connection = connection
        self.account_id = account_id
        self.dek = dek
        self.refresh_token = refresh_token
        self.generation = generation
        # How long ago the last refresh was, by one clock: the database's on PostgreSQL (replicas' clocks differ).
        self.refreshed_ago = refreshed_ago
        self.announcement: fleet.Token | None = None  # sent to the other replicas once the lease has committed
        self.pending: tuple[bytes | None, str, datetime] | None = None

    @property
    def shared(self) -> bool:
        """Whether other replicas may refresh this account too (and will hear of this refresh)."""
        return self._connection is not None

    def save(self, refresh_token: bytes | None, access_token: str, expire_time: datetime) -> int | None:
        """Store a rotated refresh token (None: unchanged) and bump the generation; on PostgreSQL, once the lease
        commits, send the new access token sealed with the account's data key to the other replicas. Returns the
        new generation, or None when a new consent replaced the grant since the lease was taken (nothing stored).

        The access token itself is never written to a table: it travels in a NOTIFY, which PostgreSQL does not
        log, and only as ciphertext under the account's data key.
        """
        if self._connection is not None:
            self.pending = (refresh_token, access_token, expire_time)  # kept in case the lease's COMMIT fails
            return self._store._save_refresh(self._connection, self, refresh_token, access_token, expire_time)
        with self._store._writer.begin() as connection:
            return self._store._save_refresh(connection, self, refresh_token, access_token, expire_time)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Store:
    """Synchronous, thread-safe access to accounts, their secrets and the audit log."""

    def __init__(
        self,
        engine: Engine,
        keyring: Keyring,
        *,
        clock: Callable[[], datetime] = _utcnow,
        audit_anchor: AuditAnchor | None = None,
        account_cache_seconds: float = account_cache.DEFAULT_TTL,
    ) -> None:
        self._engine = engine
        # Every write goes through _writer, which empties the cache of opened accounts afterwards.
        self._accounts = account_cache.AccountCache(account_cache_seconds)
        self._writer = account_cache.Writes(engine.execution_options(**{WRITE_INTENT: True}), self._accounts)
        self._keyring = keyring
        self._clock = clock
        self._audit_lock = threading.Lock()
        self._audit_anchor = audit_anchor

    @property
    def keyring(self) -> Keyring:
        return self._keyring

    # Accounts

    def create_account(self, account: Account, secrets: Mapping[str, bytes]) -> None:
        """Store a new account with a fresh data key, its sealed profile and sealed secrets, all or nothing.

        Raises AlreadyExists if the id is taken, ValueError for a secret name that is not a secret column.
        """
        _check_columns(secrets)
        dek = new_data_key()
        kek_version, wrapped = wrap_data_key(self._keyring, account.id, dek)
        profile = seal(
            dek, _profile_to_json(account.profile), secret_aad("accounts", "profile", account.id, SCHEMA_VERSION)
        )
        sealed = {column: _seal_secret(dek, account.id, column, value) for column, value in secrets.items()}
        needs_reauth_since = account.update_time if account.state is AccountState.NEEDS_REAUTH else None
        try:
            with self._writer.begin() as connection:
                connection.execute(
                    accounts.insert().values(
                        id=account.id,
                        tenant=account.tenant,
                        provider=account.provider.value,
                        state=account.state.value,
                        capabilities=_capabilities_to_text(account.capabilities),
                        profile=profile,
                        create_time=account.create_time,
                        update_time=account.update_time,
                        needs_reauth_since=needs_reauth_since,
                    )
                )
                connection.execute(
                    data_keys.insert().values(
                        account_id=account.id, kek_version=kek_version, wrapped=wrapped, create_time=account.create_time
                    )
                )
                connection.execute(
                    account_secrets.insert().values(account_id=account.id, update_time=account.create_time, **sealed)
                )
        except IntegrityError:
            # Every key written here is the new account's id, so a constraint failure means the id is taken.
            raise AlreadyExists("account already exists") from None

    def get_account(self, tenant: str, account_id: str) -> Account | None:
        """Return the account if it exists and belongs to ``tenant``; None otherwise (never say which)."""
        generation = self._accounts.generation
        query = _account_query().where(accounts.c.id == account_id, accounts.c.tenant == tenant)
        with self._engine.connect() as connection:
            row = connection.execute(query).one_or_none()
        if row is None:
            return None
        account = self._account_from_row(row)
        self._accounts.put(account, generation)
        return account

    def cached_account(self, tenant: str, account_id: str) -> Account | None:
        """Non-blocking (no I/O, safe on the event loop): what ``get_account`` returned within the last
        ``account_cache_seconds`` with no write since; None means ask ``get_account``."""
        return self._accounts.get(tenant, account_id)

    def list_accounts(self, tenant: str, page_size: int, after_id: str | None = None) -> list[Account]:
        """Return up to ``page_size`` of the tenant's accounts ordered by id, starting after ``after_id``."""
        _check_page_size(page_size)
        query = _account_query().where(accounts.c.tenant == tenant).order_by(accounts.c.id).limit(page_size)
        if after_id is not None:
            query = query.where(accounts.c.id > after_id)
        with self._engine.connect() as connection:
            rows = connection.execute(query).all()
        return [self._account_from_row(row) for row in rows]

    def update_account_state(self, account_id: str, state: AccountState) -> bool:
        """Set the account's state; return whether the account exists.

        ``needs_reauth_since`` keeps the time the account first needed re-authorisation and clears on ACTIVE.
        """
        now = self._clock()
        since: Any = (
            func.coalesce(accounts.c.needs_reauth_since, literal(now, UTCDateTime()))
            if state is AccountState.NEEDS_REAUTH
            else None
        )
        statement = (
            update(accounts)
            .where(accounts.c.id == account_id)
            .values(state=state.value, needs_reauth_since=since, update_time=now)
        )
        with self._writer.begin() as connection:
            return connection.execute(statement).rowcount > 0

    def update_capabilities(self, account_id: str, capabilities: frozenset[Capability]) -> bool:
        """Replace the account's granted capabilities; return whether the account exists."""
        statement = (
            update(accounts)
            .where(accounts.c.id == account_id)
            .values(capabilities=_capabilities_to_text(capabilities), update_time=self._clock())
        )
        with self._writer.begin() as connection:
            return connection.execute(statement).rowcount > 0

    def delete_account(self, account_id: str) -> bool:
        """Delete the account and every row about it (audit events aside); return whether it existed.

        Rows are deleted explicitly rather than only by ON DELETE CASCADE, so erasure does not hang on the
        backend enforcing foreign keys. Run ``checkpoint_and_vacuum`` afterwards to clear the bytes from disk.
        """
        with self._writer.begin() as connection:
            for table in (idempotency_records, feed_cursors, consents, account_secrets, data_keys, oauth_states):
                connection.execute(delete(table).where(table.c.account_id == account_id))
            existed = connection.execute(delete(accounts).where(accounts.c.id == account_id)).rowcount > 0
        self._announce(fleet.Erased(account_id))  # the other replicas end its feeds and drop its tokens
        return existed

    def accounts_needing_reauth_since(self, cutoff: datetime) -> list[tuple[str, str]]:
        """Return (tenant, account id) of every account NEEDS_REAUTH since ``cutoff`` or earlier (auto-erasure)."""
        query = (
            select(accounts.c.tenant, accounts.c.id)
            .where(
                accounts.c.state == AccountState.NEEDS_REAUTH.value,
                accounts.c.needs_reauth_since.is_not(None),
                accounts.c.needs_reauth_since <= cutoff,
            )
            .order_by(accounts.c.id)
        )
        with self._engine.connect() as connection:
            return [(row.tenant, row.id) for row in connection.execute(query)]

    # Secrets

    def read_secret(self, account_id: str, column: SecretColumn) -> bytes | None:
        """Return the decrypted secret, or None if the account or the value is absent.

        Raises DecryptionError if the stored value was not sealed for this account and column.
        """
        _check_columns([column])
        query = (
            select(account_secrets.c[column].label("value"), data_keys.c.kek_version, data_keys.c.wrapped)
            .join(data_keys, data_keys.c.account_id == account_secrets.c.account_id)
            .where(account_secrets.c.account_id == account_id)
        )
        with self._engine.connect() as connection:
            row = connection.execute(query).one_or_none()
        if row is None or row.value is None:
            return None
        dek = unwrap_data_key(self._keyring, account_id, row.kek_version, row.wrapped)
        return open_sealed(dek, row.value, secret_aad("account_secrets", column, account_id, SCHEMA_VERSION))

    def write_secret(self, account_id: str, column: SecretColumn, value: bytes | None) -> None:
        """Seal and store ``value`` in the account's secret ``column`` (None clears it); NotFound if no account."""
        _check_columns([column])
        with self._writer.begin() as connection:
            key_row = connection.execute(
                select(data_keys.c.kek_version, data_keys.c.wrapped).where(data_keys.c.account_id == account_id)
            ).one_or_none()
            if key_row is None:
                raise NotFound("account not found")
            sealed = None
            if value is not None:
                dek = unwrap_data_key(self._keyring, account_id, key_row.kek_version, key_row.wrapped)
                sealed = _seal_secret(dek, account_id, column, value)
            connection.execute(
                update(account_secrets)
                .where(account_secrets.c.account_id == account_id)
                .values({column: sealed, "update_time": self._clock()})
            )

    # Token refresh, single-flight across replicas

    @contextmanager
    def refresh_lease(self, account_id: str, wait_seconds: float | None = None) -> Iterator[RefreshLease]:
        """Hold the right to refresh the account's access token for the block.

        On PostgreSQL the account's ``account_secrets`` row stays locked (``SELECT ... FOR UPDATE``) until the
        block ends, so replicas refresh one at a time and each reads the refresh token its predecessor stored:
        a rotated token is never lost or used twice. On SQLite (one process) nothing is locked here: the caller
        already refreshes single-flight in its process, and a write lock held across an HTTP call would stall
        every other write. Raises NotFound if the account is gone; with ``wait_seconds``, DeadlineExceeded when
        another replica holds the lease longer than that (a fixed bound: the refresh is shared by its callers).
        """
        shared = self._engine.dialect.name == "postgresql"
        query = (
            select(
                account_secrets.c.refresh_token,
                account_secrets.c.token_generation,
                account_secrets.c.token_refresh_time,
                data_keys.c.kek_version,
                data_keys.c.wrapped,
            )
            .join(data_keys, data_keys.c.account_id == account_secrets.c.account_id)
            .where(account_secrets.c.account_id == account_id)
        )
        if shared:
            since = func.clock_timestamp() - account_secrets.c.token_refresh_time
            query = query.add_columns(since.label("refreshed_ago")).with_for_update(of=account_secrets)
        lease: RefreshLease | None = None
        body_done = False
        try:
            with self._writer.begin() if shared else nullcontext(None) as locked:
                lease = self._open_lease(locked, query, account_id, wait_seconds)
                yield lease
                body_done = True
        except DBAPIError:
            # The provider has answered and may have retired the old refresh token, but the lease's transaction
            # failed (the connection dropped, the server restarted): store its answer in a fresh transaction,
            # unless a new consent or another replica's refresh has moved the generation on meanwhile. A failure
            # inside the block is still raised to the caller once the token is safe; one at COMMIT is not.
            if lease is None or lease.pending is None:
                raise
            with self._writer.begin() as connection:
                if self._save_refresh(connection, lease, *lease.pending) is None or not body_done:
                    raise
        # Committed: now tell the other replicas, outside the transaction, so that a NOTIFY that fails (a full
        # queue) can never roll back the refresh token the provider has already rotated.
        if lease is not None and lease.announcement is not None:
            self._announce(lease.announcement)

    def _open_lease(
        self, locked: Connection | None, query: Select[Any], account_id: str, wait_seconds: float | None
    ) -> RefreshLease:
        if locked is None:
            with self._engine.connect() as connection:
                row = connection.execute(query).one_or_none()
        else:
            # The lease is an idle transaction for as long as the token endpoint takes: a server-side idle
            # timeout must not end it (another replica would then read and use the same refresh token).
            locked.exec_driver_sql("SET LOCAL idle_in_transaction_session_timeout = 0")
            if wait_seconds is not None:
                milliseconds = max(1, int(wait_seconds * 1000))
                locked.exec_driver_sql(f"SET LOCAL lock_timeout = {milliseconds}")
            try:
                row = locked.execute(query).one_or_none()
            except OperationalError as exc:
                if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                    raise
                raise DeadlineExceeded(
                    "another replica is refreshing the account's token", reason="TOKEN_REFRESH_BUSY"
                ) from None
            # Only the wait for the lease is bounded: the save and its COMMIT must not time out once the
            # provider has rotated the refresh token.
            locked.exec_driver_sql("SET LOCAL lock_timeout = 0")
        if row is None:
            raise NotFound("account not found", reason="ACCOUNT_NOT_FOUND")
        dek = unwrap_data_key(self._keyring, account_id, row.kek_version, row.wrapped)
        refresh_token = (
            None
            if row.refresh_token is None
            else open_sealed(
                dek, row.refresh_token, secret_aad("account_secrets", "refresh_token", account_id, SCHEMA_VERSION)
            )
        )
        if locked is not None:
            refreshed_ago = row.refreshed_ago
        else:
            refreshed_ago = None if row.token_refresh_time is None else self._clock() - row.token_refresh_time
        return RefreshLease(self, locked, account_id, dek, refresh_token, row.token_generation, refreshed_ago)

    def _save_refresh(
        self,
        connection: Connection,
        lease: RefreshLease,
        refresh_token: bytes | None,
        access_token: str,
        expire_time: datetime,
    ) -> int | None:
        generation = lease.generation + 1
        now = func.clock_timestamp() if lease.shared else self._clock()  # the clock refreshed_ago is read by
        values: dict[str, object] = {"token_generation": generation, "token_refresh_time": now}
        if refresh_token is not None:
            values["refresh_token"] = _seal_secret(lease.dek, lease.account_id, "refresh_token", refresh_token)
            values["update_time"] = self._clock()
        # Only if nothing replaced the grant since the lease was taken (SQLite takes no lock: a new consent may
        # have landed meanwhile, and its refresh token must win over the old grant's rotated one).
        statement = (
            update(account_secrets)
            .where(
                account_secrets.c.account_id == lease.account_id, account_secrets.c.token_generation == lease.generation
            )
            .values(values)
        )
        if connection.execute(statement).rowcount != 1:
            return None
        lease.announcement = fleet.seal_token(lease.dek, lease.account_id, generation, access_token, expire_time)
        return generation

    def _announce(self, message: fleet.Message) -> None:
        """Tell the other replicas (PostgreSQL only), best effort: they fall back on refreshing, or on the account
        cache's TTL and their reconciliation, when a notice does not arrive."""
        if self._engine.dialect.name != "postgresql":
            return
        try:
            with self._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                fleet.send(connection, message, self._keyring)
        except Exception as exc:
            log.warning(
                "could not notify the other replicas",
                extra={"component": "fleet", "event": "fleet_notify_failed", "reason": type(exc).__name__},
            )

    def open_token(self, message: fleet.Token) -> tuple[str, datetime] | None:
        """The access token and expiry another replica sent, or None if the account is gone or it does not open."""
        query = select(data_keys.c.kek_version, data_keys.c.wrapped).where(data_keys.c.account_id == message.account_id)
        with self._engine.connect() as connection:
            row = connection.execute(query).one_or_none()
        if row is None:
            return None
        dek = unwrap_data_key(self._keyring, message.account_id, row.kek_version, row.wrapped)
        return fleet.open_token(dek, message)

    def existing_account_ids(self, account_ids: Iterable[str]) -> set[str]:
        """Those of ``account_ids`` that still exist (any tenant)."""
        wanted = list(account_ids)
        if not wanted:
            return set()
        with self._engine.connect() as connection:
            return set(connection.scalars(select(accounts.c.id).where(accounts.c.id.in_(wanted))))

    def forget_cached_accounts(self) -> None:
        """Empty this process's cache of opened accounts (another replica changed or erased one)."""
        self._accounts.clear()

    # OAuth (BeginOAuth / CompleteOAuth): states, grants, consent records

    def put_oauth_state(
        self,
        state_id: str,
        *,
        tenant: str,
        caller: str,
        provider: Provider,
        account_id: str | None,
        payload: bytes,
        expire_time: datetime,
    ) -> None:
        """Keep a pending authorization, its payload (PKCE verifier, flow) sealed with the current KEK."""
        version, kek = self._keyring.current()
        sealed = seal(kek, payload, secret_aad("oauth_states", "payload", state_id, version))
        with self._writer.begin() as connection:
            connection.execute(delete(oauth_states).where(oauth_states.c.expire_time < self._clock()))
            connection.execute(
                oauth_states.insert().values(
                    id=state_id,
                    tenant=tenant,
                    caller=caller,
                    provider=provider.value,
                    account_id=account_id,
                    kek_version=version,
                    payload=sealed,
                    create_time=self._clock(),
                    expire_time=expire_time,
                )
            )

    def take_oauth_state(self, state_id: str, tenant: str, caller: str) -> dict[str, Any] | None:
        """Remove and return the caller's pending authorization ``{"provider", "account_id", "payload",
        "expire_time"}`` (single use); None when there is none for this tenant and caller."""
        with self._writer.begin() as connection:
            row = connection.execute(
                select(oauth_states).where(
                    oauth_states.c.id == state_id, oauth_states.c.tenant == tenant, oauth_states.c.caller == caller
                )
            ).one_or_none()
            if row is None:
                return None
            if connection.execute(delete(oauth_states).where(oauth_states.c.id == state_id)).rowcount != 1:
                return None  # another call took it first
        payload = open_sealed(
            self._keyring.kek(row.kek_version),
            row.payload,
            secret_aad("oauth_states", "payload", state_id, row.kek_version),
        )
        return {
            "provider": Provider(row.provider),
            "account_id": row.account_id,
            "payload": payload,
            "expire_time": row.expire_time,
        }

    def replace_grant(self, account_id: str, refresh_token: bytes, capabilities: frozenset[Capability]) -> bool:
        """A new consent for an existing account: its refresh token, capabilities and ACTIVE state, all at once.
        Returns whether the account exists."""
        now = self._clock()
        with self._writer.begin() as connection:
            dek = self._data_key(connection, account_id)
            connection.execute(
                update(account_secrets)
                .where(account_secrets.c.account_id == account_id)
                .values(
                    refresh_token=_seal_secret(dek, account_id, "refresh_token", refresh_token),
                    update_time=now,
                    # A new grant moves the generation on, so a refresh of the old grant in flight cannot overwrite
                    # it (Store.refresh_lease), and no replica waits for a token of this generation.
                    token_generation=account_secrets.c.token_generation + 1,
                    token_refresh_time=None,
                )
            )
            existed = (
                connection.execute(
                    update(accounts)
                    .where(accounts.c.id == account_id)
                    .values(
                        capabilities=_capabilities_to_text(capabilities),
                        state=AccountState.ACTIVE.value,
                        needs_reauth_since=None,
                        update_time=now,
                    )
                ).rowcount
                > 0
            )
        # The other replicas drop the token and connections they hold, which carry the old grant's scopes.
        self._announce(fleet.Regranted(account_id))
        return existed

    def record_consent(
        self,
        account_id: str,
        tenant: str,
        provider: Provider,
        scopes: Iterable[str],
        capabilities: frozenset[Capability],
        grant_time: datetime,
    ) -> None:
        """Record what the user granted, and when (scopes are the provider's public names: no personal data)."""
        with self._writer.begin() as connection:
            connection.execute(
                consents.insert().values(
                    id=new_event_id(),
                    account_id=account_id,
                    tenant=tenant,
                    provider=provider.value,
                    scopes=" ".join(sorted(scopes)),
                    capabilities=_capabilities_to_text(capabilities),
                    grant_time=grant_time,
                )
            )

    # Idempotency (SendMessage request_id, AIP-155)

    def claim_request(self, account_id: str, request_digest: str, fingerprint: str) -> dict[str, Any] | None:
        """Record a request as in flight, or return the record already there: ``{"fingerprint", "state",
        "result"}`` with state ``pending`` or ``done``. None means the caller now owns the request."""
        try:
            return self._claim_request(account_id, request_digest, fingerprint)
        except IntegrityError:
            # PostgreSQL, several replicas: another one inserted the same request between our read and our insert
            # (SQLite's BEGIN IMMEDIATE rules that out). Its record is there now.
            return self._claim_request(account_id, request_digest, fingerprint)

    def _claim_request(self, account_id: str, request_digest: str, fingerprint: str) -> dict[str, Any] | None:
        aad = secret_aad("idempotency_records", "result", account_id, SCHEMA_VERSION)
        with self._writer.begin() as connection:
            dek = self._data_key(connection, account_id)
            row = connection.execute(
                select(idempotency_records.c.result).where(
                    idempotency_records.c.account_id == account_id,
                    idempotency_records.c.request_digest == request_digest,
                )
            ).one_or_none()
            if row is not None:
                record: dict[str, Any] = json.loads(open_sealed(dek, row.result, aad))
                return record
            pending = {"fingerprint": fingerprint, "state": "pending", "result": None}
            connection.execute(
                idempotency_records.insert().values(
                    account_id=account_id,
                    request_digest=request_digest,
                    result=seal(dek, json.dumps(pending).encode(), aad),
                    create_time=self._clock(),
                )
            )
        return None

    def complete_request(
        self, account_id: str, request_digest: str, fingerprint: str, result: Mapping[str, object]
    ) -> None:
        """Store the result of a request this caller claimed, so a retry gets it back instead of a second send."""
        aad = secret_aad("idempotency_records", "result", account_id, SCHEMA_VERSION)
        done = {"fingerprint": fingerprint, "state": "done", "result": dict(result)}
        with self._writer.begin() as connection:
            dek = self._data_key(connection, account_id)
            connection.execute(
                update(idempotency_records)
                .where(
                    idempotency_records.c.account_id == account_id,
                    idempotency_records.c.request_digest == request_digest,
                )
                .values(result=seal(dek, json.dumps(done).encode(), aad))
            )

    def purge_requests(self, created_before: datetime) -> int:
        """Forget idempotency records made before ``created_before`` (done or not); return how many."""
        with self._writer.begin() as connection:
            statement = delete(idempotency_records).where(idempotency_records.c.create_time < created_before)
            return int(connection.execute(statement).rowcount or 0)

    def release_request(self, account_id: str, request_digest: str) -> None:
        """Forget a claimed request that failed before anything was sent, so a retry may try again."""
        with self._writer.begin() as connection:
            connection.execute(
                delete(idempotency_records).where(
                    idempotency_records.c.account_id == account_id,
                    idempotency_records.c.request_digest == request_digest,
                )
            )

    def _data_key(self, connection: Connection, account_id: str) -> bytes:
        row = connection.execute(
            select(data_keys.c.kek_version, data_keys.c.wrapped).where(data_keys.c.account_id == account_id)
        ).one_or_none()
        if row is None:
            raise NotFound("account not found", reason="ACCOUNT_NOT_FOUND")
        return unwrap_data_key(self._keyring, account_id, row.kek_version, row.wrapped)

    # Audit

    def append_audit_event(
        self, action: str, tenant: str, actor: str, account_id: str, details: Mapping[str, object]
    ) -> AuditEvent:
        """Append a PII-free event to the hash-chained audit log and return it as stored (and anchored, if set)."""
        with self._audit_lock:
            with self._writer.begin() as connection:
                event = audit.append_event(
                    connection,
                    event_id=new_event_id(),
                    event_time=self._clock(),
                    action=action,
                    tenant=tenant,
                    actor=actor,
                    account_id=account_id,
                    details=details,
                )
            if self._audit_anchor is not None:  # after the commit: an anchor never points past the log
                self._audit_anchor.record(event.sequence, event.digest)
            return event

    def list_audit_events(
        self, tenant: str | None, account_id: str | None, page_size: int, after_sequence: int | None = None
    ) -> list[AuditEvent]:
        """Return up to ``page_size`` audit events after ``after_sequence``, optionally of one tenant or account."""
        _check_page_size(page_size)
        with self._engine.connect() as connection:
            return audit.list_events(connection, tenant, account_id, page_size, after_sequence)

    def verify_audit_chain(self) -> int | None:
        """Return the sequence of the first audit event that breaks the hash chain, or None if it is intact."""
        with self._engine.connect() as connection:
            return audit.first_broken_link(connection)

    # Helpers

    def _account_from_row(self, row: Row[Any]) -> Account:
        dek = unwrap_data_key(self._keyring, row.id, row.kek_version, row.wrapped)
        profile = open_sealed(dek, row.profile, secret_aad("accounts", "profile", row.id, SCHEMA_VERSION))
        return Account(
            id=row.id,
            tenant=row.tenant,
            provider=Provider(row.provider),
            state=AccountState(row.state),
            capabilities=frozenset(Capability(value) for value in row.capabilities.split(",") if value),
            profile=_profile_from_json(profile),
            create_time=row.create_time,
            update_time=row.update_time,
        )


def _account_query() -> Select[Any]:
    return select(accounts, data_keys.c.kek_version, data_keys.c.wrapped).join(
        data_keys, data_keys.c.account_id == accounts.c.id
    )


def _check_columns(columns: Iterable[str]) -> None:
    unknown = set(columns) - SECRET_COLUMNS
    if unknown:
        raise ValueError(f"not a secret column: {', '.join(sorted(unknown))}")


def _check_page_size(page_size: int) -> None:
    if page_size < 1:
        raise ValueError("page_size must be at least 1")


def _seal_secret(dek: bytes, account_id: str, column: str, value: bytes) -> bytes:
    return seal(dek, value, secret_aad("account_secrets", column, account_id, SCHEMA_VERSION))


def _capabilities_to_text(capabilities: frozenset[Capability]) -> str:
    return ",".join(sorted(capability.value for capability in capabilities))


def _profile_to_json(profile: AccountProfile) -> bytes:
    def server(mail_server: MailServer | None) -> dict[str, object] | None:
        if mail_server is None:
            return None
        return {"host": mail_server.host, "port": mail_server.port, "security": mail_server.security.value}

    document = {
        "email_address": profile.email_address,
        "username": profile.username,
        "imap_server": server(profile.imap_server),
        "smtp_server": server(profile.smtp_server),
    }
    if profile.subject:
        document["subject"] = profile.subject
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _profile_from_json(data: bytes) -> AccountProfile:
    document = json.loads(data)

    def server(value: dict[str, Any] | None) -> MailServer | None:
        if value is None:
            return None
        return MailServer(host=value["host"], port=value["port"], security=TransportSecurity(value["security"]))

    return AccountProfile(
        email_address=document.get("email_address", ""),
        username=document.get("username", ""),
        imap_server=server(document.get("imap_server")),
        smtp_server=server(document.get("smtp_server")),
        subject=document.get("subject", ""),
    )
