"""ConnectImapAccount: validate, log in to IMAP (and SMTP for SEND) before storing anything, then store the
password sealed and audit the connection."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.headerregistry import Address

from server.domain.blocking import BlockingPool
from server.domain.deadline import MARGIN_SECONDS
from server.domain.models import (
    Account,
    AccountProfile,
    AccountState,
    Capability,
    MailServer,
    Provider,
    TransportSecurity,
)
from server.domain.principal import Principal
from server.errors import FieldViolation, InvalidArgument
from server.providers.imap.connection import Credentials
from server.providers.imap.driver import ImapDriver, ImapSettings
from server.providers.imap.network import SERVER_ROLES, HostNotAllowed
from server.store.ids import new_account_id
from server.store.repository import Store

MAX_HOST_CHARS = 253
MAX_USERNAME_CHARS = 256
MAX_PASSWORD_CHARS = 1024
MAX_ADDRESS_CHARS = 254  # RFC 5321: a path is at most 256 octets with its angle brackets
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class ImapConnectRequest:
    imap_server: MailServer | None
    smtp_server: MailServer | None
    username: str
    password: str
    capabilities: frozenset[Capability]
    email_address: str


def _valid_host(host: str) -> bool:
    if not host or len(host) > MAX_HOST_CHARS:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return all(_HOST_LABEL.match(label) for label in host.rstrip(".").split("."))


def parse_address(value: str) -> str | None:
    """The addr-spec if ``value`` is a plain RFC 5322 address, else None."""
    if not value or any(c in value for c in "\r\n\0<>,; "):
        return None
    try:
        address = Address(addr_spec=value)
    except (HeaderParseError, ValueError, IndexError):
        return None
    return address.addr_spec if address.domain and address.username else None


class ImapAccounts:
    def __init__(self, store: Store, blocking: BlockingPool, providers: BlockingPool, settings: ImapSettings) -> None:
        self._store = store
        self._blocking = blocking
        self._providers = providers
        self._settings = settings

    def _validate(self, request: ImapConnectRequest) -> tuple[MailServer, str]:
        violations: list[FieldViolation] = []
        refused: list[FieldViolation] = []
        reason = "INVALID_ARGUMENT"

        def check_server(server: MailServer | None, field: str, required: bool) -> None:
            nonlocal reason
            if server is None:
                if required:
                    violations.append(FieldViolation(field, "is required"))
                return
            if not _valid_host(server.host):
                violations.append(FieldViolation(f"{field}.host", "must be a host name or an IP address"))
            elif not self._settings.guard.check_literal(server.host):
                # An address literal is refused before anything is sent; names are checked when they resolve.
                refused.append(FieldViolation(f"{field}.host", "this address is not allowed by configuration"))
            if not 0 < server.port < 65536:
                violations.append(FieldViolation(f"{field}.port", "must be 1-65535"))
            if server.security is TransportSecurity.PLAINTEXT and not self._settings.allow_plaintext:
                reason = "PLAINTEXT_NOT_ALLOWED"
                violations.append(FieldViolation(f"{field}.security", "plaintext is not allowed by configuration"))

        sending = Capability.SEND in request.capabilities
        check_server(request.imap_server, "imap_server", True)
        check_server(request.smtp_server, "smtp_server", sending)
        for field, value, limit in (
            ("username", request.username, MAX_USERNAME_CHARS),
            ("password", request.password, MAX_PASSWORD_CHARS),
        ):
            if not value:
                violations.append(FieldViolation(field, "is required"))
            elif len(value) > limit or any(c in value for c in "\r\n\0"):
                violations.append(FieldViolation(field, f"at most {limit} characters, no CR, LF or NUL"))
        address = parse_address(request.email_address or request.username)
        if address is not None and len(address) > MAX_ADDRESS_CHARS:
            address = None
        if request.email_address and address is None:
            violations.append(
                FieldViolation("email_address", f"an RFC 5322 address of at most {MAX_ADDRESS_CHARS} characters")
            )
        elif sending and address is None:
            violations.append(FieldViolation("email_address", "is required to send (the username is no address)"))
        if refused and not violations:
            roles = [role for role in SERVER_ROLES if any(v.field.startswith(f"{role}.") for v in refused)]
            raise HostNotAllowed.of(*roles, field_violations=refused)
        if violations:
            raise InvalidArgument("the account settings are not valid", reason=reason, field_violations=violations)
        assert request.imap_server is not None
        return request.imap_server, address or ""

    async def connect(self, principal: Principal, request: ImapConnectRequest, deadline: float | None) -> Account:
        imap_server, address = self._validate(request)
        now = datetime.now(UTC)
        profile = AccountProfile(
            email_address=address,
            username=request.username,
            imap_server=imap_server,
            smtp_server=request.smtp_server,
        )
        driver = ImapDriver(profile, Credentials(request.username, request.password), self._providers, self._settings)
        timeout = self._settings.timeout_seconds
        if deadline is not None:
            # Give up a little before the caller does, so it gets our reason rather than a bare DEADLINE_EXCEEDED.
            timeout = max(0.1, min(deadline - MARGIN_SECONDS, timeout))
        await driver.verify(smtp=Capability.SEND in request.capabilities, timeout=timeout)
        account = Account(
            id=new_account_id(),
            tenant=principal.tenant,
            provider=Provider.IMAP,
            state=AccountState.ACTIVE,
            capabilities=request.capabilities,
            profile=profile,
            create_time=now,
            update_time=now,
        )
        await self._blocking.run(
            self._store.create_account, account, {"imap_password": request.password.encode("utf-8")}
        )
        await self._blocking.run(
            self._store.append_audit_event,
            "account_connected",
            principal.tenant,
            principal.identity,
            account.id,
            {"provider": Provider.IMAP.value, "capabilities": sorted(c.value for c in request.capabilities)},
        )
        return account
