"""Start-up and shutdown of the broker: wire the store, the domain and the servicers into an mTLS grpc.aio server."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from mailbroker.v1 import account_service_pb2, account_service_pb2_grpc, mail_service_pb2, mail_service_pb2_grpc
from sqlalchemy.engine import Engine

from server.api.accounts import AccountServicer
from server.api.mail import MailServicer
from server.config import Config
from server.crypto.keyring import Keyring, load_keyring
from server.crypto.opaque import OpaqueTokens
from server.domain.accounts import Accounts
from server.domain.audit import AuditLog
from server.domain.blocking import BlockingPool
from server.domain.drivers import Drivers
from server.domain.erasure import AutoEraser, Erasure
from server.domain.feeds import FeedHub
from server.domain.housekeeping import IdempotencySweeper
from server.domain.imap_accounts import ImapAccounts
from server.domain.mail import AccountStateChanged, FeedEvent
from server.domain.mailbox import Mailboxes
from server.domain.models import AccountState, Provider
from server.domain.oauth import OAuthClient, OAuthFlows, provider_revoker
from server.domain.policy import LivePolicy, Policy
from server.domain.tokens import AccessTokens, needs_reauth
from server.errors import ConfigurationError, NotFound
from server.interceptors.access_log import AccessLogInterceptor
from server.interceptors.authentication import AuthenticationInterceptor
from server.interceptors.authorization import AuthorizationInterceptor
from server.interceptors.draining import DrainingInterceptor
from server.interceptors.errors import ErrorMappingInterceptor
from server.interceptors.limits import LimitsInterceptor
from server.interceptors.wrapping import Pipeline
from server.providers.imap.driver import ImapSettings
from server.providers.imap.network import NetworkGuard
from server.providers.stats import ProviderStats
from server.store import fleet
from server.store.audit_anchor import AuditAnchor
from server.store.engine import checkpoint_and_vacuum, create_engine
from server.store.migrate import upgrade
from server.store.repository import Store

if TYPE_CHECKING:
    from server.metrics import Metrics
    from server.providers.google.gmail import GmailSettings
    from server.providers.microsoft.graph import GraphSettings

log = logging.getLogger("mailbroker.app")

STORE_THREADS = 4  # SQLite serialises writers anyway; PostgreSQL may want more (a setting when it lands)

SERVICE_NAMES = (
    account_service_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name,
    mail_service_pb2.DESCRIPTOR.services_by_name["MailService"].full_name,
)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {path}: {exc.strerror}") from None


def server_credentials(config: Config) -> grpc.ServerCredentials:
    """Mutual TLS: the client certificate must chain to the configured client CA, or the handshake fails."""
    return grpc.ssl_server_credentials(
        [(_read(config.key_file, "TLS key"), _read(config.cert_file, "TLS certificate"))],
        root_certificates=_read(config.client_ca_file, "client CA"),
        require_client_auth=True,
    )


def server_options(config: Config) -> list[tuple[str, int]]:
    s = config.server
    return [
        ("grpc.max_receive_message_length", s.max_receive_message_bytes),
        ("grpc.max_send_message_length", s.max_send_message_bytes),
        ("grpc.max_concurrent_streams", s.max_concurrent_streams),
        ("grpc.keepalive_time_ms", s.keepalive_time_seconds * 1000),
        ("grpc.keepalive_timeout_ms", s.keepalive_timeout_seconds * 1000),
        ("grpc.http2.min_ping_interval_without_data_ms", s.min_client_ping_interval_seconds * 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_age_ms", s.max_connection_age_seconds * 1000),
        ("grpc.max_connection_age_grace_ms", s.max_connection_age_grace_seconds * 1000),
        ("grpc.so_reuseport", 0),
    ]


def _check_port_free(listen: str) -> None:
    """Refuse a port that is taken with one clear line (gRPC's own bind failure also prints a C-core log line)."""
    host, _, port = listen.rpartition(":")
    if int(port) == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except OSError:
        raise ConfigurationError(f"cannot listen on {listen} (the host does not resolve)") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise ConfigurationError(f"cannot listen on {listen} ({exc.strerror})") from None


@dataclass
class Broker:
    """A running broker. ``port`` is the bound port (useful with ``HOST:0``)."""

    server: grpc.aio.Server
    port: int
    health: HealthServicer
    pools: tuple[BlockingPool, ...]
    grace: float
    draining: asyncio.Event
    drivers: Drivers
    feeds: FeedHub
    auto_eraser: AutoEraser | None = None
    sweeper: IdempotencySweeper | None = None
    closers: tuple[Callable[[], None], ...] = ()  # run last, after the thread pools stopped
    policy: LivePolicy | None = None
    metrics: Metrics | None = None
    metrics_port: int | None = None  # the /metrics port, when [metrics] listen is set

    def reload_policy(self, config: Config) -> None:
        """Put ``config``'s policy in force for the calls that start from now on; ConfigurationError (and the old
        policy stays) when it does not hold together. Only [policy] is reloaded; other settings need a restart."""
        if self.policy is None:
            raise ConfigurationError("this broker was started without a reloadable policy")
        self.policy.replace(Policy.from_config(config.effective_policy))

    async def stop(self) -> None:
        """Graceful shutdown: report NOT_SERVING, end open streams so clients resume elsewhere, then close."""
        if self.draining.is_set():
            return
        await self.health.enter_graceful_shutdown()
        self.draining.set()
        if self.auto_eraser is not None:
            await self.auto_eraser.stop()
        if self.sweeper is not None:
            await self.sweeper.stop()
        await self.server.stop(self.grace)
        await self.feeds.close()
        await self.drivers.close()
        for pool in self.pools:
            pool.shutdown()
        for close in self.closers:
            close()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)
        log.info("stopped", extra={"event": "shutdown"})

    async def wait(self) -> None:
        await self.server.wait_for_termination()


