"""Load the broker's configuration once, from a TOML file plus environment overrides, into frozen dataclasses.

Precedence, lowest first: built-in defaults, the TOML file, ``MAILBROKER_<SECTION>_<KEY>`` environment variables,
command-line flags. With no file at all the broker runs on its embedded defaults: everything under the data
directory (``./var``), a development PKI made on first run, a local key file, an SQLite store.

Unknown keys are errors (a typo must not silently fall back to a default). Every error is a
:class:`~server.errors.ConfigurationError` with one line for the operator.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.errors import ConfigurationError

ENV_PREFIX = "MAILBROKER_"
DEFAULT_DATA_DIR = Path("var")
DEFAULT_LISTEN = "127.0.0.1:50051"
DEV_TRUST_DOMAIN = "mailbroker.dev"
DEV_CLIENT_IDENTITY = f"spiffe://{DEV_TRUST_DOMAIN}/client"

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """The gRPC listener and its transport limits (see README, "Transport limits")."""

    listen: str = DEFAULT_LISTEN
    # SendMessage carries its attachments inline as protobuf bytes (no base64 growth): 25 MiB of attachments
    # plus bodies and headers fit, anything absurd is refused before it is parsed.
    max_receive_message_bytes: int = 32 * MiB
    # GetMessage FULL returns bodies only (attachments are streamed in 64 KiB chunks).
    max_send_message_bytes: int = 16 * MiB
    # Per-connection HTTP/2 streams: a consumer multiplexing many WatchMailbox feeds on one channel.
    max_concurrent_streams: int = 1000
    # Server pings idle connections so dead peers free their streams.
    keepalive_time_seconds: int = 60
    keepalive_timeout_seconds: int = 20
    # Clients may ping no more often than this; faster pings get the connection closed (GOAWAY).
    min_client_ping_interval_seconds: int = 30
    # Connections are recycled so load spreads across replicas; open feeds end with UNAVAILABLE and resume
    # from their last token.
    max_connection_age_seconds: int = 3600
    max_connection_age_grace_seconds: int = 30
    # How long shutdown waits for in-flight unary calls.
    shutdown_grace_seconds: float = 10.0
    # Threads for blocking provider client libraries (imapclient, smtplib); the store has a pool of its own.
    blocking_threads: int = 16
    # The asyncio event loop the server runs on: "uvloop" (libuv; bench/: about 10% less CPU per gRPC call) or
    # "asyncio" (the standard library's).
    event_loop: str = "uvloop"


@dataclass(frozen=True)
class TlsConfig:
    """Server certificate and the CA that client certificates must chain to. Empty → the dev PKI."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None


@dataclass(frozen=True)
class StoreConfig:
    """The database. Empty url → ``sqlite:///<data_dir>/mailbroker.db``."""

    url: str = ""


@dataclass(frozen=True)
class KeysConfig:
    """The key-encryption keyring. Empty file → ``<data_dir>/keys.json``; ``MAILBROKER_KEKS`` overrides it."""

    file: Path | None = None


@dataclass(frozen=True)
class LoggingConfig:
    """Log level and an optional JSON-lines file (stderr always)."""

    level: str = "INFO"
    file: Path | None = None


@dataclass(frozen=True)
class ImapConfig:
    """Settings for every IMAP/SMTP account."""

    # Plaintext IMAP/SMTP sends the password in the clear; only for servers on a trusted network.
    allow_plaintext: bool = False
    # A CA bundle that replaces the system trust store for IMAP and SMTP (an internal CA); empty → system.
    ca_file: Path | None = None
    # Connections kept per account for reads; more requests wait for one.
    pool_size: int = 4
    # Connect, login and per-command timeout, capped by the caller's deadline.
    timeout_seconds: float = 30.0
    # The SSRF guard: IMAP/SMTP hosts that resolve to loopback, link-local, private, shared, multicast, unspecified
    # or reserved addresses are refused (HOST_NOT_ALLOWED) unless they fall in one of these networks, such as
    # "10.20.0.0/16" for an internal mail server. Checked on every connection, not only ConnectImapAccount.
    allowed_networks: tuple[str, ...] = ()


@dataclass(frozen=True)
class LimitsConfig:
    """Per-caller resource limits (see README, "Limits"). Beyond them a call is RESOURCE_EXHAUSTED."""

    # Unary calls without a deadline get this one (streams have none: a feed is meant to stay open).
    default_deadline_seconds: float = 60.0
    # Unary calls one client identity may have in flight at once (TOO_MANY_CONCURRENT_CALLS).
    max_concurrent_calls_per_identity: int = 64
    # Streams (WatchMailbox, GetAttachment) one client identity may have open at once (TOO_MANY_STREAMS).
    max_streams_per_identity: int = 256
    # WatchMailbox feeds open on one account at once, whoever opened them (TOO_MANY_WATCHES).
    max_watches_per_account: int = 16


