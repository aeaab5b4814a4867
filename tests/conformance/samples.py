"""Made-up messages for the conformance suite (raw RFC 5322 bytes, as they arrive at a provider)."""

from __future__ import annotations

import base64
import binascii
import random
import secrets
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime

DOMAIN = "conformance.example.test"


def message_id() -> str:
    return f"<{secrets.token_hex(8)}@{DOMAIN}>"


def simple(
    subject: str,
    *,
    body: str = "",
    to: str = "reader@example.test",
    internet_message_id: str | None = None,
) -> tuple[bytes, str]:
    """A one-part text message; returns (raw, Message-ID)."""
    mid = internet_message_id or message_id()
    message = EmailMessage()
    message["From"] = "Sam Sender <sam@example.test>"
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = format_datetime(datetime(2024, 3, 1, 9, 30, tzinfo=UTC))
    message["Message-ID"] = mid
    message.set_content(body or f"The body of {subject}.\n")
    return message.as_bytes(), mid


# A message whose every header field a reader decodes is non-ASCII, in two charsets and both RFC 2047 encodings, with
# a text and an HTML body, an inline image the HTML refers to (multipart/related), and an attachment whose file
# name is RFC 2231 encoded.
RICH_SUBJECT = "Grüße aus Köln — 東京"
RICH_SENDER = ("joerg.mueller@example.test", "Jörg Müller")
RICH_TO = ("zoe@example.test", "Zoë Æbelø")
RICH_CC = "plain.cc@example.test"
RICH_DATE = datetime(2024, 2, 29, 23, 59, 1, tzinfo=UTC)
RICH_TEXT = "Hallo Zoë,\nanbei der Bericht für März.\n"
RICH_HTML_MARK = "Bericht für März"
IMAGE_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3
IMAGE_CID = "logo-7f3a@example.test"
PDF_BYTES = b"%PDF-1.4\n" + bytes(random.Random(7).randrange(256) for _ in range(5000))
PDF_NAME = "Bericht März.pdf"


def _b64(data: bytes) -> str:
    encoded = base64.b64encode(data).decode()
    return "\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))


def _qp_text(text: str) -> str:
    return binascii.b2a_qp(text.encode("utf-8"), istext=True).decode("ascii").replace("\n", "\r\n")


def rich() -> tuple[bytes, str]:
    mid = message_id()
    html = f'<html><body><p>Hallo Zoë,</p><p>anbei der {RICH_HTML_MARK}.</p><img src="cid:{IMAGE_CID}"></body></html>'
    raw = "\r\n".join(
        [
            "From: =?iso-8859-1?q?J=F6rg_M=FCller?= <joerg.mueller@example.test>",
            "To: =?utf-8?b?Wm/DqyDDhmJlbMO4?= <zoe@example.test>",
            f"Cc: {RICH_CC}",
            # Folded over two lines, two encoded words (base64 then Q): decoders join them without the space.
            "Subject: =?utf-8?b?R3LDvMOfZSBhdXMgS8O2bG4g4oCUIA==?=",
            " =?utf-8?q?=E6=9D=B1=E4=BA=AC?=",
            f"Date: {format_datetime(RICH_DATE)}",
            f"Message-ID: {mid}",
            "MIME-Version: 1.0",
            'Content-Type: multipart/mixed; boundary="mixed-b0undary"',
            "",
            "--mixed-b0undary",
            'Content-Type: multipart/related; boundary="related-b0undary"; type="multipart/alternative"',
            "",
            "--related-b0undary",
            'Content-Type: multipart/alternative; boundary="alt-b0undary"',
            "",
            "--alt-b0undary",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: quoted-printable",
            "",
            _qp_text(RICH_TEXT),
            "--alt-b0undary",
            "Content-Type: text/html; charset=utf-8",
            "Content-Transfer-Encoding: quoted-printable",
            "",
            _qp_text(html),
            "--alt-b0undary--",
            "",
            "--related-b0undary",
            "Content-Type: image/png",
            "Content-Transfer-Encoding: base64",
            'Content-Disposition: inline; filename="logo.png"',
            f"Content-ID: <{IMAGE_CID}>",
            "",
            _b64(IMAGE_BYTES),
            "--related-b0undary--",
            "",
            "--mixed-b0undary",
            "Content-Type: application/pdf",
            "Content-Transfer-Encoding: base64",
            "Content-Disposition: attachment; filename*=utf-8''Bericht%20M%C3%A4rz.pdf",
            "",
            _b64(PDF_BYTES),
            "--mixed-b0undary--",
            "",
        ]
    )
    return raw.encode("ascii"), mid


def payload(size: int, seed: int) -> bytes:
    """``size`` reproducible, incompressible bytes of every value (CR, LF, NUL, '=' included)."""
    return random.Random(seed).randbytes(size)


def with_attachment(data: bytes, *, encoding: str, filename: str) -> tuple[bytes, str]:
    """A text message with one application/octet-stream attachment in ``encoding`` (base64 or quoted-printable)."""
    mid = message_id()
    if encoding == "base64":
        body = _b64(data)
    elif encoding == "quoted-printable":
        # Binary quoted-printable: CR and LF are escaped (=0D, =0A), so the bytes come back exactly.
        body = binascii.b2a_qp(data, quotetabs=True, istext=False).decode("ascii").replace("\n", "\r\n")
    else:
        raise ValueError(encoding)
    raw = "\r\n".join(
        [
            "From: Sam Sender <sam@example.test>",
            "To: reader@example.test",
            f"Subject: attachment in {encoding}",
            f"Date: {format_datetime(datetime(2024, 3, 2, 8, 0, tzinfo=UTC))}",
            f"Message-ID: {mid}",
            "MIME-Version: 1.0",
            'Content-Type: multipart/mixed; boundary="att-b0undary"',
            "",
            "--att-b0undary",
            "Content-Type: text/plain; charset=us-ascii",
            "",
            "See the attachment.",
            "--att-b0undary",
            "Content-Type: application/octet-stream",
            f"Content-Transfer-Encoding: {encoding}",
            f'Content-Disposition: attachment; filename="{filename}"',
            "",
            body,
            "--att-b0undary--",
            "",
        ]
    )
    return raw.encode("ascii"), mid