# What SCRUB_STORAGE DONE means, by database (see server.store.engine.checkpoint_and_vacuum).
SCRUB_DETAILS = {
    "sqlite": "deleted rows zeroed (secure_delete) and the write-ahead log emptied",
    "postgresql": "rows deleted and vacuumed; what PostgreSQL may keep of them (free space, WAL, backups) is "
    "ciphertext under the account's data key, left only wrapped by the current KEK: rotating and retiring that KEK "
    "version completes the erasure (crypto-shredding)",
}


async def start(config: Config, *, environ: Mapping[str, str] | None = None, keyring: Keyring | None = None) -> Broker:
    """Open the store, build the services and start serving on ``config.server.listen`` with mTLS."""
    keyring = keyring or load_keyring(config.keyring_file, environ or {})
    credentials = server_credentials(config)
    config.metrics.validate()  # a Config built in code has not been through load()
    metrics = None
    if config.metrics.listen:
        from server.metrics import Metrics  # prometheus-client only where metrics are on

        metrics = Metrics()
    # Bound first, before the gRPC server exists: a port in use must not leave a half-built server behind (gRPC's
    # aio server, stopped before it ever started and then collected, crashed the process).
    metrics_port = metrics.serve(config.metrics.listen) if metrics is not None else None
    try:
        return await _start(config, keyring, credentials, metrics, metrics_port)
    except BaseException:
        if metrics is not None:
            await asyncio.to_thread(metrics.close)
        raise


