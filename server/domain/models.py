"""Domain types shared by the store, the domain services and the servicers (no grpc here)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class Provider(enum.Enum):
    GOOGLE = "google"
    MICROSOFT = "microsoft"
    IMAP = "imap"


class Capability(enum.Enum):
    METADATA = "metadata"
    READ = "read"
    SEND = "send"


class AccountState(enum.Enum):
    ACTIVE = "active"
    NEEDS_REAUTH = "needs_reauth"


class TransportSecurity(enum.Enum):
    IMPLICIT_TLS = "implicit_tls"
    STARTTLS = "starttls"
    PLAINTEXT = "plaintext"


@dataclass(frozen=True)
class MailServer:
    host: str
    port: int
    security: TransportSecurity


@dataclass(frozen=True)
class AccountProfile:
    """The personal part of an account. Stored only sealed (AES-256-GCM), returned only to the owning tenant."""

    email_address: str = ""
    username: str = ""
    imap_server: MailServer | None = None
    smtp_server: MailServer | None = None
    # For OAuth accounts: the provider's stable id of the user (OpenID ``sub``), to match later consents.
    subject: str = ""


@dataclass(frozen=True)
class Account:
    id: str
    tenant: str
    provider: Provider
    state: AccountState
    capabilities: frozenset[Capability]
    profile: AccountProfile
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class AuditEvent:
    """One PII-free, hash-chained audit record."""

    sequence: int
    event_id: str
    event_time: datetime
    action: str
    tenant: str
    actor: str
    account_id: str
    details: dict[str, object] = field(default_factory=dict)
    previous_digest: str = ""
    digest: str = ""
