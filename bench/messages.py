"""Messages the figures read: a realistic newsletter-sized mail, small list fillers, a large attachment."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

RECEIVED = (
    "from mx{n}.example.net (mx{n}.example.net [192.0.2.{n}]) by mail.example.test (Dovecot) with LMTP id "
    "k3Jd9a{n}ZmZQAAB for <rcpt@example.test>; Tue, 04 Jun 2024 10:1{n}:00 +0000"
)


def realistic(subject: str, *, to: str, attachment_bytes: int = 32 * 1024) -> bytes:
    """A typical mail as received: Received/DKIM headers, encoded words, text + HTML alternatives, a PDF."""
    message = EmailMessage()
    for n in range(4):
        message["Received"] = RECEIVED.format(n=n + 1)
    message["DKIM-Signature"] = "v=1; a=rsa-sha256; d=example.net; s=sel; h=from:to:subject:date; bh=" + "x" * 44
    message["From"] = "Zoë Müller <zoe@example.net>"
    message["To"] = f"Récipient <{to}>"
    message["Cc"] = "team@example.net, Other Person <other@example.net>"
    message["Subject"] = subject
    message["Date"] = format_datetime(datetime(2024, 6, 4, 10, 15, tzinfo=UTC))
    message["Message-ID"] = make_msgid(domain="example.net")
    message["List-Unsubscribe"] = "<https://example.net/unsubscribe?id=0123456789abcdef>"
    paragraph = "Grüße aus dem Benchmark — a paragraph of ordinary text that wraps as mail does. " * 6
    message.set_content("\n\n".join([paragraph] * 6))
    message.add_alternative(
        "<html><body>" + "".join(f"<p>{paragraph}</p>" for _ in range(12)) + "</body></html>", subtype="html"
    )
    if attachment_bytes:
        payload = os.urandom(attachment_bytes)
        message.add_attachment(payload, maintype="application", subtype="pdf", filename="report.pdf")
    return message.as_bytes()


def filler(index: int) -> bytes:
    """Message ``index`` of a huge folder: small, distinct, with the headers a listing reads."""
    date = datetime(2020, 1, 1, tzinfo=UTC) + timedelta(minutes=index)
    return (
        f"From: Sender {index % 97} <sender{index % 97}@example.net>\r\n"
        f"To: rcpt@example.test\r\n"
        f"Subject: Message number {index}\r\n"
        f"Date: {format_datetime(date)}\r\n"
        f"Message-ID: <bench-{index}@example.net>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        f"Body of message {index}.\r\n"
    ).encode()


def with_attachment(size: int, *, to: str) -> tuple[bytes, bytes]:
    """A short mail with one ``size``-byte binary attachment (base64 on the wire); returns (raw, attachment)."""
    payload = os.urandom(size)
    message = EmailMessage()
    message["From"] = "sender@example.net"
    message["To"] = to
    message["Subject"] = f"{size} bytes attached"
    message.set_content("See the attachment.\n")
    message.add_attachment(payload, maintype="application", subtype="octet-stream", filename="big.bin")
    return message.as_bytes(), payload
