"""Tests for server.providers.mime: transfer decoders, header and message parsing, part bytes, building.

Sample messages live in mime_samples/ (made up; stored with LF, read with CRLF as on the wire). Checks on message
content go through :func:`expect`, which asserts a boolean computed beforehand: pytest's assertion rewriting then
has no subject, address or body to print, only the description of what went wrong.
"""

from __future__ import annotations

import base64
import binascii
import random
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from server.domain.mail import EmailAddress, OutgoingAttachment, OutgoingMessage
from server.errors import FailedPrecondition, InvalidArgument
from server.providers import mime

SAMPLES = Path(__file__).parent / "mime_samples"


def seeded(seed: int) -> random.Random:
    """A reproducible generator for test data (nothing here is a secret)."""
    return random.Random(seed)


SENDER = EmailAddress("me@example.com", "Me")
DOMAIN = "mail.example.com"
NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def expect(ok: bool, what: str) -> None:
    """Assert a precomputed check; on failure only ``what`` is shown, never the values compared."""
    assert ok, what


def crlf(text: bytes) -> bytes:
    return text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def build(message: OutgoingMessage, sender: EmailAddress = SENDER) -> mime.BuiltMessage:
    return mime.build_message(message, sender, message_id_domain=DOMAIN, now=NOW)


def header_block(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


# --- Transfer decoders ------------------------------------------------------------------------------------------------


def feed_in_pieces(make: Callable[[], mime.IncrementalDecoder], data: bytes, rng: random.Random) -> bytes:
    decoder = make()
    out = bytearray()
    pos = 0
    while pos < len(data):
        size = rng.choice((0, 1, 1, 2, 3, 4, 5, 7, 13, 64, 1000))
        out += decoder.feed(data[pos : pos + size])
        pos += size
    return bytes(out + decoder.finish())


def one_shot(encoding: str, data: bytes) -> bytes:
    decoder = mime.make_decoder(encoding)
    return decoder.feed(data) + decoder.finish()


def test_quoted_printable_matches_a2b_qp_however_the_input_is_cut() -> None:
    # The alphabet is the characters a2b_qp treats specially, so that escapes, soft breaks, "==" and "=\r" junk
    # keep landing on chunk boundaries.
    rng = seeded(20240601)
    alphabet = b"==\r\n\r\nAf0Zx _\t"
    for _ in range(5000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        ok = feed_in_pieces(lambda: mime.make_decoder("quoted-printable"), data, rng) == binascii.a2b_qp(data)
        expect(ok, "chunked quoted-printable differs from binascii.a2b_qp")


@pytest.mark.parametrize(
    "pieces",
    [
        [b"caf=", b"C3=A9"],  # "=" at the end of a chunk
        [b"caf=C", b"3=A9"],  # "=X" at the end of a chunk
        [b"caf=C3=", b"\r\n", b"=A9"],  # soft line break split
        [b"caf=C3=\r", b"\n=A9"],  # soft line break split after CR
        [b"caf", b"=C3", b"=A9"],
    ],
)
def test_quoted_printable_escape_split_across_chunks(pieces: list[bytes]) -> None:
    decoder = mime.make_decoder("Quoted-Printable")
    out = b"".join(decoder.feed(p) for p in pieces) + decoder.finish()
    expect(out == "café".encode(), "an escape split across chunks was decoded wrongly")


def test_quoted_printable_does_not_hold_back_a_long_line() -> None:
    decoder = mime.make_decoder("quoted-printable")
    out = decoder.feed(b"x" * 100_000)
    assert len(out) == 100_000
    assert decoder.feed(b"=4") == b""  # may be the start of an escape
    assert decoder.feed(b"1") == b"A"
    assert decoder.finish() == b""


def test_base64_matches_the_standard_decoder_for_valid_input() -> None:
    rng = seeded(7)
    for _ in range(500):
        raw = rng.randbytes(rng.randint(0, 300))
        for encoded in (
            base64.encodebytes(raw),
            base64.b64encode(raw),
            base64.encodebytes(raw).replace(b"\n", b"\r\n"),
        ):
            expect(feed_in_pieces(lambda: mime.make_decoder("base64"), encoded, rng) == raw, "base64 decoded wrongly")


def test_base64_is_the_same_however_junk_input_is_cut() -> None:
    rng = seeded(11)
    alphabet = b"QUJDabc+/09==\r\n \t!-*"
    for _ in range(5000):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        reference = one_shot("base64", data)
        ok = feed_in_pieces(lambda: mime.make_decoder("BASE64"), data, rng) == reference
        expect(ok, "chunked base64 differs from one-shot base64")


@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [
        (b"QUJD\r\nREVG\r\n", b"ABCDEF"),
        (b"QU\r\nJD RE\tVG", b"ABCDEF"),  # white space anywhere
        (b"QUJDRA", b"ABCD"),  # padding missing
        (b"QUJDRA==\r\n-- \r\nsignature!", b"ABCD"),  # "=" ends the data; junk after it is ignored
        (b"QUJD!!!*REVG", b"ABCDEF"),  # characters outside the alphabet are skipped
        (b"QUJDR", b"ABC"),  # a single leftover character cannot make a byte
        (b"", b""),
        (b"====", b""),
    ],
)
def test_base64_leniency(encoded: bytes, decoded: bytes) -> None:
    assert one_shot("base64", encoded) == decoded
    decoder = mime.make_decoder("base64")
    assert b"".join(decoder.feed(bytes([c])) for c in encoded) + decoder.finish() == decoded


@pytest.mark.parametrize("encoding", ["7bit", "8bit", "binary", "", "x-uuencode", "BINARY"])
def test_identity_encodings_pass_bytes_through(encoding: str) -> None:
    data = bytes(range(256)) * 3
    rng = seeded(3)
    assert feed_in_pieces(lambda: mime.make_decoder(encoding), data, rng) == data


def test_decoded_size_estimate_is_close_for_base64_lines() -> None:
    for size in (0, 1, 57, 1000, 123_456):
        encoded = base64.encodebytes(b"x" * size).replace(b"\n", b"\r\n")
        estimate = mime.decoded_size_estimate(len(encoded), "base64")
        assert abs(estimate - size) <= 3
    assert mime.decoded_size_estimate(1234, "7bit") == 1234
    assert mime.decoded_size_estimate(1234, "quoted-printable") == 1234
    assert mime.decoded_size_estimate(-5, "base64") == 0


# --- Charsets and encoded words -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "charset", "text"),
    [
        ("Grüße".encode("iso-8859-1"), "ISO-8859-1", "Grüße"),
        ("Grüße".encode(), "utf-8", "Grüße"),
        ("Grüße".encode(), None, "Grüße"),  # undeclared: UTF-8
        ("Grüße".encode("latin-1"), None, "Grüße"),  # undeclared and not UTF-8: Latin-1
        ("Grüße".encode(), "x-no-such-charset", "Grüße"),
        ("Grüße".encode(), "us-ascii", "Grüße"),  # a frequent mislabel
        ("日本".encode("shift_jis"), "Shift_JIS", "日本"),
        ("日本".encode("gb18030"), "gb2312", "日本"),  # labels mail uses for supersets
        (b"ok \xff", "utf-8", "ok \ufffd"),  # declared charset, bad byte: replacement character
        (b"QUJD", "base64", "QUJD"),  # a bytes-to-bytes codec is not a charset
        (b"abc-xyz", "punycode", "abc-xyz"),  # blocked: not a mail charset, slow on hostile input
        (b"\\u0041", "unicode_escape", "\\u0041"),
    ],
)
def test_decode_text(data: bytes, charset: str | None, text: str) -> None:
    expect(mime.decode_text(data, charset) == text, "text decoded wrongly")


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        ("=?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=", "Grüße aus Köln"),
        ("=?UTF-8?B?R3LDvMOfZQ==?= und mehr", "Grüße und mehr"),
        ("=?iso-8859-1?q?Andr=E9?= Example", "André Example"),
        ("=?utf-8?q?a?= =?utf-8?q?b?=", "ab"),  # white space between encoded words is dropped
        ("=?utf-8?q?a?=\r\n =?utf-8?q?b?=", "ab"),
        ("=?utf-8?q?a?= x =?utf-8?q?b?=", "a x b"),
        # A character split across two words (mailers do this) still decodes.
        ("=?utf-8?B?5pc=?= =?utf-8?B?peacrA==?=", "日本"),
        ("=?utf-8*en?q?language_tag?=", "language tag"),
        ("=?x-unknown?q?caf=C3=A9?=", "café"),  # unknown charset: UTF-8
        ("=?x-unknown?q?bad=FF?=", "bad\ufffd"),  # ... with replacement characters
        ("=?zlib?q?abc?=", "abc"),
        ("=?utf-8?x?not-an-encoding?=", "=?utf-8?x?not-an-encoding?="),
        ("plain text =? not encoded ?=", "plain text =? not encoded ?="),
        ("=?utf-8?b?!!!?=", ""),
    ],
)
def test_decode_header_text(value: str, decoded: str) -> None:
    expect(mime.decode_header_text(value) == decoded, "encoded words decoded wrongly")


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([("filename", "a.pdf")], {"filename": "a.pdf"}),
        ([("FileName", "a.pdf")], {"filename": "a.pdf"}),
        ([("filename*", "utf-8''Gr%C3%BC%C3%9Fe.pdf")], {"filename": "Grüße.pdf"}),
        ([("filename*", "iso-8859-1'de'Gr%FC%DFe.pdf")], {"filename": "Grüße.pdf"}),
        (
            [("filename*1", ".pdf"), ("filename*0*", "utf-8''Rechnung%20M%C3%A4rz")],  # out of order
            {"filename": "Rechnung März.pdf"},
        ),
        ([("name*0*", "utf-8''%E6%97"), ("name*1*", "%A5")], {"name": "日"}),  # split inside a character
        ([("filename", "plain.pdf"), ("filename*", "utf-8''better.pdf")], {"filename": "better.pdf"}),
        ([("filename*", "no-such-charset''caf%C3%A9")], {"filename": "café"}),
    ],
)
def test_decode_parameters_rfc2231(pairs: list[tuple[str, str]], expected: dict[str, str]) -> None:
    expect(mime.decode_parameters(pairs) == expected, "parameters decoded wrongly")


