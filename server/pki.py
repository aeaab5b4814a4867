"""Development PKI: a private CA, the server's certificate and client certificates for mutual TLS.

The broker accepts only callers whose certificate chains to its client CA, and names each caller by that
certificate (:func:`identity_from_certificate`). This module makes such a PKI for development and tests; production
deployments bring certificates from their own CA. Layout written by :func:`create_dev_pki`::

    out_dir/               0700
      ca.pem               self-signed CA (path length 0: it signs leaves only)
      ca-key.pem           0600
      server.pem           SANs from server_names, EKU serverAuth
      server-key.pem       0600
      {name}.pem           per client: CN=name, URI SAN spiffe://{trust_domain}/{name}, EKU clientAuth
      {name}-key.pem       0600

Keys are EC P-256, written as unencrypted PKCS#8 PEM; signatures are ECDSA with SHA-256. An existing CA in
``out_dir`` is reused so that clients can be added later; existing leaf files are kept unless ``force=True``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.errors import ConfigurationError

__all__ = [
    "DEFAULT_DAYS",
    "DEFAULT_TRUST_DOMAIN",
    "CertKey",
    "DevPki",
    "create_dev_pki",
    "identity_from_certificate",
    "issue_cert",
    "new_ca",
]

DEFAULT_DAYS = 825
DEFAULT_TRUST_DOMAIN = "mailbroker.dev"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Certificates start a little in the past so that a peer whose clock runs slightly behind still accepts them.
_CLOCK_SKEW = timedelta(minutes=5)
_CLIENT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# A SPIFFE trust domain: lowercase letters, digits, dots, dashes and underscores (SPIFFE-ID spec, section 2.1).
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
# Client files are {name}.pem and {name}-key.pem: these names would overwrite the CA's or the server's files, and a
# name ending in "-key" would overwrite the key of the client named without it.
_RESERVED_CLIENT_NAMES = frozenset({"ca", "server"})
# Letters, digits, "-" and "_" (common in container host names) in dot-separated labels; "*." for a wildcard.
_DNS_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"(\*\.)?{_DNS_LABEL}(\.{_DNS_LABEL})*")


@dataclass(frozen=True)
class CertKey:
    """A certificate with its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        """Return the certificate as PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """Return the private key as unencrypted PKCS#8 PEM."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write the key (mode 0600) and then the certificate (mode 0644), each replaced atomically."""
        # Key first: a certificate on disk without its key would look like a usable pair to the next run.
        _write_atomically(key_path, self.key_pem(), 0o600)
        _write_atomically(cert_path, self.cert_pem(), 0o644)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertKey:
        """Read a PEM certificate and its EC private key, checking that they belong together."""
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read a PEM certificate from {cert_path}: {_reason(exc)}") from exc
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"cannot read an unencrypted PEM private key from {key_path}: {_reason(exc)}"
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError(f"{key_path} is not an EC private key")
        if key.public_key() != cert.public_key():
            raise ConfigurationError(f"{key_path} is not the private key of {cert_path}")
        return cls(cert=cert, key=key)


@dataclass(frozen=True)
class DevPki:
    """Where :func:`create_dev_pki` put the PKI's files."""

    directory: Path
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]
    """Client name -> (certificate, key)."""
    written: tuple[Path, ...] = field(default=())
    """Files this call wrote; the others already existed and were kept."""


