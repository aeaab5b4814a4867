"""Prometheus metrics of one broker, served as /metrics over plain HTTP on a port of its own (config ``[metrics]``,
off by default).

Each broker has its own registry (tests run several brokers in one process). The access log interceptor feeds the
RPC counter and histogram, since it already measures every call's method, status and duration; everything else is
read from the domain's own counts and state when the endpoint is scraped, so calls pay nothing for it.

Label values are bounded enums only: a method this server serves (``unknown`` for any other path), a gRPC status code
name, a provider, an outcome, a pool name. Never an address, account id, tenant or caller identity.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from mailbroker.v1 import account_service_pb2, mail_service_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from server.errors import ConfigurationError
from server.providers.stats import PROVIDERS, ProviderStats

if TYPE_CHECKING:
    from server.domain.blocking import BlockingPool
    from server.domain.drivers import Drivers
    from server.domain.feeds import FeedHub
    from server.domain.mailbox import Mailboxes
    from server.domain.tokens import AccessTokens

UNKNOWN_METHOD = "unknown"
# RPC latency, in seconds: a cached GetAccount takes about a millisecond, a provider call up to the default deadline.
# (For the streaming methods, WatchMailbox and GetAttachment, the "duration" is how long the stream was open.)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REFRESH_OUTCOMES = ("ok", "refused", "failed")
OAUTH_PROVIDERS = ("google", "microsoft")


def server_methods() -> frozenset[str]:
    """Every method this server serves, as the path gRPC gives the interceptors (``/package.Service/Method``)."""
    files = (account_service_pb2, mail_service_pb2, health_pb2, reflection_pb2)
    return frozenset(
        f"/{service.full_name}/{method.name}"
        for module in files
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    )


class Metrics:
    """One broker's registry, RPC metrics and /metrics listener."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        labels = ("method", "code")
        self._handled = Counter(
            "mailbroker_rpc_handled", "RPCs completed, by method and gRPC status code", labels, registry=self.registry
        )
        self._duration = Histogram(
            "mailbroker_rpc_duration_seconds",
            "RPC latency (streams: how long they were open), by method and gRPC status code",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._methods = server_methods()
        # (method label, code) -> the label children, so a call does one dict lookup instead of labels()'s lock and
        # label checks. Bounded: the server's methods plus "unknown", times the status codes.
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """One finished call (from the access log interceptor, on the event loop)."""
        label = method if method in self._methods else UNKNOWN_METHOD
        children = self._children.get((label, code))
        if children is None:
            name = label.removeprefix("/")
            children = (self._handled.labels(name, code), self._duration.labels(name, code))
            self._children[(label, code)] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_unimplemented(self) -> None:
        """A call to a path this server has no method for: gRPC answers UNIMPLEMENTED without running a handler."""
        self.observe_rpc(UNKNOWN_METHOD, "UNIMPLEMENTED", 0.0)

    def watch(
        self,
        *,
        providers: ProviderStats,
        tokens: AccessTokens,
        feeds: FeedHub,
        mailboxes: Mailboxes,
        drivers: Drivers,
        pools: Mapping[str, BlockingPool],
    ) -> None:
        """Report the state of these parts of the broker whenever the endpoint is scraped."""
        self.registry.register(_StateCollector(providers, tokens, feeds, mailboxes, drivers, dict(pools)))

    def watch_fleet(self, connected: threading.Event) -> None:
        """Report whether this replica hears the others (PostgreSQL): ``connected`` is the listener's state."""
        self.registry.register(_FleetCollector(connected))

    def serve(self, listen: str) -> int:
        """Serve /metrics on ``listen`` (HOST:PORT, port 0 for any free one) from a daemon thread; the bound port."""
        host, _, port = listen.rpartition(":")
        try:
            self._server, self._thread = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        except OSError as exc:
            raise ConfigurationError(f"cannot serve metrics on {listen} ({exc.strerror or exc})") from None
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop serving (blocks up to the server's half-second poll interval: call it off the event loop)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class _FleetCollector:
    def __init__(self, connected: threading.Event) -> None:
        self._connected = connected

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "mailbroker_fleet_listener_connected",
            "1 while this replica listens to the other replicas' notices on PostgreSQL (erasures, new consents, "
            "refreshed tokens), 0 while it reconnects",
            value=1 if self._connected.is_set() else 0,
        )


class _StateCollector:
    """Reads the broker's counts and state at scrape time, in the HTTP server's thread. Every read is a copy made in
    one C call (``dict(d)``, ``len``, ``sum``), so it never races the event loop changing the same objects."""

    def __init__(
        self,
        providers: ProviderStats,
        tokens: AccessTokens,
        feeds: FeedHub,
        mailboxes: Mailboxes,
        drivers: Drivers,
        pools: dict[str, BlockingPool],
    ) -> None:
        self._providers = providers
        self._tokens = tokens
        self._feeds = feeds
        self._mailboxes = mailboxes
        self._drivers = drivers
        self._pools = pools

    def collect(self) -> Iterator[Metric]:
        yield from self._provider_metrics()
        refreshes = dict(self._tokens.refresh_outcomes)
        family = CounterMetricFamily(
            "mailbroker_token_refreshes",
            "Requests to a provider's token endpoint, by provider and outcome (ok; refused: the grant is gone and "
            "the account needs consent again; failed: any other error)",
            labels=("provider", "outcome"),
        )
        for provider, outcome in _keys(refreshes, OAUTH_PROVIDERS, REFRESH_OUTCOMES):
            family.add_metric((provider, outcome), refreshes.get((provider, outcome), 0))
        yield family
        yield _gauge("mailbroker_open_feeds", "Open WatchMailbox streams", self._mailboxes.open_feeds)
        yield _gauge(
            "mailbroker_watched_accounts", "Accounts with at least one open feed", self._feeds.watched_accounts
        )
        yield _gauge(
            "mailbroker_feed_watchers",
            "Upstream watchers running (one per watched folder or folder list of an account, shared by its feeds)",
            self._feeds.watchers,
        )
        imap = self._drivers.imap_pools()
        yield _gauge("mailbroker_imap_pools", "IMAP accounts with a live connection pool", len(imap))
        connections = GaugeMetricFamily(
            "mailbroker_imap_connections",
            "IMAP connections of every account's pool: idle, or in use (lent to a call, or being opened)",
            labels=("state",),
        )
        connections.add_metric(("idle",), sum(pool.idle for pool in imap))
        connections.add_metric(("in_use",), sum(pool.in_use for pool in imap))
        yield connections
        threads = GaugeMetricFamily(
            "mailbroker_blocking_pool_threads", "Threads a blocking-work pool may run", labels=("pool",)
        )
        queued = GaugeMetricFamily(
            "mailbroker_blocking_pool_queued",
            "Work waiting for a free thread of a blocking-work pool",
            labels=("pool",),
        )
        for name, pool in self._pools.items():
            threads.add_metric((name,), pool.threads)
            queued.add_metric((name,), pool.queued)
        yield threads
        yield queued

    def _provider_metrics(self) -> Iterator[Metric]:
        calls, errors, retries = self._providers.snapshot()
        family = CounterMetricFamily(
            "mailbroker_provider_calls",
            "Calls to a provider (one driver operation, its retries included), by provider",
            labels=("provider",),
        )
        for provider in PROVIDERS:
            family.add_metric((provider,), calls.get(provider, 0))
        yield family
        family = CounterMetricFamily(
            "mailbroker_provider_errors",
            "Provider calls that failed, by provider and the gRPC status code of the error",
            labels=("provider", "code"),
        )
        for (provider, code), count in sorted(errors.items()):
            family.add_metric((provider, code), count)
        yield family
        family = CounterMetricFamily(
            "mailbroker_provider_retries",
            "Requests to a provider repeated after a transient failure (429, 5xx, a lost connection) or a refused "
            "access token, by provider",
            labels=("provider",),
        )
        for provider in PROVIDERS:
            family.add_metric((provider,), retries.get(provider, 0))
        yield family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _keys(counts: Mapping[tuple[str, str], int], first: Iterable[str], second: Iterable[str]) -> list[tuple[str, str]]:
    """Every (first, second) pair, so the series exist at zero, plus any other key counted."""
    pairs = [(a, b) for a in first for b in second]
    return pairs + sorted(set(counts) - set(pairs))