@pytest.mark.parametrize(
    ("content_type", "disposition", "filename", "in_related", "expected"),
    [
        ("text/plain", "", "", False, (False, False)),
        ("text/html", "inline", "", False, (False, False)),
        ("text/plain", "attachment", "", False, (True, False)),
        ("text/plain", "", "notes.txt", False, (True, False)),
        ("text/calendar", "", "", False, (True, False)),
        ("image/png", "", "", True, (True, True)),  # inline image of multipart/related
        ("image/png", "attachment", "", True, (True, False)),
        ("image/jpeg", "inline", "photo.jpg", False, (True, True)),
        ("message/rfc822", "", "", False, (True, False)),
    ],
)
def test_classify_part(
    content_type: str, disposition: str, filename: str, in_related: bool, expected: tuple[bool, bool]
) -> None:
    assert mime.classify_part(content_type, disposition, filename, in_related) == expected


# --- parse_headers ---------------------------------------------------------------------------------------------------


def test_parse_headers_of_a_message() -> None:
    parsed = mime.parse_headers(sample("mixed_attachments.eml"))
    expect(parsed.subject == "Rechnung März attached", "subject decoded wrongly")
    expect(parsed.sender == EmailAddress("erin@example.com", "Erin"), "sender parsed wrongly")
    expected_to = (EmailAddress("frank@example.org", "Frank"), EmailAddress("grace@example.org", "Smith, Grace"))
    expect(parsed.to == expected_to, "To parsed wrongly")
    assert parsed.cc == ()  # an empty group
    assert parsed.send_time == datetime(2024, 6, 5, 12, 0, tzinfo=UTC)
    expect(parsed.internet_message_id == "<mixed-1@example.com>", "Message-ID parsed wrongly")
    expect(parsed.in_reply_to == "<earlier@example.org>", "In-Reply-To parsed wrongly")
    expect(parsed.references == ("<first@example.org>", "<earlier@example.org>"), "References parsed wrongly")
    names = [name for name, _ in parsed.headers]
    assert names[:3] == ["From", "To", "Cc"]
    assert "Content-Type" in names
    subject_values = [value for name, value in parsed.headers if name == "Subject"]
    expect(subject_values == ["Rechnung März attached"], "header list not decoded")


def test_parse_headers_from_a_header_block_alone_and_folded_fields() -> None:
    block = crlf(
        b"Received: from a\n\tby b; Mon, 3 Jun 2024 10:15:00 +0200\n"
        b"Subject: a long subject\n  folded twice\n\tand thrice\n"
        b"Date: Mon, 3 Jun 2024 10:14:59 +0200\n"
    )
    parsed = mime.parse_headers(block)
    expect(parsed.subject == "a long subject  folded twice\tand thrice", "folded subject unfolded wrongly")
    assert parsed.send_time == datetime(2024, 6, 3, 8, 14, 59, tzinfo=UTC)
    assert parsed.send_time is not None and parsed.send_time.utcoffset() == timedelta(0)
    assert [name for name, _ in parsed.headers] == ["Received", "Subject", "Date"]


@pytest.mark.parametrize(
    ("date", "expected"),
    [
        ("Tue, 4 Jun 2024 08:00:00 -0000", datetime(2024, 6, 4, 8, 0, tzinfo=UTC)),  # no zone information
        ("4 Jun 2024 08:00:00 +0530", datetime(2024, 6, 4, 2, 30, tzinfo=UTC)),
        ("Tue, 4 Jun 24 08:00:00 GMT", datetime(2024, 6, 4, 8, 0, tzinfo=UTC)),
        ("not a date", None),
        ("Tue, 99 Foo 2024 99:99:99 +9999", None),
        ("", None),
    ],
)
def test_send_time_is_utc_or_none(date: str, expected: datetime | None) -> None:
    parsed = mime.parse_headers(f"Date: {date}\r\n\r\n".encode())
    assert parsed.send_time == expected
    if parsed.send_time is not None:
        assert parsed.send_time.tzinfo is not None


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (
            "A Group: a@example.com, B <b@example.org>;, c@example.net",
            ["a@example.com", "b@example.org", "c@example.net"],
        ),
        ("undisclosed-recipients:;", []),
        ('"Smith, John" <john@example.com>, jane@example.com (Jane Doe)', ["john@example.com", "jane@example.com"]),
        ("broken <>, a@@b, @b, a@, foo bar@baz.com, <a b@c.d>, ok@example.com", ["ok@example.com"]),
        ("<@relay.example:route@example.com>", ["route@example.com"]),
        ('"a b"@x.y, a@b', ['"a b"@x.y', "a@b"]),
        ("Müller <müller@exämple.de>", ["müller@exämple.de"]),  # RFC 6532
        ('"unterminated <x@y.z>, z@example.com', []),
    ],
)
def test_address_lists(field: str, expected: list[str]) -> None:
    parsed = mime.parse_headers(f"To: {field}\r\n\r\n".encode())
    expect([a.address for a in parsed.to] == expected, "addresses parsed wrongly")