@dataclass(frozen=True)
class MailConfig:
    """Outgoing mail."""

    # The right-hand side of the Message-IDs the broker makes for sent mail.
    message_id_domain: str = "mailbroker.invalid"
    # How often a watched account's folder list is compared for created and deleted folders.
    folder_poll_seconds: float = 30.0
    # How long a SendMessage request_id is remembered (a retry within it gets the first result, sending nothing).
    idempotency_retention_hours: float = 24.0


@dataclass(frozen=True)
class OAuthConfig:
    """What every OAuth provider shares."""

    # How long a BeginOAuth state stays usable (it is single-use either way).
    state_ttl_seconds: float = 600.0
    # An access token is refreshed this long before it expires.
    refresh_margin_seconds: float = 60.0


@dataclass(frozen=True)
class OAuthClientConfig:
    """What every provider's OAuth client section has. Empty client_id → the provider is not offered."""

    section = ""  # the TOML section, for error messages (a class attribute, not a setting)

    client_id: str = ""
    client_secret: str = ""
    client_secret_file: Path | None = None
    # The redirect URIs registered for the client; BeginOAuth accepts only these.
    redirect_uris: tuple[str, ...] = ()
    # A CA bundle that replaces the system trust store for every endpoint of the provider; empty → system.
    ca_file: Path | None = None
    # Per-request timeout; retries of 429/5xx stop at the caller's deadline or after max_retry_seconds.
    timeout_seconds: float = 30.0
    max_retry_seconds: float = 20.0

    @property
    def enabled(self) -> bool:
        return bool(self.client_id)

    def secret(self) -> str:
        """The client secret: the setting (or its environment variable), else the first line of its file."""
        if self.client_secret:
            return self.client_secret
        if self.client_secret_file is not None:
            try:
                return self.client_secret_file.read_text(encoding="utf-8").splitlines()[0].strip()
            except (OSError, IndexError, UnicodeDecodeError):
                raise ConfigurationError(f"config: {self.section}.client_secret_file cannot be read") from None
        return ""


@dataclass(frozen=True)
class GoogleConfig(OAuthClientConfig):
    """Gmail through Google OAuth 2.0. Empty client_id → GOOGLE accounts are not offered (FAILED_PRECONDITION).

    The client secret comes from ``client_secret``, the ``MAILBROKER_GOOGLE_CLIENT_SECRET`` environment variable,
    or ``client_secret_file`` (its first line); it is never logged. The endpoints default to Google's; tests point
    them at a local emulator.
    """

    section = "google"

    authorization_endpoint: str = "https://accounts.google.com/o/oauth2/v2/auth"
    token_endpoint: str = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL, not a secret
    revoke_endpoint: str = "https://oauth2.googleapis.com/revoke"
    certs_url: str = "https://www.googleapis.com/oauth2/v3/certs"
    issuers: tuple[str, ...] = ("https://accounts.google.com", "accounts.google.com")
    api_endpoint: str = "https://gmail.googleapis.com/"
    # How often a watched account's history is polled.
    history_poll_seconds: float = 10.0


@dataclass(frozen=True)
class MicrosoftConfig(OAuthClientConfig):
    """Outlook / Microsoft 365 through the Microsoft identity platform (msal) and Microsoft Graph. Empty client_id →
    MICROSOFT accounts are not offered (FAILED_PRECONDITION).

    The client secret comes from ``client_secret``, the ``MAILBROKER_MICROSOFT_CLIENT_SECRET`` environment variable,
    or ``client_secret_file`` (its first line); it is never logged. ``authority`` is the tenant part of the authority
    URL: ``common``, ``organizations``, ``consumers`` or a tenant id or domain. The hosts default to Microsoft's;
    tests point them at a local emulator.
    """

    section = "microsoft"

    authority_host: str = "https://login.microsoftonline.com"
    authority: str = "common"
    graph_endpoint: str = "https://graph.microsoft.com/v1.0"
    # How often a watched account's folders are asked for their delta.
    delta_poll_seconds: float = 10.0


@dataclass(frozen=True)
class PolicyRule:
    """Identities (exact, or a ``prefix/*`` pattern) allowed to call methods (``*``, ``pkg.Service/*``,
    ``pkg.Service/Method``)."""

    identities: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()


@dataclass(frozen=True)
class PolicyTenant:
    """Identities (exact, or a ``prefix/*`` pattern) that act for one tenant: they share its accounts."""

    tenant: str = ""
    identities: tuple[str, ...] = ()