def new_ca(
    common_name: str,
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> CertKey:
    """Create a self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before if not_before is not None else _now() - _CLOCK_SKEW
    end = not_after if not_after is not None else start + timedelta(days=DEFAULT_DAYS)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertKey(cert=cert, key=key)


def issue_cert(
    ca: CertKey,
    *,
    common_name: str | None,
    uri_sans: Sequence[str] = (),
    dns_sans: Sequence[str] = (),
    ip_sans: Sequence[str | IPAddress] = (),
    client: bool = True,
    server: bool = False,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> CertKey:
    """Issue a leaf certificate signed by ``ca`` for TLS clients, servers or both.

    ``common_name=None`` gives an empty subject (the SANs then name the holder). Without ``not_after`` the
    certificate lasts :data:`DEFAULT_DAYS` but never beyond the CA. Explicit times are used as given, so tests can
    make expired and not-yet-valid certificates.
    """
    if not (client or server):
        raise ValueError("a certificate must be for a TLS client, a TLS server or both")
    general_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri) for uri in uri_sans]
    general_names += [x509.DNSName(name) for name in dns_sans]
    general_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_sans]
    if common_name is None and not general_names:
        raise ValueError("a certificate without a common name needs at least one subject alternative name")

    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before if not_before is not None else _now() - _CLOCK_SKEW
    end = not_after if not_after is not None else min(start + timedelta(days=DEFAULT_DAYS), ca.cert.not_valid_after_utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name is not None else [])
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    usages += [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_identifier(ca.cert), critical=False)
    )
    if general_names:
        # RFC 5280 4.2.1.6: with an empty subject the SANs are the only name, and the extension must be critical.
        builder = builder.add_extension(x509.SubjectAlternativeName(general_names), critical=common_name is None)
    return CertKey(cert=builder.sign(ca.key, hashes.SHA256()), key=key)


def create_dev_pki(
    out_dir: Path,
    clients: Sequence[str] = ("client",),
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    server_names: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> DevPki:
    """Create (or extend) a development PKI in ``out_dir``: CA, server certificate and client certificates.

    An existing ``ca.pem`` + ``ca-key.pem`` pair is reused, so a later call can add clients signed by the same CA.
    Existing server and client files are kept unless ``force`` is true; kept files must have been issued by the CA.
    Every check runs before anything is written, so a failing call leaves ``out_dir`` as it was.

    Raises:
        ConfigurationError: a bad client name, trust domain, server name or lifetime, an unusable existing file,
            or a directory that cannot be written.
    """
    if isinstance(clients, str) or isinstance(server_names, str):
        raise TypeError("clients and server_names are sequences of names, not one str")
    names = list(dict.fromkeys(clients))  # de-duplicated, order kept
    for name in names:
        _check_client_name(name)
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise ConfigurationError(f"invalid trust domain {trust_domain!r}: use lowercase letters, digits, '.', '-', '_'")
    if not server_names or not all(server_names):
        raise ConfigurationError("the server certificate needs at least one non-empty server name")
    if days < 1:
        raise ConfigurationError(f"invalid certificate lifetime {days} days: it must be at least 1")
    dns_sans, ip_sans = _split_server_names(server_names)

    out_dir = Path(out_dir)
    ca_path, ca_key_path = out_dir / "ca.pem", out_dir / "ca-key.pem"
    server_pair = (out_dir / "server.pem", out_dir / "server-key.pem")
    client_pairs = {name: (out_dir / f"{name}.pem", out_dir / f"{name}-key.pem") for name in names}

    now = _now()
    if ca_path.exists() or ca_key_path.exists():
        if not (ca_path.exists() and ca_key_path.exists()):
            # Never replace half of a CA: other machines may already trust that ca.pem.
            missing = ca_key_path if ca_path.exists() else ca_path
            raise ConfigurationError(f"{missing} is missing; restore it or remove the other CA file in {out_dir}")
        ca = CertKey.load(ca_path, ca_key_path)
        new_ca_issued = False
        if not _is_ca(ca.cert):
            raise ConfigurationError(f"{ca_path} is not a CA certificate")
        if ca.cert.not_valid_after_utc <= now:
            raise ConfigurationError(f"the CA in {ca_path} expired on {ca.cert.not_valid_after_utc:%Y-%m-%d}")
    else:
        ca = new_ca("mailbroker development CA", not_after=now + timedelta(days=days))
        new_ca_issued = True

    # Leaves never outlive their CA: a verifier would reject them from that day on anyway.
    leaf_end = min(now + timedelta(days=days), ca.cert.not_valid_after_utc)
    to_issue: list[tuple[tuple[Path, Path], CertKey]] = []
    if force or not _kept_pair(server_pair, ca):
        server = issue_cert(
            ca,
            # X.509 caps a CN at 64 characters; verifiers read the SANs anyway.
            common_name=server_names[0] if len(server_names[0]) <= 64 else None,
            dns_sans=dns_sans,
            ip_sans=ip_sans,
            client=False,
            server=True,
            not_after=leaf_end,
        )
        to_issue.append((server_pair, server))
    for name, pair in client_pairs.items():
        if force or not _kept_pair(pair, ca):
            leaf = issue_cert(ca, common_name=name, uri_sans=[f"spiffe://{trust_domain}/{name}"], not_after=leaf_end)
            to_issue.append((pair, leaf))

    written: list[Path] = []
    try:
        _make_private_directory(out_dir)
        if new_ca_issued:
            ca.write(ca_path, ca_key_path)
            written += [ca_path, ca_key_path]
        for (cert_path, key_path), cert_key in to_issue:
            cert_key.write(cert_path, key_path)
            written += [cert_path, key_path]
    except OSError as exc:
        raise ConfigurationError(f"cannot write the development PKI to {out_dir}: {_reason(exc)}") from exc

    return DevPki(
        directory=out_dir,
        ca=ca_path,
        ca_key=ca_key_path,
        server_cert=server_pair[0],
        server_key=server_pair[1],
        clients=client_pairs,
        written=tuple(written),
    )


def identity_from_certificate(cert_der_or_pem: bytes) -> str | None:
    """Return the caller identity a certificate names: its first URI SAN, else its subject CN, else None.

    Accepts DER or PEM (the first certificate of a PEM bundle). Returns None for anything that is not a
    certificate, and for a name with unprintable characters, which could forge log lines.
    """
    # The bytes come from the network: nothing here may raise, whatever the peer sent.
    try:
        data = bytes(cert_der_or_pem)
        if data.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
        identity = _first_uri_san(cert) or _common_name(cert)
    except Exception:
        return None
    if identity is None or not identity.isprintable():
        return None
    return identity


def _first_uri_san(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def _common_name(cert: x509.Certificate) -> str | None:
    for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        if isinstance(attribute.value, str) and attribute.value:
            return attribute.value
    return None


def _check_client_name(name: str) -> None:
    if not isinstance(name, str) or not _CLIENT_NAME.fullmatch(name):
        raise ConfigurationError(
            f"invalid client name {name!r}: use 1-63 of a-z 0-9 . _ - starting with a letter or digit"
        )
    if name in _RESERVED_CLIENT_NAMES or name.endswith("-key"):
        raise ConfigurationError(f"invalid client name {name!r}: it would overwrite another certificate's files")


def _split_server_names(server_names: Sequence[str]) -> tuple[list[str], list[IPAddress]]:
    dns_sans: list[str] = []
    ip_sans: list[IPAddress] = []
    for name in server_names:
        try:
            ip_sans.append(ipaddress.ip_address(name))
        except ValueError:
            dns_sans.append(name)
    for name in dns_sans:
        if len(name) > 253 or not _DNS_NAME.fullmatch(name):
            raise ConfigurationError(f"invalid server name {name!r}: not an IP address or an ASCII DNS name")
    return dns_sans, ip_sans


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _kept_pair(pair: tuple[Path, Path], ca: CertKey) -> bool:
    """Return True if both files exist and form a pair issued by ``ca``; False if neither exists."""
    cert_path, key_path = pair
    if not cert_path.exists() and not key_path.exists():
        return False
    if not (cert_path.exists() and key_path.exists()):
        missing = key_path if cert_path.exists() else cert_path
        raise ConfigurationError(f"{missing} is missing; remove the other file or regenerate with force")
    existing = CertKey.load(cert_path, key_path)
    try:
        existing.cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ConfigurationError(
            f"{cert_path} was not issued by the CA in this directory; regenerate with force"
        ) from exc
    return True


def _authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        public_key = ca_cert.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise ValueError("the CA certificate has no subject key identifier and no EC key") from None
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _make_private_directory(path: Path) -> None:
    if path.is_dir():
        # An existing directory is the operator's choice (it may be "."); the key files themselves are 0600.
        return
    path.mkdir(mode=0o700, parents=True)
    path.chmod(0o700)  # mkdir's mode is filtered by the umask


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    # A fresh file (O_EXCL) gets exactly ``mode``; rewriting an existing file in place would keep its old, possibly
    # wider, permissions, and a crash midway would leave half a key.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)  # the umask may have narrowed it; a certificate should stay readable
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _now() -> datetime:
    return datetime.now(UTC)


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