@pytest.mark.parametrize(
    ("field", "name"),
    [
        ("=?utf-8?q?Gr=C3=BC=C3=9Fe?= =?utf-8?b?5pel5pys?= <x@y.z>", "Grüße日本"),
        ('"=?utf-8?q?Quoted?=" <q@example.com>', "Quoted"),  # mailers put encoded words in quotes
        # An encoded display name that decodes to something address-like stays a display name.
        ("=?utf-8?q?=3Cevil=40attacker=2Eexample=3E=2C?= <real@example.com>", "<evil@attacker.example>,"),
        ('"tab\there  two" <t@x.y>', "tab\there  two"),
        ("jane@example.com (Jane Doe)", "Jane Doe"),
        ("Name (comment) <n@x.y> (trailing)", "Name"),
        ("=?x-unknown?q?=FF?= <u@x.y>", "\ufffd"),
        ("=?utf-8?q?line=0D=0Abreak?= <u@x.y>", "line  break"),  # decoded line breaks become spaces
    ],
)
def test_display_names(field: str, name: str) -> None:
    parsed = mime.parse_headers(f"From: {field}\r\n\r\n".encode())
    expect(parsed.sender is not None and parsed.sender.display_name == name, "display name decoded wrongly")


def test_decoded_header_values_carry_no_line_breaks_or_controls() -> None:
    parsed = mime.parse_headers(b"Subject: =?utf-8?q?a=0D=0AInjected:_yes=00?=\r\nX-A: =?utf-8?q?b=0Ac?=\r\n\r\n")
    expect(parsed.subject == "a  Injected: yes\ufffd", "controls in a decoded subject not neutralised")
    values = [value for _, value in parsed.headers]
    expect(not any(re.search(r"[\r\n\x00]", v) for v in values), "a decoded header value has a line break")


def test_raw_8bit_headers_are_utf8_or_latin1() -> None:
    parsed = mime.parse_headers("Subject: Grüße\r\nX-Latin: Grüße\r\n\r\n".encode() + b"X-Raw: Gr\xfc\xdfe\r\n")
    expect(parsed.subject == "Grüße", "raw UTF-8 subject decoded wrongly")
    expect(dict(parsed.headers).get("X-Raw") is None, "fields after the blank line were read")
    parsed = mime.parse_headers(b"Subject: Gr\xfc\xdfe\r\n\r\n")
    expect(parsed.subject == "Grüße", "raw Latin-1 subject decoded wrongly")


def test_header_count_and_value_length_are_capped() -> None:
    many = b"".join(b"X-N%d: v\r\n" % i for i in range(mime.MAX_HEADERS + 100))
    parsed = mime.parse_headers(many + b"Subject: late\r\n\r\n")
    assert len(parsed.headers) == mime.MAX_HEADERS
    assert parsed.subject == ""  # beyond the cap
    long_value = b"Subject: " + b"a" * 100_000 + b"\r\n\r\n"
    parsed = mime.parse_headers(long_value)
    assert 0 < len(parsed.subject) <= mime.MAX_HEADER_VALUE_BYTES
    folded = b"Subject: a" + b"\r\n a" * 100_000 + b"\r\n\r\n"
    parsed = mime.parse_headers(folded)
    assert len(parsed.subject) <= mime.MAX_HEADER_VALUE_BYTES


def test_mbox_from_line_and_missing_blank_line() -> None:
    parsed = mime.parse_message(b"From someone@example.com Mon Jun  3 10:00:00 2024\r\nSubject: s\r\n\r\nbody\r\n")
    expect(parsed.subject == "s" and parsed.text_body == "body\r\n", "mbox From line not skipped")
    parsed = mime.parse_message(b"Subject: s\r\nthis line is not a header\r\nmore body\r\n")
    expect(parsed.text_body == "this line is not a header\r\nmore body\r\n", "body without blank line lost")


def test_lf_only_messages_parse() -> None:
    parsed = mime.parse_message(sample("alternative.eml").replace(b"\r\n", b"\n"))
    expect(parsed.text_body == "Grüße aus 日本", "LF-only text body parsed wrongly")
    expect(parsed.html_body == "<p>Grüße aus <b>日本</b></p>", "LF-only HTML body parsed wrongly")


# --- parse_message and part_bytes on samples ------------------------------------------------------------------------


def attachment_table(parsed: mime.ParsedMessage) -> list[tuple[str, str, str, bool, str, str]]:
    return [(a.section, a.filename, a.content_type, a.inline, a.content_id, a.encoding) for a in parsed.attachments]


def test_single_part_quoted_printable_latin1() -> None:
    raw = sample("plain_qp_latin1.eml")
    parsed = mime.parse_message(raw)
    expect(parsed.subject == "Grüße aus Köln", "subject decoded wrongly")
    expect(parsed.sender == EmailAddress("alice@example.com", "André Example"), "sender decoded wrongly")
    body = "Hallo Bob,\n\r\nschöne Grüße, dies ist eine sehr lange Zeile, die mit einem weichen Zeilenumbruch "
    expect(parsed.text_body == body + "fortgesetzt wird.\r\n", "quoted-printable Latin-1 body decoded wrongly")
    assert parsed.html_body == ""
    assert parsed.attachments == ()
    expect(mime.part_bytes(raw, "1") == parsed.text_body.encode("latin-1"), "section 1 of a single part is its body")
    assert mime.part_bytes(raw, "2") is None


def test_alternative() -> None:
    parsed = mime.parse_message(sample("alternative.eml"))
    expect(parsed.text_body == "Grüße aus 日本", "text body decoded wrongly")
    expect(parsed.html_body == "<p>Grüße aus <b>日本</b></p>", "HTML body decoded wrongly")
    assert parsed.attachments == ()
    assert parsed.send_time == datetime(2024, 6, 4, 8, 0, tzinfo=UTC)


def test_mixed_with_attachments() -> None:
    raw = sample("mixed_attachments.eml")
    parsed = mime.parse_message(raw)
    expect(parsed.text_body == "See the attached invoice.", "text body decoded wrongly")
    expect(parsed.html_body == "<p>See the attached invoice.</p>", "HTML body decoded wrongly")
    table = attachment_table(parsed)
    assert [row[0] for row in table] == ["2", "3", "4"]
    expect(table[0] == ("2", "Rechnung März.pdf", "application/pdf", False, "", "base64"), "RFC 2231 attachment")
    expect(table[1] == ("3", "notes.txt", "text/plain", False, "", "7bit"), "text attachment")
    expect(table[2] == ("4", "Rechnung März.pdf", "application/octet-stream", False, "", "base64"), "RFC 2047 name")
    sizes = [a.size_bytes for a in parsed.attachments]
    assert sizes == [len(b"%PDF-1.4 fake pdf for tests\n%%EOF\n"), len(b"plain text attachment"), 256]
    expect(mime.part_bytes(raw, "2") == b"%PDF-1.4 fake pdf for tests\n%%EOF\n", "part 2 bytes")
    expect(mime.part_bytes(raw, "4") == bytes(range(256)), "part 4 bytes")
    expect(mime.part_bytes(raw, "1.1") == b"See the attached invoice.", "part 1.1 bytes")
    expect(mime.part_bytes(raw, "1.2") == b"<p>See the attached invoice.</p>", "part 1.2 bytes")
    multipart = mime.part_bytes(raw, "1")
    expect(multipart is not None and multipart.startswith(b"--inner\r\n"), "a multipart section is its raw body")
    for missing in ("5", "1.3", "2.1", "0", "1.0", "", "1.", "a", "1..1", "TEXT", "1.MIME", "-1", "9999999"):
        assert mime.part_bytes(raw, missing) is None


