"""Online key rotation: `mailbroker keys rotate` under a load of concurrent RPCs, `keys status`, `keys retire`."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sqlite3
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import resources_pb2 as rpb

from server.crypto.datakeys import unwrap_data_key
from server.crypto.keyring import KeyFileKeyring, KeyringError, add_key_version, load_keyring
from tests.broker import RunningBroker, broker_config, error_reason, running_broker, seed_account, stubs
from tests.integration import operator_cli
from tests.pki import TestPki

ACCOUNTS = 500
WORKERS = 8
CALLS_BEFORE = 200  # the load is well under way before the rotation starts
CALLS_AFTER = 200  # and keeps going after it, on the new keys


def _database(broker: RunningBroker) -> Path:
    return Path(broker.config.store_url.removeprefix("sqlite:///"))


def _data_keys_by_version(database: Path) -> dict[int, int]:
    connection = sqlite3.connect(database)
    try:
        return dict(connection.execute("SELECT kek_version, count(*) FROM data_keys GROUP BY kek_version").fetchall())
    finally:
        connection.close()


def _wrapped(database: Path, account_id: str) -> tuple[int, bytes]:
    connection = sqlite3.connect(database)
    try:
        row = connection.execute(
            "SELECT kek_version, wrapped FROM data_keys WHERE account_id = ?", (account_id,)
        ).fetchone()
    finally:
        connection.close()
    return int(row[0]), bytes(row[1])


def _token_version(token: str) -> int:
    """The KEK version an opaque token was sealed with (its first four bytes): which key the broker holds current."""
    blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    return int.from_bytes(blob[:4], "big")


class Load:
    """WORKERS callers looping over GetAccount, paged ListAccounts and ListAuditEvents; every outcome counted."""

    def __init__(self, broker: RunningBroker, account_ids: list[str]) -> None:
        self.broker = broker
        self.account_ids = account_ids
        self.calls = 0
        self.failures: Counter[str] = Counter()
        self.progress = asyncio.Condition()
        self.stopping = False

    async def _count(self, failed: str | None) -> None:
        async with self.progress:
            self.calls += 1
            if failed is not None:
                self.failures[failed] += 1
            self.progress.notify_all()

    async def wait_for_calls(self, count: int) -> None:
        async with self.progress:
            await self.progress.wait_for(lambda: self.calls >= count or bool(self.failures))

    async def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        async with self.broker.channel(self.broker.pki.alice) as channel:
            accounts, _ = stubs(channel)
            token = ""
            while not self.stopping:
                choice = rng.random()
                try:
                    if choice < 0.5:
                        name = f"accounts/{rng.choice(self.account_ids)}"
                        await accounts.GetAccount(apb.GetAccountRequest(name=name), timeout=10)
                    elif choice < 0.9:
                        reply = await accounts.ListAccounts(
                            apb.ListAccountsRequest(page_size=25, page_token=token), timeout=10
                        )
                        token = reply.next_page_token  # tokens issued before the rotation are used after it
                    else:
                        await accounts.ListAuditEvents(apb.ListAuditEventsRequest(page_size=5), timeout=10)
                except grpc.aio.AioRpcError as error:
                    await self._count(f"{error.code().name}/{error_reason(error)}")
                else:
                    await self._count(None)


async def test_rotation_under_concurrent_load_fails_no_rpc_and_leaves_no_key_on_the_old_version(
    tmp_path: Path, pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = broker_config(tmp_path, pki)
    config_file = operator_cli.write_config(config, tmp_path / "mailbroker.toml")
    async with running_broker(config, pki) as broker:
        store = broker.store()
        account_ids = [seed_account(store, pki.alice.identity).id for _ in range(ACCOUNTS)]
        database = _database(broker)
        assert _data_keys_by_version(database) == {1: ACCOUNTS}
        old_wrapping = _wrapped(database, account_ids[0])
        async with broker.channel(pki.alice) as channel:
            accounts, _ = stubs(channel)
            old_token = (await accounts.ListAccounts(apb.ListAccountsRequest(page_size=10), timeout=5)).next_page_token
        assert _token_version(old_token) == 1

        load = Load(broker, account_ids)
        workers = [asyncio.create_task(load.worker(seed)) for seed in range(WORKERS)]
        try:
            await load.wait_for_calls(CALLS_BEFORE)
            before = load.calls
            rotated = await operator_cli.run_async(config_file, "keys", "rotate")
            during = load.calls - before
            await load.wait_for_calls(load.calls + CALLS_AFTER)
        finally:
            load.stopping = True
            await asyncio.gather(*workers)
        print(f"\nrotation: {during} RPCs while `keys rotate` ran, {load.calls} in all, failures {dict(load.failures)}")

        assert rotated.status == 0, rotated.stderr
        assert f"rewrapped {ACCOUNTS} data key(s) with version 2" in rotated.stdout
        assert during > 0
        assert dict(load.failures) == {}
        assert _data_keys_by_version(database) == {2: ACCOUNTS}
        assert _wrapped(database, account_ids[0])[0] == 2

        async with broker.channel(pki.alice) as channel:
            accounts, _ = stubs(channel)
            # The running broker learned the new current version: it seals new tokens with it...
            reply = await accounts.ListAccounts(apb.ListAccountsRequest(page_size=10), timeout=5)
            assert _token_version(reply.next_page_token) == 2
            # ...and still opens a token sealed before the rotation, since version 1 is not retired yet.
            await accounts.ListAccounts(apb.ListAccountsRequest(page_size=10, page_token=old_token), timeout=5)

            status = operator_cli.run(config_file, "keys", "status")
            assert status.status == 0
            assert _status_rows(status.stdout) == {1: (0, 0), 2: (ACCOUNTS, 0)}

            # A running broker looks at the key file at most once a second; what follows checks the state after it
            # has looked, without waiting a second for it.
            monkeypatch.setattr(KeyFileKeyring, "check_interval_seconds", 0.0)
            retired = operator_cli.run(config_file, "keys", "retire", "1")
            assert retired.status == 0, retired.stderr
            key_file = json.loads(config.keyring_file.read_text())
            assert [entry["version"] for entry in key_file["keys"]] == [2]

            # A retired version no longer decrypts: not the old wrapping of a data key, not a token sealed with it,
            # in the running broker as in a fresh process; everything wrapped by the new version still opens.
            with pytest.raises(KeyringError):
                unwrap_data_key(load_keyring(config.keyring_file, {}), account_ids[0], *old_wrapping)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await accounts.ListAccounts(apb.ListAccountsRequest(page_size=10, page_token=old_token), timeout=5)
            assert (caught.value.code(), error_reason(caught.value)) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_PAGE_TOKEN",
            )
            for account_id in account_ids:
                await accounts.GetAccount(apb.GetAccountRequest(name=f"accounts/{account_id}"), timeout=5)
            assert store.read_secret(account_ids[-1], "imap_password") == b"not-a-real-password"

        verified = operator_cli.run(config_file, "audit", "verify")  # the rotation and retirement are audited
        assert verified.status == 0, verified.stdout
        async with broker.channel(pki.bob) as channel:  # bob is an auditor
            accounts, _ = stubs(channel)
            events = await accounts.ListAuditEvents(apb.ListAuditEventsRequest(all_tenants=True), timeout=5)
            assert [e.action for e in events.audit_events] == [rpb.AUDIT_ACTION_KEY_ROTATED] * 2


def _status_rows(output: str) -> dict[int, tuple[int, int]]:
    rows = {}
    for line in output.splitlines():
        parts = line.split()
        if parts and parts[0].isdigit():
            rows[int(parts[0])] = (int(parts[1]), int(parts[2]))
    return rows


async def test_retire_refuses_the_current_version_and_any_version_still_in_use(tmp_path: Path, pki: TestPki) -> None:
    config = broker_config(tmp_path, pki)
    config_file = operator_cli.write_config(config, tmp_path / "mailbroker.toml")
    async with running_broker(config, pki) as broker:
        store = broker.store()
        account = seed_account(store, pki.alice.identity)
        database = _database(broker)

        refused = operator_cli.run(config_file, "keys", "retire", "1")
        assert refused.status == 1
        assert "is the current key" in refused.stderr

        add_key_version(config.keyring_file)  # a new version, but nothing rewrapped yet
        refused = operator_cli.run(config_file, "keys", "retire", "1")
        assert refused.status == 1
        assert "still wraps 1 data key(s)" in refused.stderr
        assert _status_rows(operator_cli.run(config_file, "keys", "status").stdout) == {1: (1, 0), 2: (0, 0)}

        # A pending OAuth flow sealed with version 1 holds it too, until it expires.
        now = datetime.now(UTC)
        _add_oauth_state(database, kek_version=1, expire=now + timedelta(minutes=10))
        assert operator_cli.run(config_file, "keys", "rotate").status == 0
        refused = operator_cli.run(config_file, "keys", "retire", "1")
        assert refused.status == 1
        assert "0 data key(s) and 1 pending OAuth state(s)" in refused.stderr
        assert 1 in {entry["version"] for entry in json.loads(config.keyring_file.read_text())["keys"]}

        _expire_oauth_states(database, now - timedelta(minutes=1))
        retired = operator_cli.run(config_file, "keys", "retire", "1")
        assert retired.status == 0, retired.stderr
        assert _status_rows(operator_cli.run(config_file, "keys", "status").stdout) == {2: (0, 0), 3: (1, 0)}
        async with broker.channel(pki.alice) as channel:
            accounts, _ = stubs(channel)
            await accounts.GetAccount(apb.GetAccountRequest(name=f"accounts/{account.id}"), timeout=5)


def _add_oauth_state(database: Path, *, kek_version: int, expire: datetime) -> None:
    connection = sqlite3.connect(database)
    try:
        with connection:
            connection.execute(
                "INSERT INTO oauth_states (id, tenant, caller, provider, account_id, kek_version, payload,"
                " create_time, expire_time) VALUES ('s1', 't', 'c', 'google', NULL, ?, x'00', ?, ?)",
                (kek_version, _sqlite_time(datetime.now(UTC)), _sqlite_time(expire)),
            )
    finally:
        connection.close()


def _expire_oauth_states(database: Path, when: datetime) -> None:
    connection = sqlite3.connect(database)
    try:
        with connection:
            connection.execute("UPDATE oauth_states SET expire_time = ?", (_sqlite_time(when),))
    finally:
        connection.close()


def _sqlite_time(when: datetime) -> str:
    """The format SQLAlchemy's SQLite DateTime stores (UTC, naive)."""
    return when.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


async def test_rotate_refuses_keys_from_the_environment(tmp_path: Path, pki: TestPki) -> None:
    import subprocess

    config = broker_config(tmp_path, pki)
    config_file = operator_cli.write_config(config, tmp_path / "mailbroker.toml")
    async with running_broker(config, pki) as broker:
        seed_account(broker.store(), pki.alice.identity)
    key = base64.b64encode(bytes(32)).decode()
    done = subprocess.run(  # noqa: ASYNC221 - the broker is stopped; nothing else runs on the loop
        [*operator_cli.MAILBROKER, "keys", "rotate", "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**operator_cli._environment(), "MAILBROKER_KEKS": f"1:{key}"},
        check=False,
    )
    assert done.returncode == 2
    assert "MAILBROKER_KEKS" in done.stderr
    assert key not in done.stderr + done.stdout