@dataclass(frozen=True)
class PolicyCap:
    """What matching identities may do at most: METADATA, READ, SEND (mail), CONNECT (BeginOAuth, CompleteOAuth,
    ConnectImapAccount), DELETE (DeleteAccount). An identity no cap matches is not capped."""

    identities: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()


@dataclass(frozen=True)
class PolicyConfig:
    """Who may call what, which tenant each identity acts for, and what it may do at most. No rule → deny, except
    the dev default when the dev PKI is in use. Reloaded on SIGHUP and when the config file changes on disk
    (server.domain.policy checks it; server.policy_watch watches the file)."""

    rules: tuple[PolicyRule, ...] = ()
    # How often the running broker (`mailbroker serve --config FILE`) looks at FILE and reloads the policy when it
    # changed, as SIGHUP does; 0 = no watch. Read at start-up.
    watch_interval_seconds: float = 2.0
    # Identities that may list every tenant's audit events (ListAuditEvents with all_tenants).
    auditors: tuple[str, ...] = ()
    # Identity → tenant; an identity no entry matches is a tenant of its own.
    tenants: tuple[PolicyTenant, ...] = ()
    # Capability caps per identity; every cap that matches applies (the identity keeps what all of them allow).
    caps: tuple[PolicyCap, ...] = ()


@dataclass(frozen=True)
class AuditConfig:
    """The audit log's anchor file (see server.store.audit_anchor). Empty → ``<data_dir>/audit-anchor.json``."""

    anchor_file: Path | None = None