def test_related_inline_image_with_content_id() -> None:
    raw = sample("related_inline.eml")
    parsed = mime.parse_message(raw)
    expect(parsed.text_body == "Logo below.", "text body decoded wrongly")
    expect(parsed.html_body.startswith("<p>Logo below"), "HTML body decoded wrongly")
    table = attachment_table(parsed)
    assert [row[0] for row in table] == ["1.2", "1.3", "2"]
    expect(table[0] == ("1.2", "", "image/png", True, "logo.png@01D9ABCD.12345670", "base64"), "inline image")
    expect(table[1] == ("1.3", "spacer.gif", "image/gif", False, "spacer@example.com", "base64"), "related attachment")
    expect(table[2] == ("2", "figures.csv", "text/csv", False, "", "quoted-printable"), "csv attachment")
    png = mime.part_bytes(raw, "1.2")
    expect(png is not None and png.startswith(b"\x89PNG\r\n"), "inline image bytes")
    # "=0D" then a hard line break (CRLF); the last CRLF belongs to the delimiter.
    expect(mime.part_bytes(raw, "2") == b"a,b\r\r\n1,2\r", "quoted-printable attachment bytes")
    assert parsed.attachments[2].size_bytes == len(b"a,b\r\r\n1,2\r")


def test_forwarded_message_is_an_attachment_and_not_walked_into() -> None:
    raw = sample("forwarded.eml")
    parsed = mime.parse_message(raw)
    expect(parsed.text_body == "Forwarding the message below.", "the outer body must win")
    table = attachment_table(parsed)
    assert [(row[0], row[2], row[3]) for row in table] == [("2", "message/rfc822", True)]
    # part_bytes can still reach into the encapsulated message (RFC 3501 numbering: 2.1, 2.2).
    inner = mime.part_bytes(raw, "2")
    expect(inner is not None and inner.startswith(b"From: Niaj"), "section 2 is the whole encapsulated message")
    expect(mime.part_bytes(raw, "2.1") == b"The inner text body must not become the outer body.", "section 2.1")
    expect(mime.part_bytes(raw, "2.2") == b"\x00\x01\x02\x03", "section 2.2")
    assert mime.part_bytes(raw, "2.3") is None
    assert mime.part_bytes(raw, "1.1") is None  # a text part has no subparts


def test_encapsulated_single_part_and_base64_encapsulation() -> None:
    raw = crlf(
        b'Content-Type: multipart/mixed; boundary="x"\n\n--x\nContent-Type: message/rfc822\n\n'
        b"Subject: inner\n\ninner body\n--x--\n"
    )
    expect(mime.part_bytes(raw, "1.1") == b"inner body", "section 1.1 is the body of a single-part inner message")
    assert mime.part_bytes(raw, "1.2") is None
    raw = sample("malformed_rfc822_base64.eml")
    expect(mime.part_bytes(raw, "1.1") == b"inner body\r\n", "base64-encoded message/rfc822 not decoded first")


def test_apple_mail_split_body() -> None:
    parsed = mime.parse_message(sample("apple_split_body.eml"))
    expect(parsed.text_body == "Here is the photo:\r\n", "first text part is the body")
    assert attachment_table(parsed) == [("2", "photo.jpg", "image/jpeg", True, "", "base64")]


def test_calendar_and_digest() -> None:
    raw = sample("calendar_digest.eml")
    parsed = mime.parse_message(raw)
    expect(parsed.text_body == "You are invited.", "text body")
    expect(parsed.html_body == "<p>You are invited.</p>", "HTML body")
    table = attachment_table(parsed)
    # text/calendar is not a body; parts of a digest default to message/rfc822.
    assert [(row[0], row[2]) for row in table] == [("1.3", "text/calendar"), ("2.1", "message/rfc822")]
    expect(mime.part_bytes(raw, "2.1.1") == b"First item.", "digest item body")


def test_uppercase_names_and_values() -> None:
    parsed = mime.parse_message(sample("uppercase.eml"))
    expect(parsed.text_body == "A=B", "upper-case quoted-printable body")
    assert attachment_table(parsed) == [("2", "X.JPG", "image/jpeg", True, "CID1", "base64")]


def test_section_numbering_of_deep_nesting() -> None:
    raw = crlf(
        b'Content-Type: multipart/mixed; boundary="a"\n\n'
        b'--a\nContent-Type: multipart/alternative; boundary="b"\n\n'
        b"--b\nContent-Type: text/plain\n\nT\n"
        b'--b\nContent-Type: multipart/related; boundary="c"\n\n'
        b"--c\nContent-Type: text/html\n\nH\n"
        b"--c\nContent-Type: image/png\nContent-ID: <i1>\n\nP1\n"
        b"--c\nContent-Type: image/png\nContent-ID: <i2>\n\nP2\n"
        b"--c--\n--b--\n"
        b"--a\nContent-Type: application/pdf; name=a.pdf\n\nPDF\n"
        b'--a\nContent-Type: multipart/mixed; boundary="d"\n\n'
        b"--d\nContent-Type: image/gif; name=g.gif\n\nGIF\n"
        b"--d\nContent-Type: application/zip; name=z.zip\n\nZIP\n"
        b"--d--\n--a--\n"
    )
    parsed = mime.parse_message(raw)
    expected = [("1.2.2", "i1"), ("1.2.3", "i2"), ("2", ""), ("3.1", ""), ("3.2", "")]
    assert [(a.section, a.content_id) for a in parsed.attachments] == expected
    contents = {a.section: mime.part_bytes(raw, a.section) for a in parsed.attachments}
    expected_contents = {"1.2.2": b"P1", "1.2.3": b"P2", "2": b"PDF", "3.1": b"GIF", "3.2": b"ZIP"}
    expect(contents == expected_contents, "part_bytes does not follow the section numbers")
    expect(mime.part_bytes(raw, "1.2.1") == b"H", "section 1.2.1")
    expect(parsed.text_body == "T" and parsed.html_body == "H", "bodies in nested parts")


def test_boundary_must_be_a_whole_line() -> None:
    parsed = mime.parse_message(sample("malformed_boundary_prefix.eml"))
    # "--simpler" is not a delimiter for boundary "simple" (RFC 2046 §5.1.1); transport padding after one is.
    expect(parsed.text_body == "A\r\n--simpler\r\nnot a delimiter", "boundary prefix taken for a delimiter")
    expect(parsed.html_body == "<b>B</b>", "delimiter with trailing white space not recognised")


# --- Malformed and hostile input ------------------------------------------------------------------------------------


def nested_multiparts(depth: int, same_boundary: bool = False) -> bytes:
    out = bytearray(b"Subject: nested\r\n")
    for level in range(depth):
        boundary = b"b" if same_boundary else b"b%d" % level
        out += b'Content-Type: multipart/mixed; boundary="%s"\r\n\r\n--%s\r\n' % (boundary, boundary)
    out += b"Content-Type: text/plain\r\n\r\ndeep\r\n"
    for level in reversed(range(depth)):
        out += b"--%s--\r\n" % (b"b" if same_boundary else b"b%d" % level)
    return bytes(out)


