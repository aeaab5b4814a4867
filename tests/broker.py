"""Helpers to run a real broker (grpc.aio, mTLS on 127.0.0.1) inside a test and to call it as a given client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from mailbroker.v1 import account_service_pb2_grpc, mail_service_pb2_grpc

from server import config as config_module
from server.app import Broker, start
from server.config import Config, ImapConfig, PolicyConfig, PolicyRule, ServerConfig, StoreConfig, TlsConfig
from server.crypto.keyring import generate_key_file, load_keyring
from server.domain.models import (
    Account,
    AccountProfile,
    AccountState,
    Capability,
    MailServer,
    Provider,
    TransportSecurity,
)
from server.store.engine import create_engine
from server.store.ids import new_account_id
from server.store.migrate import upgrade
from server.store.repository import Store
from tests.pki import PemPair, TestPki

# The local Dovecot, SMTP server and fake mail servers listen on loopback, which the SSRF guard refuses by default.
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")
LIMITED_METHODS = ("mailbroker.v1.AccountService/GetAccount", "mailbroker.v1.AccountService/ListAccounts")


def broker_config(tmp_path: Path, pki: TestPki, **server: Any) -> Config:
    """A config for a broker on a free loopback port: alice and bob may call anything, carol only two methods,
    mallory is unknown to the policy; IMAP and SMTP servers on loopback are allowed."""
    keys = tmp_path / "keys.json"
    if not keys.exists():
        generate_key_file(keys)
    return Config(
        data_dir=tmp_path,
        server=ServerConfig(listen="127.0.0.1:0", shutdown_grace_seconds=0.5, **server),
        tls=TlsConfig(cert=pki.server.cert, key=pki.server.key, client_ca=pki.ca),
        store=StoreConfig(url=f"sqlite:///{tmp_path / 'broker.db'}"),
        keys=config_module.KeysConfig(file=keys),
        imap=ImapConfig(allowed_networks=LOOPBACK_NETWORKS),
        policy=PolicyConfig(
            rules=(
                PolicyRule(identities=(pki.alice.identity, pki.bob.identity), methods=("*",)),
                PolicyRule(identities=(pki.carol.identity,), methods=LIMITED_METHODS),
            ),
            auditors=(pki.bob.identity,),
        ),
    )


@dataclass
class RunningBroker:
    broker: Broker
    config: Config
    pki: TestPki

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.broker.port}"

    def channel(self, client: PemPair | None, *, root: Path | None = None) -> grpc.aio.Channel:
        key, cert = client.key_cert_pair() if client else (None, None)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(root or self.pki.ca).read_bytes(), private_key=key, certificate_chain=cert
        )
        return grpc.aio.secure_channel(self.target, credentials)

    def store(self) -> Store:
        engine = create_engine(self.config.store_url)
        upgrade(engine)
        return Store(engine, load_keyring(self.config.keyring_file, {}))


@asynccontextmanager
async def running_broker(config: Config, pki: TestPki) -> AsyncIterator[RunningBroker]:
    broker = await start(config, environ={})
    try:
        yield RunningBroker(broker, config, pki)
    finally:
        await broker.stop()


def stubs(
    channel: grpc.aio.Channel,
) -> tuple[account_service_pb2_grpc.AccountServiceStub, mail_service_pb2_grpc.MailServiceStub]:
    return account_service_pb2_grpc.AccountServiceStub(channel), mail_service_pb2_grpc.MailServiceStub(channel)


def seed_account(
    store: Store,
    tenant: str,
    *,
    capabilities: frozenset[Capability] = frozenset(Capability),
    email: str = "someone@example.test",
    password: bytes = b"not-a-real-password",
    state: AccountState = AccountState.ACTIVE,
) -> Account:
    """An IMAP account written straight to the store (no provider is needed to test the API around it)."""
    now = datetime.now(UTC)
    account = Account(
        id=new_account_id(),
        tenant=tenant,
        provider=Provider.IMAP,
        state=state,
        capabilities=capabilities,
        profile=AccountProfile(
            email_address=email,
            username=email,
            # Port 1 of loopback: nothing listens, so a driver fails at once without leaving the machine.
            imap_server=MailServer("127.0.0.1", 1, TransportSecurity.IMPLICIT_TLS),
            smtp_server=MailServer("127.0.0.1", 1, TransportSecurity.IMPLICIT_TLS),
        ),
        create_time=now,
        update_time=now,
    )
    store.create_account(account, {"imap_password": password})
    return account


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo.reason of a failed call ('' when the status has none)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    return rpc_status.from_call(error)  # type: ignore[arg-type]


__all__ = [
    "LOOPBACK_NETWORKS",
    "RunningBroker",
    "broker_config",
    "error_reason",
    "replace",
    "rich_status",
    "running_broker",
    "seed_account",
    "stubs",
]