@dataclass(frozen=True)
class ErasureConfig:
    """Automatic erasure of accounts the user disconnected at the provider."""

    # Erase an account that has been NEEDS_REAUTH for this many days, through the same path as DeleteAccount.
    # 0 = never (the default).
    needs_reauth_erase_after_days: int = 0
    # How often the running broker looks for such accounts.
    sweep_interval_seconds: float = 3600.0


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint: /metrics over plain HTTP on a port of its own. Empty listen → off (the default)."""

    listen: str = ""
    # The endpoint has no authentication (its labels carry no personal data, but counts and pool sizes are still
    # nobody else's business): an address other than loopback must be asked for.
    allow_non_loopback: bool = False

    def validate(self) -> None:
        """ConfigurationError unless ``listen`` is empty or HOST:PORT on loopback (or non-loopback is allowed). Also
        run by start-up, for configs built in code rather than loaded."""
        if not self.listen:
            return
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigurationError(f"config: metrics.listen must be HOST:PORT, got {self.listen!r}")
        if not self.allow_non_loopback and not _is_loopback(host):
            raise ConfigurationError(
                f"config: metrics.listen {self.listen!r} is not a loopback address and the endpoint has no "
                "authentication; set metrics.allow_non_loopback = true to serve it there"
            )


def _is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP literal; any other name cannot be known to stay on this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Config:
    data_dir: Path = DEFAULT_DATA_DIR
    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    imap: ImapConfig = field(default_factory=ImapConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    mail: MailConfig = field(default_factory=MailConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    erasure: ErasureConfig = field(default_factory=ErasureConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    oauth: OAuthConfig = field(default_factory=OAuthConfig)
    google: GoogleConfig = field(default_factory=GoogleConfig)
    microsoft: MicrosoftConfig = field(default_factory=MicrosoftConfig)

    @property
    def uses_dev_pki(self) -> bool:
        return self.tls.cert is None

    @property
    def dev_pki_dir(self) -> Path:
        return self.data_dir / "dev-pki"

    @property
    def cert_file(self) -> Path:
        return self.tls.cert or self.dev_pki_dir / "server.pem"

    @property
    def key_file(self) -> Path:
        return self.tls.key or self.dev_pki_dir / "server-key.pem"

    @property
    def client_ca_file(self) -> Path:
        return self.tls.client_ca or self.dev_pki_dir / "ca.pem"

    @property
    def keyring_file(self) -> Path:
        return self.keys.file or self.data_dir / "keys.json"

    @property
    def audit_anchor_file(self) -> Path:
        return self.audit.anchor_file or self.data_dir / "audit-anchor.json"

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{self.data_dir / 'mailbroker.db'}"

    @property
    def effective_policy(self) -> PolicyConfig:
        if self.policy.rules or not self.uses_dev_pki:
            return self.policy
        # The dev PKI's CA signs only dev clients, so its trust domain is the dev default.
        return dataclasses.replace(
            self.policy, rules=(PolicyRule(identities=(f"spiffe://{DEV_TRUST_DOMAIN}/*",), methods=("*",)),)
        )


def load(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the Config from defaults, the TOML file at ``path``, ``environ`` and ``overrides`` (dotted keys)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigurationError(f"cannot read config file {path}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"config file {path} is not valid TOML: {exc}") from None
    _apply_environment(raw, environ or {})
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, dotted, value)
    config = typing.cast(Config, _build(Config, raw, ""))
    _validate(config)
    return config


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "MAILBROKER_KEKS":
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        if rest == "data_dir":
            raw["data_dir"] = value
            continue
        section, _, key = rest.partition("_")
        if section in sections and section != "policy" and key:
            _set_dotted(raw, f"{section}.{key}", value)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _build(cls: type[Any], raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigurationError(f"config: [{where.rstrip('.')}] must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigurationError(f"config: unknown setting {where}{unknown[0]}")
    values = {name: _convert(hints[name], raw[name], f"{where}{name}") for name in raw}
    return cls(**values)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value in ("", None):
            return None
        (inner,) = (a for a in typing.get_args(hint) if a is not type(None))
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{where}.")  # type: ignore[arg-type]
    if origin is tuple:
        (inner, _) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigurationError(f"config: {where} must be a list")
        return tuple(_convert(inner, item, f"{where}[{i}]") for i, item in enumerate(value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
    elif hint is int and not isinstance(value, bool):
        try:
            return int(value)
        except (TypeError, ValueError):
            pass
    elif hint is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif hint is str and isinstance(value, str):
        return value
    elif hint is Path and isinstance(value, str | Path):
        return Path(value)
    raise ConfigurationError(f"config: {where} must be {getattr(hint, '__name__', hint)}")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
EVENT_LOOPS = ("uvloop", "asyncio")


def _validate(config: Config) -> None:
    host, sep, port = config.server.listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigurationError(f"config: server.listen must be HOST:PORT, got {config.server.listen!r}")
    tls = (config.tls.cert, config.tls.key, config.tls.client_ca)
    if any(tls) and not all(tls):
        raise ConfigurationError("config: tls.cert, tls.key and tls.client_ca go together (or none, for the dev PKI)")
    if config.logging.level.upper() not in LOG_LEVELS:
        raise ConfigurationError(f"config: logging.level must be one of {', '.join(LOG_LEVELS)}")
    if config.imap.pool_size <= 0 or config.imap.timeout_seconds <= 0:
        raise ConfigurationError("config: imap.pool_size and imap.timeout_seconds must be positive")
    for index, network in enumerate(config.imap.allowed_networks):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigurationError(f"config: imap.allowed_networks[{index}] is not a network (CIDR)") from None
    for name in (
        "default_deadline_seconds",
        "max_concurrent_calls_per_identity",
        "max_streams_per_identity",
        "max_watches_per_account",
    ):
        if getattr(config.limits, name) <= 0:
            raise ConfigurationError(f"config: limits.{name} must be positive")
    if config.server.event_loop not in EVENT_LOOPS:
        raise ConfigurationError(f"config: server.event_loop must be one of {', '.join(EVENT_LOOPS)}")
    for name in ("max_receive_message_bytes", "max_send_message_bytes", "max_concurrent_streams", "blocking_threads"):
        if getattr(config.server, name) <= 0:
            raise ConfigurationError(f"config: server.{name} must be positive")
    google = config.google
    if google.enabled:
        if not google.redirect_uris:
            raise ConfigurationError("config: google.redirect_uris must list at least one URI")
        if not google.secret():
            raise ConfigurationError("config: google needs a client secret (client_secret, its file or environment)")
    microsoft = config.microsoft
    if microsoft.enabled:
        if not microsoft.redirect_uris:
            raise ConfigurationError("config: microsoft.redirect_uris must list at least one URI")
        if not microsoft.secret():
            raise ConfigurationError("config: microsoft needs a client secret (client_secret, its file or environment)")
        for name in ("authority_host", "graph_endpoint"):
            if not getattr(microsoft, name).startswith("https://"):
                raise ConfigurationError(f"config: microsoft.{name} must be an https:// URL")
        if not microsoft.authority or not all(c.isalnum() or c in "-._" for c in microsoft.authority):
            raise ConfigurationError("config: microsoft.authority must be common, organizations or a tenant id")
    config.metrics.validate()
    if config.erasure.needs_reauth_erase_after_days < 0 or config.erasure.sweep_interval_seconds <= 0:
        raise ConfigurationError(
            "config: erasure.needs_reauth_erase_after_days must be >= 0 and erasure.sweep_interval_seconds positive"
        )
    if not config.mail.idempotency_retention_hours > 0:
        raise ConfigurationError("config: mail.idempotency_retention_hours must be positive")
    if config.policy.watch_interval_seconds < 0:
        raise ConfigurationError("config: policy.watch_interval_seconds must be >= 0 (0 turns the file watch off)")
    for i, rule in enumerate(config.policy.rules):
        if not rule.identities or not rule.methods:
            raise ConfigurationError(f"config: policy.rules[{i}] needs identities and methods")