def test_nesting_is_walked_down_to_the_cap_only() -> None:
    at_cap = mime.parse_message(nested_multiparts(mime.MAX_MULTIPART_DEPTH))
    expect(at_cap.text_body == "deep", "text at the maximum depth not found")
    beyond = mime.parse_message(nested_multiparts(mime.MAX_MULTIPART_DEPTH + 1))
    assert beyond.text_body == ""
    assert beyond.attachments == ()


def test_part_count_is_capped() -> None:
    part = b"--b\r\nContent-Type: image/png; name=p.png\r\n\r\nx\r\n"
    raw = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + part * (mime.MAX_PARTS + 500) + b"--b--\r\n"
    parsed = mime.parse_message(raw)
    assert len(parsed.attachments) == mime.MAX_PARTS
    assert parsed.attachments[-1].section == str(mime.MAX_PARTS)


HOSTILE: dict[str, bytes] = {
    "10,000 nested multiparts": nested_multiparts(10_000),
    "10,000 nested multiparts, one boundary": nested_multiparts(10_000, same_boundary=True),
    "10 MB header line": b"Subject: " + b"a" * 10_000_000 + b"\r\n\r\nbody",
    "a million continuation lines": b"Subject: a" + b"\r\n a" * 1_000_000 + b"\r\n\r\nbody",
    "a million header fields": b"X-A: b\r\n" * 1_000_000 + b"\r\nbody",
    "no blank line, 5 MB": b"X: y\r\n" * 100 + b"a" * 5_000_000,
    "500,000 empty parts": b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + b"--b\r\n\r\nx\r\n" * 500_000,
    "many parts with long header blocks": b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    + (b"--b\r\n" + b"X: y\r\n" * 5000 + b"\r\nx\r\n") * 300,
    "quote storm in To": b"To: "
    + b'"' * 16_000
    + b"\r\nCc: "
    + b'"\\' * 8000
    + b"\r\nBcc: "
    + b'"' * 16_000
    + b"\r\n\r\n",
    "comment storm": b"From: " + b"(" * 16_000 + b"\r\nTo: " + b"((a)" * 4000 + b"\r\n\r\n",
    "angle storm": b"To: " + b"<" * 16_000 + b"\r\nCc: " + b"<a@b.c" * 2000 + b"\r\n\r\n",
    "many address fields": (b"To: " + b'"x' * 8000 + b"\r\n") * 500 + b"\r\n",
    "4000 recipients": b"To: " + b"a@b.c, " * 4000 + b"\r\n\r\n",
    "encoded-word storm": b"Subject: " + b"=?utf-8?q?" * 1600 + b"\r\nTo: " + b"=?utf-8?q?a?= " * 1100 + b"\r\n\r\n",
    "parameter storm": b'Content-Type: text/plain; name="' + b"\\;" * 8000 + b"\r\n\r\nx",
    "RFC 2231 continuation storm": b"Content-Type: application/x; "
    + b"".join(b"name*%d*=%%E6;" % i for i in range(2000))
    + b"\r\n\r\nx",
    "punycode charset": b"Subject: =?punycode?q?" + b"a" * 15_000 + b"?=\r\n\r\n",
    "binary garbage": seeded(5).randbytes(2_000_000),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_is_parsed_within_bounds(name: str) -> None:
    # No timing assert here (figures belong in bench/); a quadratic or recursive regression shows up as a slow
    # suite, and a RecursionError or MemoryError fails the test outright.
    raw = HOSTILE[name]
    parsed = mime.parse_message(raw)
    mime.parse_headers(raw)
    mime.part_bytes(raw, "1")
    mime.part_bytes(raw, ".".join(["1"] * 60))
    assert len(parsed.headers) <= mime.MAX_HEADERS
    assert len(parsed.attachments) <= mime.MAX_PARTS


MALFORMED = [
    "malformed_truncated.eml",
    "malformed_no_boundary.eml",
    "malformed_bad_base64.eml",
    "malformed_bad_charset.eml",
    "malformed_boundary_prefix.eml",
    "malformed_empty_parts.eml",
    "malformed_headerless_part.eml",
    "malformed_rfc822_base64.eml",
]


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_samples_never_raise_and_cut_anywhere(name: str) -> None:
    raw = sample(name)
    parsed = mime.parse_message(raw)
    for attachment in parsed.attachments:
        assert mime.part_bytes(raw, attachment.section) is not None
    for cut in range(0, len(raw), 7):  # every truncation of the sample
        truncated = mime.parse_message(raw[:cut])
        for attachment in truncated.attachments:
            assert mime.part_bytes(raw[:cut], attachment.section) is not None


def test_malformed_samples_best_effort_results() -> None:
    truncated = mime.parse_message(sample("malformed_truncated.eml"))
    expect(truncated.text_body == "first", "text before a truncated part lost")
    assert [(a.section, a.filename) for a in truncated.attachments] == [("2", "a.pdf")]
    assert truncated.attachments[0].size_bytes == len(base64.b64decode(b"JVBERi0xLjQgZmFr"))
    no_boundary = mime.parse_message(sample("malformed_no_boundary.eml"))
    expect(no_boundary.text_body.startswith("--x\r\n"), "multipart without boundary is shown as text")
    bad_base64 = mime.parse_message(sample("malformed_bad_base64.eml"))
    expect(bad_base64.text_body == "Hello world", "junk in base64 not skipped")
    assert bad_base64.attachments[0].size_bytes == 0
    bad_charset = mime.parse_message(sample("malformed_bad_charset.eml"))
    expect(bad_charset.text_body == "caf\u00c3\u00a9 \u00ff\r\n", "unknown charset, not UTF-8: Latin-1")
    empty = mime.parse_message(sample("malformed_empty_parts.eml"))
    assert [(a.section, a.size_bytes) for a in empty.attachments] == [("3", 0)]
    headerless = mime.parse_message(sample("malformed_headerless_part.eml"))
    expect(headerless.text_body == "no headers here", "a part without headers is text/plain")


def test_random_mutations_never_raise() -> None:
    rng = seeded(99)
    corpus = [sample(p.name) for p in sorted(SAMPLES.glob("*.eml"))]
    tokens = [b"\r\n", b"--", b'"', b"=?utf-8?b?", b"?=", b";", b"=", b"*0*=", b"%", b"<", b">", b"(", b"\\", b"\x00"]
    for _ in range(300):
        data = bytearray(rng.choice(corpus))
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(data) + 1)
            action = rng.random()
            if action < 0.4:
                data[pos:pos] = rng.choice(tokens)
            elif action < 0.7:
                del data[pos : pos + rng.randint(1, 20)]
            else:
                data[pos:pos] = rng.randbytes(rng.randint(1, 5))
        raw = bytes(data)
        parsed = mime.parse_message(raw)
        for attachment in parsed.attachments:
            mime.part_bytes(raw, attachment.section)


# --- build_message ---------------------------------------------------------------------------------------------------


def recipients(*addresses: str) -> tuple[EmailAddress, ...]:
    return tuple(EmailAddress(a) for a in addresses)


def test_text_only_message() -> None:
    built = build(OutgoingMessage(to=recipients("a@example.org"), subject="Hello", text_body="Hi there\n"))
    head = header_block(built.raw)
    assert b"Content-Type: text/plain" in head
    assert b"MIME-Version: 1.0" in head
    assert re.fullmatch(rb"<[0-9a-f]{32}@mail\.example\.com>", built.internet_message_id.encode())
    assert b"Message-ID: " + built.internet_message_id.encode() in head
    assert b"Date: Sat, 01 Jun 2024 12:00:00 +0000" in head
    parsed = mime.parse_message(built.raw)
    expect(parsed.text_body == "Hi there\r\n" and parsed.html_body == "", "text body round trip")
    assert parsed.internet_message_id == built.internet_message_id
    assert parsed.send_time == NOW


