"""The SSRF guard for IMAP and SMTP: which addresses the broker may connect to on a caller's behalf.

A caller names the mail server of an account, so without a guard the broker would connect wherever it is told: to
its own loopback services, the cloud metadata endpoint (169.254.169.254), the internal network. Every connection
resolves the host name once, checks every address it resolved to, and connects to a checked address (never
resolving the name again), while TLS still sends and verifies the name (SNI, certificate host name check). A name
that resolves to a public address when the account is connected and to a private one later (DNS rebinding) is
refused at the later connection.

:meth:`NetworkGuard.addresses` and :func:`connect` block (callers run them in a BlockingPool thread);
:meth:`NetworkGuard.addresses_async` and :func:`open_stream` are their event-loop forms.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from server.errors import FieldViolation, PermissionDenied, ProviderUnavailable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Addresses of a host name, in the order to try them (``socket.getaddrinfo``'s order).
Resolver = Callable[[str, int], list[str]]
# A name that resolves to more addresses than this is refused rather than checked one by one forever.
MAX_ADDRESSES = 32


#: Which of an account's servers a connection goes to: the field of ConnectImapAccountRequest (and of the account)
#: that names it.
ServerRole = Literal["imap_server", "smtp_server"]
SERVER_ROLES: tuple[ServerRole, ...] = ("imap_server", "smtp_server")
_ROLE_NAMES: dict[str, str] = {"imap_server": "IMAP", "smtp_server": "SMTP"}


class HostNotAllowed(PermissionDenied):
    """A refused IMAP or SMTP server: the message and ErrorInfo metadata ``server`` (``imap_server``,
    ``smtp_server`` or both, comma-separated) say which one, never its host or address."""

    default_reason = "HOST_NOT_ALLOWED"
    default_message = "the mail server's address is not allowed by this broker's configuration"

    @classmethod
    def of(cls, *roles: ServerRole, field_violations: Sequence[FieldViolation] = ()) -> HostNotAllowed:
        names = " and ".join(_ROLE_NAMES[role] for role in roles)
        whose = f"the {names} servers' addresses are" if len(roles) > 1 else f"the {names} server's address is"
        return cls(
            f"{whose} not allowed by this broker's configuration",
            metadata={"server": ",".join(roles)},
            field_violations=field_violations,
        )


def resolve(host: str, port: int) -> list[str]:
    """The host's addresses from the system resolver (an IP literal resolves to itself, with no lookup)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    addresses: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for: IPv4-mapped, 6to4, Teredo (the client) or NAT64."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def is_public(address: IPAddress) -> bool:
    """Globally routable unicast: not loopback, link-local, private, shared (CGNAT), multicast, unspecified,
    reserved or documentation, in IPv4 or IPv6, nor an IPv6 address that embeds such an IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return is_public(embedded) and (address.ipv4_mapped is not None or address.is_global)
        if address.is_site_local:
            return False
    return not (
        address.is_loopback
        or address.is_link_local
        or address.is_private
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
        or not address.is_global
    )


@dataclass(frozen=True)
class NetworkGuard:
    """Public addresses, plus the networks the operator allowed (``[imap] allowed_networks``)."""

    allowed_networks: tuple[IPNetwork, ...] = ()
    # None: the system resolver (looked up at each call, so tests can stand a stub in for it).
    resolver: Resolver | None = field(default=None, compare=False)

    @classmethod
    def from_config(cls, networks: Sequence[str], resolver: Resolver | None = None) -> NetworkGuard:
        """Raises ValueError for a network that does not parse (config checks it at start-up)."""
        return cls(tuple(ipaddress.ip_network(n, strict=False) for n in networks), resolver)

    def permits(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1 to the kernel
        if any(address in network for network in self.allowed_networks if network.version == address.version):
            return True
        return is_public(address)

    def check_literal(self, host: str) -> bool:
        """False when ``host`` is an IP literal this guard refuses (True for names: they are checked when resolved)."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return True
        return self.permits(address)

    def addresses(self, host: str, port: int, *, role: ServerRole) -> list[str]:
        """Resolve ``host`` once and return its addresses if every one is permitted; else raise HostNotAllowed
        (naming ``role``, the server the connection is for).

        All of them, not some: a name that also resolves to a private address is refused, so which address a
        connection ends up on cannot decide whether the guard applies.
        """
        try:
            resolved = (self.resolver or resolve)(host, port)
        except (socket.gaierror, UnicodeError) as exc:
            raise ProviderUnavailable(
                "the mail server's host name does not resolve", reason="PROVIDER_UNREACHABLE"
            ) from exc
        if not resolved:
            raise ProviderUnavailable("the mail server's host name does not resolve", reason="PROVIDER_UNREACHABLE")
        if len(resolved) > MAX_ADDRESSES:
            raise HostNotAllowed.of(role)
        for text in resolved:
            try:
                address = ipaddress.ip_address(text.split("%", 1)[0])  # a scoped IPv6 address is link-local anyway
            except ValueError:
                raise HostNotAllowed.of(role) from None
            if not self.permits(address):
                raise HostNotAllowed.of(role)
        return resolved

    async def addresses_async(self, host: str, port: int, *, role: ServerRole) -> list[str]:
        return await asyncio.to_thread(lambda: self.addresses(host, port, role=role))


def connect(addresses: Sequence[str], port: int, timeout: float) -> socket.socket:
    """A TCP connection to the first of ``addresses`` (already checked) that answers, like
    ``socket.create_connection`` but without resolving anything."""
    last: OSError | None = None
    for address in addresses:
        try:
            return socket.create_connection((address, port), timeout=timeout)
        except OSError as exc:
            last = exc
    assert last is not None  # addresses is never empty
    raise last


async def open_stream(
    addresses: Sequence[str], port: int, *, tls: ssl.SSLContext | None, server_hostname: str | None, limit: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """:func:`connect` on the event loop (the caller bounds it with a timeout), with TLS when ``tls`` is given.

    The addresses are IP literals, which neither asyncio's loop nor uvloop resolves in a thread of their own (uvloop's
    ``sock_connect`` would: four libuv threads for nothing). A TLS failure ends the attempt; only TCP failures move
    on to the next address."""
    last: OSError | None = None
    for address in addresses:
        try:
            return await asyncio.open_connection(
                address, port, ssl=tls, server_hostname=server_hostname if tls else None, limit=limit
            )
        except ssl.SSLError:
            raise
        except OSError as exc:
            last = exc
    assert last is not None  # addresses is never empty
    raise last