async def _start(
    config: Config,
    keyring: Keyring,
    credentials: grpc.ServerCredentials,
    metrics: Metrics | None,
    metrics_port: int | None,
) -> Broker:
    provider_stats = ProviderStats()  # provider calls, errors and retries, counted by every driver
    # Every store thread and every provider thread (a token refresh holds a connection through its HTTP call) may
    # need a connection at once, plus a few for the event loop's own short calls.
    engine = create_engine(config.store_url, pool_size=STORE_THREADS + config.server.blocking_threads + 2)
    upgrade(engine)
    store = Store(engine, keyring, audit_anchor=AuditAnchor(config.audit_anchor_file, keyring))
    # Separate pools: slow mail servers holding every provider thread must not stall the store for all tenants.
    blocking = BlockingPool(STORE_THREADS, "mailbroker-store")
    providers = BlockingPool(config.server.blocking_threads, "mailbroker-provider")
    tokens = OpaqueTokens(keyring)
    policy = LivePolicy(Policy.from_config(config.effective_policy))

    imap_settings = ImapSettings(
        allow_plaintext=config.imap.allow_plaintext,
        ca_file=str(config.imap.ca_file) if config.imap.ca_file else None,
        pool_size=config.imap.pool_size,
        timeout_seconds=config.imap.timeout_seconds,
        guard=NetworkGuard.from_config(config.imap.allowed_networks),
        stats=provider_stats,
    )
    accounts = Accounts(store, blocking, tokens)
    feeds = FeedHub()
    oauth_clients, gmail_settings, graph_settings = _oauth_clients(config, provider_stats)
    access_tokens = AccessTokens(
        store,
        blocking,
        providers,
        oauth_clients,
        refresh_margin_seconds=config.oauth.refresh_margin_seconds,
        on_reauth_needed=lambda account_id: _end_feeds_for_reauth(feeds, account_id),
    )
    drivers = Drivers(
        store, blocking, providers, imap_settings, tokens=access_tokens, gmail=gmail_settings, graph=graph_settings
    )

    async def on_grant(account_id: str) -> None:
        access_tokens.forget(account_id)
        await drivers.evict(account_id)

    oauth = OAuthFlows(
        store,
        blocking,
        providers,
        accounts,
        oauth_clients,
        state_ttl_seconds=config.oauth.state_ttl_seconds,
        on_grant=on_grant,
    )
    audit = AuditLog(store, blocking, tokens)
    revokers = {
        provider: provider_revoker(store, blocking, providers, client, access_tokens)
        for provider, client in oauth_clients.items()
    }
    if Provider.MICROSOFT in oauth_clients:
        from server.providers.microsoft.oauth import microsoft_revoker

        # Microsoft has no per-app revocation: the receipt says so, and where the user removes the app.
        revokers[Provider.MICROSOFT] = microsoft_revoker(access_tokens)
    erasure = Erasure(
        store,
        accounts,
        blocking,
        drivers,
        feeds,
        scrub=lambda: checkpoint_and_vacuum(engine),
        revokers=revokers,
        scrub_detail=SCRUB_DETAILS.get(engine.dialect.name, ""),
    )
    mailboxes = Mailboxes(
        accounts,
        drivers,
        tokens,
        store,
        blocking,
        feeds,
        message_id_domain=config.mail.message_id_domain,
        folder_poll_seconds=config.mail.folder_poll_seconds,
        max_watches_per_account=config.limits.max_watches_per_account,
    )
    imap_accounts = ImapAccounts(store, blocking, providers, imap_settings)
    if metrics is not None:
        metrics.watch(
            providers=provider_stats,
            tokens=access_tokens,
            feeds=feeds,
            mailboxes=mailboxes,
            drivers=drivers,
            pools={"store": blocking, "provider": providers},
        )

    draining = asyncio.Event()
    server = grpc.aio.server(
        interceptors=[
            # One wrapper per call for all of these (see server.interceptors.wrapping.Pipeline), outermost first.
            Pipeline(
                [
                    AccessLogInterceptor(metrics),
                    AuthenticationInterceptor(policy),
                    AuthorizationInterceptor(policy),
                    LimitsInterceptor(
                        max_calls=config.limits.max_concurrent_calls_per_identity,
                        max_streams=config.limits.max_streams_per_identity,
                    ),
                    ErrorMappingInterceptor(default_deadline=config.limits.default_deadline_seconds),
                ]
            ),
            DrainingInterceptor(draining),
        ],
        options=server_options(config),
    )
    account_service_pb2_grpc.add_AccountServiceServicer_to_server(
        AccountServicer(accounts, audit, erasure, imap_accounts, oauth), server
    )  # type: ignore[no-untyped-call]
    mail_service_pb2_grpc.add_MailServiceServicer_to_server(MailServicer(accounts, mailboxes), server)  # type: ignore[no-untyped-call]
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )

    _check_port_free(config.server.listen)
    try:
        port = server.add_secure_port(config.server.listen, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise ConfigurationError(f"cannot listen on {config.server.listen} (address in use or not available)")
    if metrics_port is not None:
        log.info("metrics", extra={"event": "metrics_serving", "port": metrics_port})
    fleet_listener = _start_fleet_listener(engine, store, access_tokens, feeds, drivers)
    if fleet_listener is not None and metrics is not None:
        metrics.watch_fleet(fleet_listener.connected)
    await server.start()
    auto_eraser = _start_auto_eraser(config, store, erasure, blocking)
    sweeper = IdempotencySweeper(store, blocking, retention=timedelta(hours=config.mail.idempotency_retention_hours))
    sweeper.start()
    for name in ("", *SERVICE_NAMES):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]  # "uvloop" or "asyncio"
    log.info("serving", extra={"event": "startup", "port": port, "event_loop": loop})
    return Broker(
        server,
        port,
        health,
        (blocking, providers),
        config.server.shutdown_grace_seconds,
        draining,
        drivers,
        feeds,
        auto_eraser,
        sweeper=sweeper,
        closers=(
            *(client.close for client in oauth_clients.values()),
            *(() if fleet_listener is None else (fleet_listener.stop,)),
        ),
        policy=policy,
        metrics=metrics,
        metrics_port=metrics_port,
    )