def test_message_ids_are_fresh_and_now_defaults_to_the_clock() -> None:
    message = OutgoingMessage(to=recipients("a@example.org"))
    first = mime.build_message(message, SENDER, message_id_domain=DOMAIN)
    second = mime.build_message(message, SENDER, message_id_domain=DOMAIN)
    assert first.internet_message_id != second.internet_message_id
    sent = mime.parse_headers(first.raw).send_time
    assert sent is not None and abs(sent - datetime.now(UTC)) < timedelta(minutes=1)
    naive = mime.build_message(message, SENDER, message_id_domain=DOMAIN, now=datetime(2024, 1, 1, 9, 30))
    assert mime.parse_headers(naive.raw).send_time == datetime(2024, 1, 1, 9, 30, tzinfo=UTC)
    other_zone = datetime(2024, 1, 1, 9, 30, tzinfo=timezone(timedelta(hours=2)))
    zoned = mime.build_message(message, SENDER, message_id_domain=DOMAIN, now=other_zone)
    assert b"Date: Mon, 01 Jan 2024 07:30:00 +0000" in header_block(zoned.raw)


def test_full_round_trip_with_non_ascii_everywhere() -> None:
    pdf = bytes(range(256)) * 40
    message = OutgoingMessage(
        to=(EmailAddress("to@example.org", "Grüße 日本"), EmailAddress('"quoted local"@example.org', "Q")),
        cc=(EmailAddress("cc@example.net", "Evil, <x@attacker.example>"),),
        bcc=(EmailAddress("hidden@example.net", "Hidden Person"),),
        reply_to=(EmailAddress("reply@example.com", "Réponse"),),
        subject="Grüße 日本 — quarterly numbers",
        text_body="Hallo,\nGrüße aus 日本.\n",
        html_body='<p>Grüße aus <b>日本</b> <img src="cid:logo@example.com"></p>\n',
        attachments=(
            OutgoingAttachment("Grüße 日本.pdf", pdf),
            OutgoingAttachment(
                "logo.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, inline=True, content_id="logo@example.com"
            ),
            OutgoingAttachment("notes.txt", "ü\n".encode(), content_type="text/plain"),
            OutgoingAttachment("forwarded.eml", b"Subject: inner\r\n\r\ninner body\r\n", content_type="message/rfc822"),
        ),
        in_reply_to="<parent@example.org>",
        references=("<root@example.org>", "parent@example.org"),
        sender_display_name="Mé Myself",
    )
    built = build(message)
    parsed = mime.parse_message(built.raw)
    expect(parsed.subject == message.subject, "subject round trip")
    expect(parsed.sender == EmailAddress("me@example.com", "Mé Myself"), "sender round trip")
    expect(parsed.to == message.to, "To round trip")
    expect(parsed.cc == message.cc, "Cc round trip (a display name with specials stays one mailbox)")
    expect(parsed.reply_to == message.reply_to, "Reply-To round trip")
    expect(parsed.text_body.replace("\r\n", "\n") == message.text_body, "text body round trip")
    expect(parsed.html_body.replace("\r\n", "\n") == message.html_body, "HTML body round trip")
    expect(parsed.in_reply_to == "<parent@example.org>", "In-Reply-To round trip")
    expect(parsed.references == ("<root@example.org>", "<parent@example.org>"), "References round trip")
    table = [(a.section, a.filename, a.content_type, a.inline, a.content_id) for a in parsed.attachments]
    expect(
        table
        == [
            ("1.2.2", "logo.png", "image/png", True, "logo@example.com"),
            ("2", "Grüße 日本.pdf", "application/pdf", False, ""),
            ("3", "notes.txt", "text/plain", False, ""),
            ("4", "forwarded.eml", "message/rfc822", False, ""),
        ],
        "attachments round trip",
    )
    contents = {a.filename: mime.part_bytes(built.raw, a.section) for a in parsed.attachments}
    expect(contents["Grüße 日本.pdf"] == pdf, "PDF bytes round trip")
    expect(contents["logo.png"] == message.attachments[1].content, "inline image bytes round trip")
    expect(contents["notes.txt"] == "ü\n".encode(), "text attachment bytes round trip")
    expect(contents["forwarded.eml"] == b"Subject: inner\r\n\r\ninner body\r\n", "message/rfc822 round trip")
    assert [a.size_bytes for a in parsed.attachments] == [58, len(pdf), 3, 30]
    # message/rfc822 stays 7bit when it can (RFC 2046 §5.2.1); RFC 2231 for the non-ASCII file name.
    assert re.search(rb"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit", built.raw)
    assert b"filename*=utf-8''Gr%C3%BC%C3%9Fe%20%E6%97%A5%E6%9C%AC.pdf" in built.raw


def test_bcc_is_in_the_envelope_only() -> None:
    message = OutgoingMessage(
        to=recipients("to@example.org"),
        cc=recipients("CC@Example.NET"),
        bcc=(EmailAddress("secret.bcc@example.net", "Secret Name"), EmailAddress("to@example.org")),
        subject="s",
    )
    built = build(message)
    expect(b"secret.bcc" not in built.raw and b"Secret Name" not in built.raw, "Bcc leaked into the message")
    assert not re.search(rb"(?im)^bcc:", header_block(built.raw))
    assert mime.parse_headers(built.raw).bcc == ()
    expect(
        built.envelope_recipients == ("to@example.org", "CC@Example.NET", "secret.bcc@example.net"),
        "envelope recipients wrong (order, Bcc, duplicates)",
    )


def test_structure_by_content() -> None:
    def structure(message: OutgoingMessage) -> list[str]:
        raw = build(message).raw
        return [m.decode() for m in re.findall(rb"Content-Type: ([a-z]+/[a-z0-9.+-]+)", raw)]

    to = recipients("a@example.org")
    png = OutgoingAttachment("i.png", b"png", inline=True, content_id="i@x")
    pdf = OutgoingAttachment("a.pdf", b"pdf")
    assert structure(OutgoingMessage(to=to, text_body="t")) == ["text/plain"]
    assert structure(OutgoingMessage(to=to, html_body="h")) == ["text/html"]
    assert structure(OutgoingMessage(to=to)) == ["text/plain"]
    assert structure(OutgoingMessage(to=to, text_body="t", html_body="h")) == [
        "multipart/alternative",
        "text/plain",
        "text/html",
    ]
    assert structure(OutgoingMessage(to=to, html_body="h", attachments=(png,))) == [
        "multipart/related",
        "text/html",
        "image/png",
    ]
    assert structure(OutgoingMessage(to=to, text_body="t", attachments=(png, pdf))) == [
        "multipart/mixed",
        "text/plain",
        "image/png",
        "application/pdf",
    ]
    assert structure(OutgoingMessage(to=to, text_body="t", html_body="h", attachments=(pdf, png))) == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "multipart/related",
        "text/html",
        "image/png",
        "application/pdf",
    ]


