"""The audit log's anchor: the chain head (sequence, digest) kept outside the database under a keyed MAC.

The hash chain alone cannot show a truncated tail, nor a tail rewritten consistently by someone who can write the
database. So after every append the broker writes the new head to a small file (default ``DATA_DIR/audit-anchor.json``,
mode 0600)::

    {"format": "mailbroker-audit-anchor/1", "sequence": 42, "digest": "<hex>", "kek_version": 2, "mac": "<hex>"}

``mac`` is HMAC-SHA256 over format, sequence and digest, keyed by HKDF of a key-encryption key, so forging an anchor
takes the key file, not just write access to the data directory. ``mailbroker audit verify`` then requires the log
to end exactly at the anchored event, with the anchored digest: deleted newest events, rewritten events and events
written around the broker all show.

Limits, honestly: someone who holds both the database and an *old copy* of the anchor file can roll both back to
that point together; a head that must survive that has to leave the host (the broker logs each new head's
sequence; ship the log, or record ``audit verify``'s printed head somewhere append-only). Several replicas on a
shared PostgreSQL each keep their own anchor file, which only the replica that wrote the newest event has current.

Appends update the anchor under an exclusive ``flock`` and only ever forward, so two processes appending (the
broker and ``mailbroker keys rotate``) cannot leave an older head behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import select
from sqlalchemy.engine import Connection

from server.crypto.keyring import Keyring, KeyringError
from server.store.audit import ChainBreak, ChainHead
from server.store.schema import audit_events

FORMAT = "mailbroker-audit-anchor/1"
_INFO = b"mailbroker/audit-anchor/v1"

log = logging.getLogger("mailbroker.audit")


class AnchorError(Exception):
    """The anchor file exists but cannot be trusted: unreadable, malformed, or its MAC does not check out."""


@dataclass(frozen=True)
class AnchoredHead:
    sequence: int
    digest: str


class AuditAnchor:
    """Reads and (forward only) writes the anchor file for one keyring."""

    def __init__(self, path: Path, keyring: Keyring) -> None:
        self.path = path
        self._keyring = keyring

    def record(self, sequence: int, digest: str) -> None:
        """Make (sequence, digest) the anchored head unless the file already holds a newer one.

        A failure is logged, never raised: the event it anchors is already committed, and ``audit verify`` will
        report the unanchored tail.
        """
        try:
            with self._locked():
                current = self._read_unverified()
                if current is not None and current.get("sequence", 0) >= sequence:
                    return
                version, kek = self._keyring.current()
                document = {"format": FORMAT, "sequence": sequence, "digest": digest, "kek_version": version}
                document["mac"] = _mac(kek, document)
                self._write(json.dumps(document, sort_keys=True).encode("ascii") + b"\n")
            log.info("audit head anchored", extra={"event": "audit_anchored", "count": sequence})
        except OSError:
            log.warning("could not write the audit anchor", extra={"event": "audit_anchor_failed", "path": self.path})

    def read(self) -> AnchoredHead | None:
        """The anchored head, None if there is no anchor file; AnchorError if it is there but not trustworthy."""
        try:
            document = self._read_unverified()
        except (OSError, ValueError):
            raise AnchorError(f"the anchor file {self.path} is unreadable or not JSON") from None
        if document is None:
            return None
        sequence, digest, version = document.get("sequence"), document.get("digest"), document.get("kek_version")
        if (
            document.get("format") != FORMAT
            or type(sequence) is not int
            or not isinstance(digest, str)
            or type(version) is not int
            or not isinstance(document.get("mac"), str)
        ):
            raise AnchorError(f"the anchor file {self.path} is not in the {FORMAT} format")
        try:
            kek = self._keyring.kek(version)
        except KeyringError:
            raise AnchorError(f"the anchor file {self.path} is sealed with KEK version {version}, not held") from None
        unsigned = {key: value for key, value in document.items() if key != "mac"}
        if not hmac.compare_digest(_mac(kek, unsigned), document["mac"]):
            raise AnchorError(f"the anchor file {self.path} does not carry a valid MAC: it was edited")
        return AnchoredHead(sequence, digest)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read_unverified(self) -> dict[str, Any] | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        document = json.loads(raw)
        if not isinstance(document, dict):
            raise ValueError("not an object")
        return document

    def _write(self, data: bytes) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise


def check_anchor(connection: Connection, head: ChainHead, anchored: AnchoredHead | None) -> ChainBreak | None:
    """Compare an intact chain's head with the anchor; return what does not match, or None."""
    if anchored is None:
        if head.sequence == 0:
            return None
        return ChainBreak(None, "", "no anchor file: the newest events cannot be checked for truncation")
    if anchored.sequence > head.sequence:
        return ChainBreak(
            anchored.sequence,
            "",
            f"the log ends at sequence {head.sequence} but the anchor records sequence {anchored.sequence}: "
            "the newest events were deleted (truncated tail)",
        )
    row = connection.execute(
        select(audit_events.c.event_id, audit_events.c.digest).where(audit_events.c.sequence == anchored.sequence)
    ).one_or_none()
    if row is None or row.digest != anchored.digest:
        return ChainBreak(
            anchored.sequence,
            "" if row is None else row.event_id,
            "the digest differs from the anchored one: the log up to here was rewritten",
        )
    if head.sequence > anchored.sequence:
        return ChainBreak(
            anchored.sequence + 1,
            "",
            f"events {anchored.sequence + 1}..{head.sequence} are not covered by the anchor: "
            "written around the broker, or the anchor could not be updated",
        )
    return None


def _mac(kek: bytes, document: dict[str, Any]) -> str:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(kek)
    message = json.dumps(document, sort_keys=True, separators=(",", ":")).encode("ascii")
    return hmac.new(key, message, hashlib.sha256).hexdigest()