def _oauth_clients(
    config: Config, stats: ProviderStats
) -> tuple[dict[Provider, OAuthClient], GmailSettings | None, GraphSettings | None]:
    """The OAuth clients of the configured providers (none configured: only IMAP accounts are offered).

    A provider's modules are imported only when it is configured: google-api-python-client, google-auth, msal and
    requests add about 20 MiB to every broker process that would never use them.
    """
    clients: dict[Provider, OAuthClient] = {}
    gmail = None
    graph = None
    if config.google.enabled:
        from server.providers.google.gmail import GmailSettings
        from server.providers.google.oauth import GoogleOAuth

        clients[Provider.GOOGLE] = GoogleOAuth(config.google)
        gmail = GmailSettings(
            api_endpoint=config.google.api_endpoint,
            ca_file=config.google.ca_file,
            timeout_seconds=config.google.timeout_seconds,
            max_retry_seconds=config.google.max_retry_seconds,
            history_poll_seconds=config.google.history_poll_seconds,
            stats=stats,
        )
    if config.microsoft.enabled:
        from server.providers.microsoft.graph import GraphSettings
        from server.providers.microsoft.oauth import MicrosoftOAuth

        clients[Provider.MICROSOFT] = MicrosoftOAuth(config.microsoft)
        graph = GraphSettings(
            graph_endpoint=config.microsoft.graph_endpoint,
            ca_file=config.microsoft.ca_file,
            timeout_seconds=config.microsoft.timeout_seconds,
            max_retry_seconds=config.microsoft.max_retry_seconds,
            delta_poll_seconds=config.microsoft.delta_poll_seconds,
            stats=stats,
        )
    return clients, gmail, graph


async def _end_feeds_for_reauth(feeds: FeedHub, account_id: str) -> None:
    """A refused grant: every feed of the account gets an AccountStateChanged event, then ends."""
    await feeds.close_account(
        account_id,
        needs_reauth(),
        FeedEvent(AccountStateChanged(AccountState.NEEDS_REAUTH, "PROVIDER_AUTH_FAILED"), {}, datetime.now(UTC)),
    )


def _start_auto_eraser(config: Config, store: Store, erasure: Erasure, blocking: BlockingPool) -> AutoEraser | None:
    """The background erasure of accounts NEEDS_REAUTH for too long, when ``[erasure]`` turns it on."""
    days = config.erasure.needs_reauth_erase_after_days
    if days <= 0:
        return None
    eraser = AutoEraser(
        store, erasure, blocking, after=timedelta(days=days), interval=config.erasure.sweep_interval_seconds
    )
    eraser.start()
    return eraser


def _start_fleet_listener(
    engine: Engine, store: Store, access_tokens: AccessTokens, feeds: FeedHub, drivers: Drivers
) -> fleet.Listener | None:
    """On PostgreSQL, listen to the other replicas: erasures end this replica's feeds and connections of the
    account; new consents drop its token and connections; refreshed access tokens join its cache. Every minute,
    and after a lost connection, what this replica holds is checked against the store. None on SQLite (one
    process, nothing to hear)."""
    if engine.dialect.name != "postgresql":
        return None
    loop = asyncio.get_running_loop()
    erased = NotFound("the account was erased", reason="ACCOUNT_ERASED")

    async def forget(account_ids: set[str]) -> None:
        for account_id in account_ids:
            access_tokens.forget(account_id)
            await feeds.close_account(account_id, erased)
            await drivers.evict(account_id)

    async def regranted(account_id: str) -> None:  # the old token and connections carry the old grant's scopes
        access_tokens.forget(account_id)
        await drivers.evict(account_id)

    def run(coroutine: Coroutine[Any, Any, None]) -> None:  # from the listener's thread
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        future.add_done_callback(_log_failure)

    def deliver(message: fleet.Message) -> None:  # on the listener's thread
        if isinstance(message, fleet.Erased):
            store.forget_cached_accounts()
            # Acted on only once the store agrees: anyone who can NOTIFY on the database must not end feeds.
            if not store.existing_account_ids([message.account_id]):
                run(forget({message.account_id}))
            return
        if isinstance(message, fleet.Regranted):
            store.forget_cached_accounts()
            run(regranted(message.account_id))
            return
        if not access_tokens.wants(message.account_id):
            return  # not worth a read of the store
        opened = store.open_token(message)
        if opened is not None:
            access_tokens.accept(message.account_id, message.generation, *opened)

    def reconcile(reconnected: bool) -> None:  # notices sent while not listening are lost: check what is held
        store.forget_cached_accounts()
        if reconnected:
            access_tokens.forget_all()  # a missed new consent would leave a token with the old scopes
        held = feeds.watched_account_ids() | drivers.account_ids()  # copies taken in one C call each
        gone = held - store.existing_account_ids(held)
        if gone:
            run(forget(gone))

    listener = fleet.Listener(engine.url, deliver, reconcile, store.keyring)
    listener.start()
    return listener


def _log_failure(future: concurrent.futures.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("fleet notice not applied", exc_info=future.exception(), extra={"component": "fleet"})