def test_inline_part_without_html_is_inline_in_mixed() -> None:
    png = OutgoingAttachment("i.png", b"png", inline=True, content_id="<i@x>")
    built = build(OutgoingMessage(to=recipients("a@example.org"), text_body="t", attachments=(png,)))
    assert b"Content-Disposition: inline" in built.raw
    assert b"Content-ID: <i@x>" in built.raw  # angle brackets given by the caller are not doubled
    parsed = mime.parse_message(built.raw)
    assert [(a.section, a.inline, a.content_id) for a in parsed.attachments] == [("2", True, "i@x")]


@pytest.mark.parametrize(
    ("filename", "content_type"),
    [
        ("report.pdf", "application/pdf"),
        ("photo.JPG", "image/jpeg"),
        ("archive.tar.gz", "application/gzip"),
        ("noextension", "application/octet-stream"),
        ("weird.zz-unknown", "application/octet-stream"),
    ],
)
def test_content_type_guessed_from_filename(filename: str, content_type: str) -> None:
    message = OutgoingMessage(to=recipients("a@example.org"), attachments=(OutgoingAttachment(filename, b"data"),))
    parsed = mime.parse_message(build(message).raw)
    assert parsed.attachments[0].content_type == content_type


def test_given_content_type_is_kept_lower_case() -> None:
    attachment = OutgoingAttachment("x.bin", b"data", content_type="Application/VND.Example+JSON")
    parsed = mime.parse_message(build(OutgoingMessage(to=recipients("a@example.org"), attachments=(attachment,))).raw)
    assert parsed.attachments[0].content_type == "application/vnd.example+json"


def test_every_line_is_crlf_and_within_limits() -> None:
    message = OutgoingMessage(
        to=tuple(EmailAddress(f"user{i}@example.org", "Ünïcödé Name " * 4 + "!") for i in range(60)),
        cc=tuple(EmailAddress(f"c{i}@example.org", "x" * 200) for i in range(20)),
        subject="ü" * 998,
        text_body="a" * 5000 + "\n" + "ü" * 3000,
        html_body="<p>" + "b" * 5000 + "</p>",
        attachments=(OutgoingAttachment("ü" * 255, b"x" * 10_000),),
        references=tuple(f"<{'r' * 200}{i}@example.org>" for i in range(100)),
    )
    raw = build(message).raw
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert raw.isascii()
    lines = raw.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    assert max(len(line) for line in header_block(raw).split(b"\r\n")) <= 78 + 200  # long ids cannot fold
    parsed = mime.parse_message(raw)
    expect(parsed.subject == message.subject and parsed.to == message.to, "long fields round trip")
    expect(parsed.attachments[0].filename == "ü" * 255, "long RFC 2231 file name round trip")


def test_random_subjects_and_display_names_round_trip_exactly() -> None:
    # Characters that stress encoding and folding: specials, quotes, encoded-word look-alikes, tabs, runs of
    # spaces, multi-byte characters. The standard library's folder alters white space here; ours must not.
    rng = seeded(31337)
    alphabet = [*"aZ 09Üß日本\t,;:<>\"'()=?_@.\\é😀", "=?", "?=", "  "]
    for _ in range(400):
        subject = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200)))
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))).strip()
        message = OutgoingMessage(
            to=(EmailAddress("a@example.com", name), EmailAddress("b@example.com", name[::-1])),
            subject=subject,
            sender_display_name=name,
        )
        raw = build(message).raw
        parsed = mime.parse_headers(raw)
        expect(parsed.subject == subject, "subject did not survive a round trip")
        expect(parsed.to == message.to, "display names did not survive a round trip")
        from_name = name or SENDER.display_name  # an empty sender_display_name keeps the account's own
        expect(parsed.sender == EmailAddress("me@example.com", from_name), "From display name did not survive")
        expect(max(len(line) for line in header_block(raw).split(b"\r\n")) <= 78, "header line over 78")


# --- build_message validation ----------------------------------------------------------------------------------------


def violations(message: OutgoingMessage, sender: EmailAddress = SENDER) -> tuple[str, list[tuple[str, str]]]:
    with pytest.raises(InvalidArgument) as caught:
        build(message, sender)
    error = caught.value
    assert error.code == "INVALID_ARGUMENT"
    return error.reason, [(v.field, error.reason) for v in error.field_violations]


def fields(message: OutgoingMessage) -> list[str]:
    with pytest.raises(InvalidArgument) as caught:
        build(message)
    return [v.field for v in caught.value.field_violations]


TO = recipients("a@example.org")
ATTACHMENT = OutgoingAttachment("a.pdf", b"x")
INJECTIONS = ["a\r\nBcc: victim@example.org", "a\nX: y", "a\rX: y", "a\x00b", "a\u2028b", "a\x85b", "a\x0bb", "a\x1fb"]

INJECTABLE_FIELDS: dict[str, Callable[[str], OutgoingMessage]] = {
    "message.subject": lambda bad: OutgoingMessage(to=TO, subject=bad),
    "message.to_recipients[0].display_name": lambda bad: OutgoingMessage(to=(EmailAddress("a@example.org", bad),)),
    "message.to_recipients[0].address": lambda bad: OutgoingMessage(to=(EmailAddress(bad + "@example.org"),)),
    "message.cc_recipients[1].display_name": lambda bad: OutgoingMessage(
        to=TO, cc=(EmailAddress("c@example.org"), EmailAddress("d@example.org", bad))
    ),
    "message.bcc_recipients[0].address": lambda bad: OutgoingMessage(to=TO, bcc=(EmailAddress("b@example.org" + bad),)),
    "message.reply_to[0].display_name": lambda bad: OutgoingMessage(to=TO, reply_to=(EmailAddress("r@x.org", bad),)),
    "message.attachments[0].filename": lambda bad: OutgoingMessage(to=TO, attachments=(OutgoingAttachment(bad, b"x"),)),
    "message.attachments[0].content_type": lambda bad: OutgoingMessage(
        to=TO, attachments=(OutgoingAttachment("a.pdf", b"x", content_type="application/pdf" + bad),)
    ),
    "message.attachments[0].content_id": lambda bad: OutgoingMessage(
        to=TO, attachments=(OutgoingAttachment("a.png", b"x", inline=True, content_id="c" + bad),)
    ),
    "message.in_reply_to": lambda bad: OutgoingMessage(to=TO, in_reply_to="<p@x>" + bad),
    "message.references[1]": lambda bad: OutgoingMessage(to=TO, references=("<r@x>", "<q@x>" + bad)),
    "message.sender_display_name": lambda bad: OutgoingMessage(to=TO, sender_display_name=bad),
}


@pytest.mark.parametrize("field_path", list(INJECTABLE_FIELDS))
@pytest.mark.parametrize("bad", INJECTIONS, ids=lambda b: repr(b)[1:-1][:12])
def test_header_injection_is_refused(field_path: str, bad: str) -> None:
    reason, found = violations(INJECTABLE_FIELDS[field_path](bad))
    assert reason == "HEADER_INJECTION"
    assert found == [(field_path, "HEADER_INJECTION")]


def test_sender_display_name_from_the_account_is_checked_too() -> None:
    reason, found = violations(OutgoingMessage(to=TO), EmailAddress("me@example.com", "Me\r\nBcc: x@example.org"))
    assert (reason, found) == ("HEADER_INJECTION", [("message.sender_display_name", "HEADER_INJECTION")])


@pytest.mark.parametrize(
    "address",
    [
        "a@b",
        "first.last@example.com",
        '"a b"@x.y',
        "user+tag@example.co.uk",
        "a@[192.0.2.1]",
        "x@sub.example-domain.org",
    ],
)
def test_valid_addresses(address: str) -> None:
    built = build(OutgoingMessage(to=(EmailAddress(address),)))
    assert len(built.envelope_recipients) == 1


@pytest.mark.parametrize(
    "address",
    [
        "",
        "a@@b",
        "@b",
        "a@",
        "a",
        "a b@example.org",
        "<>",
        "<a@example.org>",
        "a@example.org,b@example.org",
        "a,b@example.org",
        "a@b..c",
        "a.@b",
        "(comment)a@b",
        "a@b (comment)",
        " a@b",
        "ü@example.org",
        "a@exämple.org",
        "x" * 250 + "@example.org",
    ],
)
def test_invalid_addresses(address: str) -> None:
    reason, found = violations(OutgoingMessage(to=(EmailAddress(address),)))
    assert (reason, found) == ("INVALID_ADDRESS", [("message.to_recipients[0].address", "INVALID_ADDRESS")])


@pytest.mark.parametrize(
    ("message", "reason", "field_path"),
    [
        (OutgoingMessage(subject="no one"), "NO_RECIPIENTS", "message.to_recipients"),
        (
            OutgoingMessage(
                to=recipients(*(f"u{i}@example.org" for i in range(60))),
                bcc=recipients(*(f"b{i}@x.org" for i in range(41))),
            ),
            "TOO_MANY_RECIPIENTS",
            "message.to_recipients",
        ),
        (
            OutgoingMessage(to=TO, reply_to=recipients(*(f"r{i}@x.org" for i in range(101)))),
            "TOO_MANY_RECIPIENTS",
            "message.reply_to",
        ),
        (OutgoingMessage(to=TO, subject="s" * 999), "SUBJECT_TOO_LONG", "message.subject"),
        (
            OutgoingMessage(to=(EmailAddress("a@x.org", "n" * 257),)),
            "DISPLAY_NAME_TOO_LONG",
            "message.to_recipients[0].display_name",
        ),
        (OutgoingMessage(to=TO, sender_display_name="n" * 257), "DISPLAY_NAME_TOO_LONG", "message.sender_display_name"),
        (
            OutgoingMessage(
                to=TO, attachments=(OutgoingAttachment("big.bin", b"x" * (mime.MAX_ATTACHMENT_BYTES + 1)),)
            ),
            "ATTACHMENTS_TOO_LARGE",
            "message.attachments",
        ),
        (OutgoingMessage(to=TO, attachments=(ATTACHMENT,) * 101), "TOO_MANY_ATTACHMENTS", "message.attachments"),
        (
            OutgoingMessage(to=TO, attachments=(OutgoingAttachment("", b"x"),)),
            "INVALID_ATTACHMENT",
            "message.attachments[0].filename",
        ),
        (
            OutgoingMessage(to=TO, attachments=(OutgoingAttachment("  ", b"x"),)),
            "INVALID_ATTACHMENT",
            "message.attachments[0].filename",
        ),
        (
            OutgoingMessage(to=TO, attachments=(OutgoingAttachment("f" * 256, b"x"),)),
            "INVALID_ATTACHMENT",
            "message.attachments[0].filename",
        ),
        *(
            (
                OutgoingMessage(to=TO, attachments=(OutgoingAttachment("a", b"x", content_type=ct),)),
                "INVALID_CONTENT_TYPE",
                "message.attachments[0].content_type",
            )
            for ct in (
                "pdf",
                "application/",
                "/pdf",
                "application/pdf; name=x",
                "a/b/c",
                "text /plain",
                "multipart/mixed",
            )
        ),
        (
            OutgoingMessage(to=TO, attachments=(OutgoingAttachment("a", b"x", inline=True, content_id="has space"),)),
            "INVALID_CONTENT_ID",
            "message.attachments[0].content_id",
        ),
        (OutgoingMessage(to=TO, in_reply_to="<a b@x>"), "INVALID_MESSAGE_ID", "message.in_reply_to"),
        (OutgoingMessage(to=TO, references=("<ok@x>", "<>")), "INVALID_MESSAGE_ID", "message.references[1]"),
        (OutgoingMessage(to=TO, references=("<r@x>",) * 101), "TOO_MANY_REFERENCES", "message.references"),
        (OutgoingMessage(to=TO, text_body="bad \ud800 surrogate"), "INVALID_TEXT", "message.text_body"),
    ],
)
def test_limits_and_syntax(message: OutgoingMessage, reason: str, field_path: str) -> None:
    found_reason, found = violations(message)
    assert found_reason == reason
    assert found == [(field_path, reason)]


def test_limits_are_inclusive() -> None:
    message = OutgoingMessage(
        to=recipients(*(f"u{i}@example.org" for i in range(mime.MAX_RECIPIENTS))),
        subject="s" * mime.MAX_SUBJECT_CHARS,
        sender_display_name="n" * mime.MAX_DISPLAY_NAME_CHARS,
        attachments=(OutgoingAttachment("f" * mime.MAX_FILENAME_CHARS, b""),) * (mime.MAX_ATTACHMENTS - 1)
        + (OutgoingAttachment("big", b"x" * mime.MAX_ATTACHMENT_BYTES),),
        references=("<r@x>",) * mime.MAX_REFERENCES,
    )
    built = build(message)
    assert len(built.envelope_recipients) == mime.MAX_RECIPIENTS


def test_all_violations_are_reported_reason_of_the_first() -> None:
    message = OutgoingMessage(
        to=(EmailAddress("ok@example.org"), EmailAddress("not an address"), EmailAddress("x@y.z", "a\r\nb")),
        bcc=(EmailAddress("a@@b"),),
        subject="s\nX: y",
        attachments=(OutgoingAttachment("", b"x"), OutgoingAttachment("a.pdf", b"x", content_type="nope")),
        in_reply_to="bad id",
    )
    with pytest.raises(InvalidArgument) as caught:
        build(message)
    error = caught.value
    assert error.reason == "INVALID_ADDRESS"
    assert [v.field for v in error.field_violations] == [
        "message.to_recipients[1].address",
        "message.to_recipients[2].display_name",
        "message.bcc_recipients[0].address",
        "message.subject",
        "message.attachments[0].filename",
        "message.attachments[1].content_type",
        "message.in_reply_to",
    ]
    # Descriptions are for the caller and never echo what was sent.
    for violation in error.field_violations:
        for secret in ("not an address", "a@@b", "X: y", "nope", "bad id"):
            expect(secret not in violation.description, "a violation description echoes the request")
    expect("not an address" not in error.message, "the error message echoes the request")


def test_many_bad_recipients_are_reported_up_to_a_cap() -> None:
    many = tuple(EmailAddress(f"bad{i}") for i in range(500))
    found = fields(OutgoingMessage(to=many[:100], cc=many[100:200], bcc=many[200:]))
    assert found[0] == "message.to_recipients"  # TOO_MANY_RECIPIENTS first
    assert len(found) <= 100


def test_invalid_account_address_is_a_failed_precondition() -> None:
    for address in ("not-an-address", "me@example.com\r\nX: y", ""):
        with pytest.raises(FailedPrecondition) as caught:
            build(OutgoingMessage(to=TO), EmailAddress(address))
        assert caught.value.reason == "INVALID_SENDER_ADDRESS"


@pytest.mark.parametrize("domain", ["", "a b", "example.com\r\nX: y", "-example.com", "example..com", "exämple.com"])
def test_message_id_domain_must_be_a_domain(domain: str) -> None:
    with pytest.raises(ValueError, match="message_id_domain"):
        mime.build_message(OutgoingMessage(to=TO), SENDER, message_id_domain=domain)
