"""MIME for every driver: parse received messages, decode transfer encodings, build messages to send.

Provider-neutral, standard library only. IMAP uses it now; Gmail ``format=raw`` and Graph's MIME endpoints can use
the same functions.

Parsing is best effort and never raises on malformed input. Hostile input is bounded rather than trusted: header
blocks, header values, the number of parts and the nesting depth are capped (the ``MAX_*`` constants below), and
charset names that select non-text or pathological codecs are ignored. The MIME tree, header fields, parameters and
address lists are read here, in linear time, iteratively and without copying the message: the ``email`` package's
parser recurses once per nested multipart (RecursionError at about a thousand) with work quadratic in the depth,
and its address parser takes seconds on a 16 KiB field of quote characters. Building uses ``email.message`` with an
``email.policy.SMTP`` clone, except for Subject and the address fields, which are encoded here (see
:func:`_subject_field`: the standard library's folding loses white space).

Sections follow IMAP (RFC 3501 §6.4.5): the parts of a multipart are numbered 1, 2, ...; the parts of a nested
multipart 1.1, 1.2, ...; a message that is not multipart has one part, "1"; the parts of an encapsulated
message/rfc822 at section 3 are 3.1, 3.2, ... (or 3.1 alone when it is not multipart).

Which parts are bodies and which are attachments (:func:`classify_part`), shared with the IMAP BODYSTRUCTURE reader
so that both paths agree:

- text/plain or text/html without a filename and not ``Content-Disposition: attachment`` is a body candidate; the
  first of each type, in document order, is the body;
- every other leaf is an attachment (message/rfc822 included: encapsulated messages are not walked into);
  it is inline when its disposition says so, or when it has none and sits inside multipart/related.

Building (:func:`build_message`) validates the whole request first and reports every bad field in one
``InvalidArgument``; nothing is built from bad input.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import dataclasses
import email.policy
import email.utils
import functools
import mimetypes
import re
import secrets
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage, MIMEPart

from server.domain.mail import EmailAddress, OutgoingAttachment, OutgoingMessage
from server.errors import FailedPrecondition, FieldViolation, InvalidArgument

__all__ = [
    "MAX_ADDRESS_CHARS",
    "MAX_ATTACHMENTS",
    "MAX_ATTACHMENT_BYTES",
    "MAX_CONTENT_ID_CHARS",
    "MAX_DISPLAY_NAME_CHARS",
    "MAX_FILENAME_CHARS",
    "MAX_HEADERS",
    "MAX_HEADER_BLOCK_BYTES",
    "MAX_HEADER_LINES",
    "MAX_HEADER_VALUE_BYTES",
    "MAX_MESSAGE_ID_CHARS",
    "MAX_MULTIPART_DEPTH",
    "MAX_PARTS",
    "MAX_PART_HEADER_LINES",
    "MAX_RECIPIENTS",
    "MAX_REFERENCES",
    "MAX_SUBJECT_CHARS",
    "BuiltMessage",
    "IncrementalDecoder",
    "ParsedHeaders",
    "ParsedMessage",
    "PartInfo",
    "build_message",
    "classify_part",
    "clean_text",
    "decode_header_text",
    "decode_parameters",
    "decode_text",
    "decoded_size_estimate",
    "make_decoder",
    "parse_headers",
    "parse_message",
    "part_bytes",
]

# --- Parsing limits. Beyond them input is dropped, never an error. ---

#: Header fields kept per header block (message or part); later fields are ignored.
MAX_HEADERS = 500
#: Octets kept of one header field's value (after unfolding); the rest is cut off.
MAX_HEADER_VALUE_BYTES = 16 * 1024
#: Lines of a header block examined; the rest of an oversized block is skipped up to the blank line.
MAX_HEADER_LINES = 10_000
#: The same for the header block of a MIME part (a handful of Content-* fields in practice).
MAX_PART_HEADER_LINES = 256
#: Octets of a header block examined; the rest of an oversized block is skipped up to the blank line.
MAX_HEADER_BLOCK_BYTES = 1024 * 1024
#: Multiparts nested deeper than this are not walked into (their parts are not listed).
MAX_MULTIPART_DEPTH = 16
#: MIME parts (leaves and multiparts) examined per message; later ones are not listed.
MAX_PARTS = 1000
_MAX_PARAMETERS = 64
_MAX_CONTINUATIONS = 64
_MAX_PARSED_ADDRESSES = 1000
_MAX_PARSED_REFERENCES = 1000
_MAX_BOUNDARY_CHARS = 200

# --- Building limits (SendMessage). Beyond them the request is INVALID_ARGUMENT. ---

#: To, Cc and Bcc together (and, separately, Reply-To).
MAX_RECIPIENTS = 100
#: RFC 5322's line limit; longer subjects are refused rather than cut.
MAX_SUBJECT_CHARS = 998
MAX_DISPLAY_NAME_CHARS = 256
#: RFC 5321 limits a path to 256 octets including the angle brackets.
MAX_ADDRESS_CHARS = 254
MAX_ATTACHMENTS = 100
#: Total decoded size of all attachments; about what the large providers accept once base64 is added.
MAX_ATTACHMENT_BYTES = 25 * 1024 * 1024
MAX_FILENAME_CHARS = 255
MAX_CONTENT_ID_CHARS = 250
#: For In-Reply-To and each References entry, angle brackets included.
MAX_MESSAGE_ID_CHARS = 250
MAX_REFERENCES = 100
_MAX_VIOLATIONS = 100

_DECODE_CHUNK = 64 * 1024


# ---------------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedHeaders:
    """The header fields a driver needs, decoded. Addresses that do not parse are left out."""

    subject: str = ""
    sender: EmailAddress | None = None
    to: tuple[EmailAddress, ...] = ()
    cc: tuple[EmailAddress, ...] = ()
    bcc: tuple[EmailAddress, ...] = ()
    reply_to: tuple[EmailAddress, ...] = ()
    send_time: datetime | None = None
    internet_message_id: str = ""
    in_reply_to: str = ""
    references: tuple[str, ...] = ()
    #: Every field (up to MAX_HEADERS) as (name as written, value unfolded and RFC 2047-decoded).
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PartInfo:
    """One attachment or inline part of a parsed message."""

    section: str
    filename: str
    content_type: str
    size_bytes: int  # decoded
    inline: bool
    content_id: str  # without angle brackets
    encoding: str  # Content-Transfer-Encoding, lower case


@dataclass(frozen=True)
class ParsedMessage(ParsedHeaders):
    """A whole message: its headers (the fields of :class:`ParsedHeaders`), bodies and attachments."""

    text_body: str = ""
    html_body: str = ""
    attachments: tuple[PartInfo, ...] = field(default=())


@dataclass(frozen=True)
class BuiltMessage:
    """A message ready to submit. ``envelope_recipients`` includes Bcc; the headers do not."""

    raw: bytes
    internet_message_id: str
    envelope_recipients: tuple[str, ...]
    #: The Bcc header field (CRLF-terminated, empty without Bcc) for providers that take the recipients from the
    #: message itself and strip Bcc on delivery (the Gmail API): ``bcc_field + raw``. SMTP never sends it.
    bcc_field: bytes = b""


# ---------------------------------------------------------------------------------------------------------------------
# Transfer decoding
# ---------------------------------------------------------------------------------------------------------------------


class IncrementalDecoder:
    """Decodes a Content-Transfer-Encoding chunk by chunk; ``feed`` pieces then ``finish`` once.

    The concatenated output does not depend on where the input was cut. This base class is the identity
    (7bit, 8bit, binary and anything unknown).
    """

    def feed(self, chunk: bytes) -> bytes:
        return bytes(chunk)

    def finish(self) -> bytes:
        return b""


_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_B64_JUNK = bytes(c for c in range(256) if c not in _B64_ALPHABET)


class _Base64Decoder(IncrementalDecoder):
    """Lenient base64: characters outside the alphabet are skipped, complete 4-character groups are decoded.

    The first ``=`` marks the end of the data (RFC 2045 §6.8); everything after it is ignored. A final group of
    2 or 3 characters without padding is decoded as if padded; a single leftover character is dropped.
    """

    def __init__(self) -> None:
        self._carry = b""
        self._done = False

    def feed(self, chunk: bytes) -> bytes:
        if self._done:
            return b""
        data = self._carry + bytes(chunk).translate(None, _B64_JUNK)
        pad = data.find(b"=")
        if pad >= 0:
            self._done = True
            self._carry = b""
            return _b64_tail(data[:pad])
        whole = len(data) - len(data) % 4
        self._carry = data[whole:]
        return binascii.a2b_base64(data[:whole]) if whole else b""

    def finish(self) -> bytes:
        tail, self._carry, self._done = self._carry, b"", True
        return _b64_tail(tail)


def _b64_tail(data: bytes) -> bytes:
    """Decode alphabet-only data whose length need not be a multiple of 4."""
    whole = len(data) - len(data) % 4
    out = binascii.a2b_base64(data[:whole]) if whole else b""
    rest = data[whole:]
    if len(rest) >= 2:
        out += binascii.a2b_base64(rest + b"=" * (4 - len(rest)))
    return out


_HEX = frozenset(b"0123456789ABCDEFabcdef")


class _QuotedPrintableDecoder(IncrementalDecoder):
    """Quoted-printable with exactly :func:`binascii.a2b_qp`'s semantics, however the input is cut.

    Input is handed to ``a2b_qp`` only up to a point where its parser starts a fresh token: just after a line feed,
    or inside the last line at the start of a token that is complete. An ``=`` or ``=X`` at the end of a chunk waits
    for the next one; ``=`` + CR makes ``a2b_qp`` skip to the next line feed, which is done here as a state so that
    nothing unbounded is held back.
    """

    def __init__(self) -> None:
        self._carry = b""
        self._skip_line = False

    def feed(self, chunk: bytes) -> bytes:
        data = bytes(chunk)
        if self._skip_line:
            newline = data.find(b"\n")
            if newline < 0:
                return b""
            self._skip_line = False
            data = data[newline + 1 :]
        data = self._carry + data
        self._carry = b""
        newline = data.rfind(b"\n")
        head, tail = data[: newline + 1], data[newline + 1 :]
        cut, skip = _qp_cut(tail)
        out = binascii.a2b_qp(head + tail[:cut])
        if skip:
            self._skip_line = True
        else:
            self._carry = tail[cut:]
        return out

    def finish(self) -> bytes:
        tail, self._carry = self._carry, b""
        if self._skip_line:
            self._skip_line = False
            return b""
        return binascii.a2b_qp(tail)


def _qp_cut(line: bytes) -> tuple[int, bool]:
    """Where ``line`` (no line feed, starting at a token) can be cut; True when a2b_qp would skip from there."""
    n = len(line)
    i = 0
    while True:
        j = line.find(b"=", i)
        if j < 0:
            return n, False
        if j + 1 >= n:
            return j, False  # "=" at the end: a soft break or the start of an escape
        nxt = line[j + 1]
        if nxt == 0x0D:
            return j, True  # "=\r": a2b_qp skips to the next line feed, which is not in this line
        if nxt == 0x3D:
            i = j + 2  # "==" decodes to "="
        elif nxt in _HEX:
            if j + 2 >= n:
                return j, False  # "=X" at the end: maybe an escape
            i = j + 3 if line[j + 2] in _HEX else j + 1
        else:
            i = j + 1  # a literal "="


def make_decoder(encoding: str) -> IncrementalDecoder:
    """A fresh decoder for a Content-Transfer-Encoding (case-insensitive; unknown ones are passed through)."""
    name = (encoding or "").strip().lower()
    if name == "base64":
        return _Base64Decoder()
    if name == "quoted-printable":
        return _QuotedPrintableDecoder()
    return IncrementalDecoder()


def decoded_size_estimate(size: int, encoding: str) -> int:
    """The decoded size of a part from its encoded size (exact for identity encodings, close for base64).

    Base64 is assumed to be in lines of 76 characters plus CRLF; quoted-printable is given as its encoded size,
    an upper bound.
    """
    size = max(0, size)
    if (encoding or "").strip().lower() == "base64":
        return (size - 2 * (size // 78)) * 3 // 4
    return size


def _decode_transfer(data: bytes, encoding: str) -> bytes:
    decoder = make_decoder(encoding)
    return decoder.feed(data) + decoder.finish()


# ---------------------------------------------------------------------------------------------------------------------
# Charsets and header text
# ---------------------------------------------------------------------------------------------------------------------

# Codecs a message must not be able to select: not charsets, or slow on hostile input.
_BLOCKED_CODECS = frozenset({"idna", "punycode", "unicode-escape", "raw-unicode-escape", "undefined", "mbcs", "oem"})
# Labels mail uses that Python spells differently or that are routinely used for a superset.
_CHARSET_ALIASES = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949",
    "iso-8859-8-i": "iso-8859-8",
    "windows-874": "cp874",
    "x-sjis": "shift_jis",
    "unicode-1-1-utf-7": "utf-7",
    "x-unknown": "",
    "unknown-8bit": "",
}


@functools.lru_cache(maxsize=256)
def _codec(charset: str) -> str | None:
    """The Python codec for a charset label, or None when unknown, blocked or not a text encoding."""
    label = charset.strip().strip('"').strip().lower()
    label = _CHARSET_ALIASES.get(label, label)
    if not label or len(label) > 64:
        return None
    try:
        name = codecs.lookup(label).name
        b"".decode(name)  # bytes-to-bytes codecs (base64, zlib, ...) raise LookupError here
    except Exception:  # LookupError, or ValueError/TypeError on odd labels
        return None
    return None if name in _BLOCKED_CODECS else name


def decode_text(data: bytes, charset: str | None) -> str:
    """Decode a text body: the declared charset (bad bytes become U+FFFD), else UTF-8, else Latin-1.

    A missing or unknown charset, or a us-ascii label on non-ASCII bytes (a frequent mislabel), falls back to
    UTF-8 and then Latin-1.
    """
    codec = _codec(charset) if charset else None
    if codec is not None:
        try:
            return data.decode(codec)
        except Exception:  # UnicodeDecodeError, or a codec's own ValueError
            if codec != "ascii":
                return _decode_replacing(data, codec)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _decode_replacing(data: bytes, codec: str) -> str:
    try:
        return data.decode(codec, "replace")
    except Exception:  # a codec that rejects the "replace" handler
        return data.decode("utf-8", "replace")


def _decode_header_bytes(data: bytes, charset: str) -> str:
    """Header text in a declared charset; an unknown one is read as UTF-8. Bad bytes become U+FFFD."""
    codec = _codec(charset) or "utf-8"
    try:
        return data.decode(codec)
    except Exception:  # bad bytes: replace them
        return _decode_replacing(data, codec)


def _raw_header_text(data: bytes) -> str:
    """Raw (unencoded) header bytes: UTF-8 (RFC 6532) when they are, else Latin-1."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason == "unexpected end of data" and exc.end == len(data):  # cut in the middle of a character
            try:
                return data[: exc.start].decode("utf-8") + "\ufffd"
            except UnicodeDecodeError:
                return data.decode("latin-1")
        return data.decode("latin-1")


# charset, optional RFC 2231 language, encoding, text; the text holds neither "?" nor white space (RFC 2047 §2).
_ENCODED_WORD = re.compile(r"=\?([^?*\s]{1,64})(?:\*[^?\s]{0,32})?\?([bBqQ])\?([^?\s]*)\?=")

# Line breaks become spaces; other control characters (tab excepted) become U+FFFD.
_CLEAN = {c: "\ufffd" for c in (*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F)} | {0x0A: " ", 0x0D: " "}


_HAS_CONTROL = re.compile("[" + "".join(re.escape(chr(c)) for c in _CLEAN) + "]")


def clean_text(text: str) -> str:
    """Decoded header text made safe to hand on: CR and LF become spaces, other controls (tab excepted) U+FFFD."""
    # Most text holds no control character: one scan in C, where translate() looks up every character.
    return text.translate(_CLEAN) if _HAS_CONTROL.search(text) else text


def decode_header_text(value: str) -> str:
    """Decode RFC 2047 encoded words in a header value (unstructured text, filenames, parameters).

    White space between adjacent encoded words is dropped, and adjacent words in the same charset are decoded
    together so that a character split across them survives.
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    pending = bytearray()
    pending_charset = ""
    pos = 0
    after_word = False  # whether ``pos`` is just after an encoded word
    for match in _ENCODED_WORD.finditer(value):
        gap = value[pos : match.start()]
        adjacent = after_word and not gap.strip()
        charset, kind, text = match.group(1).lower(), match.group(2).lower(), match.group(3)
        if (not adjacent or charset != pending_charset) and pending:
            out.append(_decode_header_bytes(bytes(pending), pending_charset))
            pending.clear()
        if not adjacent:
            out.append(gap)
        pending_charset = charset
        if kind == "b":
            pending += _decode_transfer(text.encode("ascii", "ignore"), "base64")
        else:
            pending += binascii.a2b_qp(text.encode("utf-8"), header=True)
        pos = match.end()
        after_word = True
    if pending:
        out.append(_decode_header_bytes(bytes(pending), pending_charset))
    out.append(value[pos:])
    return "".join(out)


_RFC2231_NAME = re.compile(r"([^*]+)\*(?:([0-9]{1,3})(\*)?)?")


def decode_parameters(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """MIME parameters (name, unquoted value) as a dict keyed by lower-case name, RFC 2231 decoded.

    ``name*=charset'lang'%XX``, ``name*0*=`` / ``name*1=`` continuations are joined and decoded (unknown charset:
    UTF-8); an RFC 2231 value wins over a plain one of the same name. RFC 2047 words in values are not decoded
    here. The first occurrence of a plain name wins.
    """
    plain: dict[str, str] = {}
    extended: dict[str, list[tuple[int, bool, str]]] = {}
    for raw_name, value in pairs:
        name = raw_name.strip().lower()
        if not name:
            continue
        match = _RFC2231_NAME.fullmatch(name)
        if match is None:
            plain.setdefault(name, value)
            continue
        base, number, star = match.groups()
        segments = extended.setdefault(base, [])
        if len(segments) < _MAX_CONTINUATIONS:
            segments.append((0, True, value) if number is None else (int(number), star is not None, value))
    result = dict(plain)
    for base, segments in extended.items():
        segments.sort(key=lambda segment: segment[0])
        charset = ""
        data = bytearray()
        for index, (_, encoded, text) in enumerate(segments):
            if index == 0 and encoded and text.count("'") >= 2:
                charset, _language, text = text.split("'", 2)
            data += urllib.parse.unquote_to_bytes(text) if encoded else text.encode("utf-8")
        result[base] = _decode_header_bytes(bytes(data), charset)
    return result


def _split_parameters(value: str) -> tuple[str, list[tuple[str, str]]]:
    """``type/subtype; a=b; c="d"`` → ("type/subtype", [(a, b), (c, d)]); quoted strings are unquoted."""
    semicolon = value.find(";")
    if semicolon < 0:
        return value.strip(), []
    main = value[:semicolon].strip()
    pairs: list[tuple[str, str]] = []
    n = len(value)
    pos = semicolon + 1
    for _ in range(_MAX_PARAMETERS):  # bare attributes count too: each round searches the rest of the value
        while pos < n and value[pos] in " \t;":
            pos += 1
        if pos >= n:
            break
        equals = value.find("=", pos)
        semicolon = value.find(";", pos)
        if equals < 0 or 0 <= semicolon < equals:  # a bare attribute: skip it
            pos = n if semicolon < 0 else semicolon + 1
            continue
        name = value[pos:equals].strip()
        pos = equals + 1
        while pos < n and value[pos] in " \t":
            pos += 1
        if pos < n and value[pos] == '"':
            pieces: list[str] = []
            pos += 1
            quote = value.find('"', pos)
            while pos < n:
                if 0 <= quote < pos:
                    quote = value.find('"', pos)
                backslash = value.find("\\", pos, quote if quote >= 0 else n)
                if backslash >= 0:
                    pieces.append(value[pos:backslash])
                    pieces.append(value[backslash + 1 : backslash + 2])
                    pos = backslash + 2
                    continue
                if quote < 0:  # unterminated: take the rest
                    pieces.append(value[pos:])
                    pos = n
                    break
                pieces.append(value[pos:quote])
                pos = quote + 1
                break
            text = "".join(pieces)
            semicolon = value.find(";", pos)
            pos = n if semicolon < 0 else semicolon + 1
        else:
            semicolon = value.find(";", pos)
            end = n if semicolon < 0 else semicolon
            text = value[pos:end].strip()
            pos = end + 1
        if name:
            pairs.append((name, text))
    return main, pairs


def split_header_parameters(value: str) -> tuple[str, dict[str, str]]:
    """A structured header's value and its parameters, RFC 2231-decoded (``Content-Type``, ``Content-Disposition``)."""
    head, pairs = _split_parameters(value)
    return head, decode_parameters(pairs)


def classify_part(content_type: str, disposition: str, filename: str, in_related: bool) -> tuple[bool, bool]:
    """(is_attachment, inline) for a leaf part; see the module docstring for the rule."""
    if content_type in ("text/plain", "text/html") and disposition != "attachment" and not filename:
        return False, False
    if disposition == "inline":
        return True, True
    if disposition == "attachment":
        return True, False
    return True, in_related


def _strip_angle_brackets(value: str) -> str:
    value = value.strip()
    if value.startswith("<"):
        value = value[1:]
    if value.endswith(">"):
        value = value[:-1]
    return value.strip()


# ---------------------------------------------------------------------------------------------------------------------
# Header blocks
# ---------------------------------------------------------------------------------------------------------------------

_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")


def _read_fields(
    buf: bytes, start: int, end: int, max_lines: int = MAX_HEADER_LINES
) -> tuple[list[tuple[str, str]], int]:
    """The header fields of the entity at ``buf[start:end]`` (name, unfolded raw value) and where its body starts.

    Ends at the first empty line, or at the first line that is neither a field nor a continuation (that line
    then belongs to the body, as in the standard library). A leading mbox ``From `` line is skipped.
    """
    fields: list[tuple[bytes, bytearray]] = []
    current: bytearray | None = None
    block_limit = min(end, start + MAX_HEADER_BLOCK_BYTES)
    line_cap = MAX_HEADER_VALUE_BYTES + 1024
    pos = start
    lines = 0
    while pos < end:
        if pos >= block_limit or lines >= max_lines:
            return _finish_fields(fields), _skip_to_blank_line(buf, pos, end)
        lines += 1
        newline = buf.find(b"\n", pos, end)
        line_end = end if newline < 0 else newline + 1
        line = buf[pos : min(line_end, pos + line_cap)].rstrip(b"\r\n")
        if not line:
            return _finish_fields(fields), line_end
        if line[0] in (0x20, 0x09):
            if current is not None and len(current) < MAX_HEADER_VALUE_BYTES:
                current += line  # unfolding removes the line break only (RFC 5322 §2.2.3)
        else:
            colon = line.find(b":")
            name = line[:colon].rstrip(b" \t") if colon > 0 else b""
            if name and _FIELD_NAME.fullmatch(name):
                current = None
                if len(fields) < MAX_HEADERS:
                    current = bytearray(line[colon + 1 :])
                    fields.append((name, current))
            elif not (pos == start and line.startswith(b"From ")):
                return _finish_fields(fields), pos
        pos = line_end
    return _finish_fields(fields), end


def _finish_fields(fields: list[tuple[bytes, bytearray]]) -> list[tuple[str, str]]:
    return [
        (name.decode("ascii"), _raw_header_text(bytes(value[:MAX_HEADER_VALUE_BYTES])).strip())
        for name, value in fields
    ]


def _skip_to_blank_line(buf: bytes, pos: int, end: int) -> int:
    """Where the body starts after the blank line at or after ``pos`` (``end`` when there is none)."""
    search_from = max(0, pos - 1)
    found = [
        (index + len(marker)) for marker in (b"\n\r\n", b"\n\n") if (index := buf.find(marker, search_from, end)) >= 0
    ]
    return min(found) if found else end


def _first(fields: Sequence[tuple[str, str]], name: str) -> str | None:
    for key, value in fields:
        if key.lower() == name:
            return value
    return None


# Address lists are read by a tokenizer of our own: one regular expression pass, linear in the input. (The standard
# library's parser takes seconds on a 16 KiB field of quote characters, and keeps a space between adjacent encoded
# words of a display name, which RFC 2047 §6.2 drops.) None of the alternatives can fail part-way, so no position
# is scanned twice: an unterminated quoted string or comment runs to the end of the field.
_ADDRESS_TOKEN = re.compile(
    r"""
     (?P<ws>[ \t\r\n]+)
    |(?P<quoted>"(?:[^"\\]|\\.)*(?:"|\\?\Z))
    |(?P<comment>\((?:[^()\\]|\\.)*(?:\)|\\?\Z|(?=\()))
    |(?P<angle><[^<>]*>?)
    |(?P<literal>\[[^\[\]]*\]?)
    |(?P<special>[,:;@.])
    |(?P<atom>[^ \t\r\n"()<>\[\],:;@.\\]+)
    |(?P<stray>.)
    """,
    re.VERBOSE | re.DOTALL,
)
# local@domain: the local part a quoted string or dot-atom-like text (UTF-8 allowed, RFC 6532), the domain
# dot-atom-like text or a domain literal; no white space or comments.
_ADDR_SPEC = re.compile(
    r'(?:"(?:[^"\\\x00-\x1f]|\\[^\x00-\x1f])*"|[^\s\x00-\x1f"(),:;<>@\[\]\\]+)'
    r"@(?:[^\s\x00-\x1f\"(),:;<>@\[\]\\]+|\[[^\s\x00-\x1f\[\]\\]*\])"
)
_MAX_PARSED_ADDRESS_CHARS = 512
#: Characters of address fields (From, To, Cc, Bcc, Reply-To together) read per header block.
_ADDRESS_BUDGET = 256 * 1024


def _addresses(values: Sequence[str], budget: list[int]) -> tuple[EmailAddress, ...]:
    found: list[EmailAddress] = []
    for value in values:
        if budget[0] <= 0 or len(found) >= _MAX_PARSED_ADDRESSES:
            break
        value = value[: budget[0]]
        budget[0] -= len(value)
        found.extend(_address_list(value))
    return tuple(found[:_MAX_PARSED_ADDRESSES])


def _address_list(value: str) -> list[EmailAddress]:
    """The mailboxes of an address-list field: groups flattened, unparsable entries left out."""
    result: list[EmailAddress] = []
    mailbox: list[tuple[str, str]] = []
    for match in _ADDRESS_TOKEN.finditer(value):
        kind = match.lastgroup or "stray"
        text = match.group()
        if kind == "special" and text in ",;":
            _add_mailbox(result, mailbox)
            mailbox = []
        elif kind == "special" and text == ":":
            mailbox = []  # what came before was a group's name
        else:
            mailbox.append((kind, text))
    _add_mailbox(result, mailbox)
    return result


def _add_mailbox(result: list[EmailAddress], tokens: list[tuple[str, str]]) -> None:
    angle = next((i for i, (kind, _) in enumerate(tokens) if kind == "angle"), None)
    if angle is not None:
        address = tokens[angle][1][1:].removesuffix(">").strip()
        if address.startswith("@") and ":" in address:  # obsolete source route: <@relay:local@domain>
            address = address.split(":", 1)[1].strip()
        display_name = _phrase(tokens[:angle])
    else:
        address = "".join(text for kind, text in tokens if kind != "comment").strip()
        comments = [text for kind, text in tokens if kind == "comment"]
        display_name = _phrase([("atom", comments[0][1:].removesuffix(")"))]) if comments else ""  # a@b (Name)
    if len(address) <= _MAX_PARSED_ADDRESS_CHARS and _ADDR_SPEC.fullmatch(address):
        result.append(EmailAddress(address=address, display_name=display_name))


def _phrase(tokens: Sequence[tuple[str, str]]) -> str:
    """A display name: words joined by single spaces, quoted strings unquoted, encoded words decoded."""
    pieces: list[str] = []
    for kind, text in tokens:
        if kind == "ws":
            pieces.append(" ")
        elif kind == "quoted":
            inner = text[1:-1] if len(text) >= 2 and text.endswith('"') else text[1:]
            pieces.append(re.sub(r"\\(.)", r"\1", inner, flags=re.DOTALL))
        elif kind != "comment":
            pieces.append(text)
    return clean_text(decode_header_text("".join(pieces))).strip()


_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")


def _has_control(text: str) -> bool:
    return _CONTROL_CHARACTER.search(text) is not None


_MESSAGE_ID = re.compile(r"<([^<>\s]{1,998})>")


def _message_ids(value: str | None, limit: int) -> list[str]:
    if not value:
        return []
    ids = [f"<{m.group(1)}>" for m in _MESSAGE_ID.finditer(value) if not _has_control(m.group(1))]
    if not ids and value.strip() and not any(c.isspace() for c in value.strip()) and not _has_control(value):
        ids = [value.strip()]
    return ids[:limit]


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except Exception:  # unparsable dates are simply absent
        return None
    if parsed.tzinfo is None:  # "-0000": no zone information; treat as UTC
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        return None


def _parsed_headers(fields: Sequence[tuple[str, str]]) -> ParsedHeaders:
    # Every value by lowered name, in order, in one pass (not one pass over all fields per name looked up).
    named: dict[str, list[str]] = {}
    for key, value in fields:
        named.setdefault(key.lower(), []).append(value)

    def first(name: str) -> str | None:
        values = named.get(name)
        return values[0] if values else None

    budget = [_ADDRESS_BUDGET]
    senders = _addresses(named.get("from", ()), budget)
    references = _message_ids(" ".join(named.get("references", ())), _MAX_PARSED_REFERENCES)
    message_ids = _message_ids(first("message-id"), 1)
    in_reply_to = _message_ids(first("in-reply-to"), 1)
    return ParsedHeaders(
        subject=clean_text(decode_header_text(first("subject") or "")),
        sender=senders[0] if senders else None,
        to=_addresses(named.get("to", ()), budget),
        cc=_addresses(named.get("cc", ()), budget),
        bcc=_addresses(named.get("bcc", ()), budget),
        reply_to=_addresses(named.get("reply-to", ()), budget),
        send_time=_date(first("date")),
        internet_message_id=message_ids[0] if message_ids else "",
        in_reply_to=in_reply_to[0] if in_reply_to else "",
        references=tuple(references),
        headers=tuple((name, clean_text(decode_header_text(value))) for name, value in fields),
    )


def parse_headers(raw: bytes) -> ParsedHeaders:
    """Decode the header block of ``raw`` (a header block alone, or a whole message). Never raises."""
    buf = bytes(raw)
    fields, _ = _read_fields(buf, 0, len(buf))
    return _parsed_headers(fields)


# ---------------------------------------------------------------------------------------------------------------------
# The MIME tree
# ---------------------------------------------------------------------------------------------------------------------

_MEDIA_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")
_ENCAPSULATED = frozenset({"message/rfc822", "message/global"})


@dataclass(frozen=True, slots=True)
class _Entity:
    """One MIME entity: its parsed Content-* fields and where its body lies in ``buf`` (never copied)."""

    buf: bytes
    body_start: int
    end: int
    content_type: str
    params: dict[str, str]
    disposition: str
    filename: str
    content_id: str
    encoding: str

    @property
    def boundary(self) -> bytes | None:
        if not self.content_type.startswith("multipart/"):
            return None
        return self.params["boundary"].encode("utf-8", "replace")

    @property
    def is_multipart(self) -> bool:
        return self.boundary is not None

    def body(self) -> bytes:
        return _decode_transfer(self.buf[self.body_start : self.end], self.encoding)


def _read_entity(
    buf: bytes, start: int, end: int, default_type: str, max_lines: int = MAX_PART_HEADER_LINES
) -> _Entity:
    fields, body_start = _read_fields(buf, start, end, max_lines)
    return _entity(buf, fields, body_start, end, default_type)


def _entity(buf: bytes, fields: Sequence[tuple[str, str]], body_start: int, end: int, default_type: str) -> _Entity:
    content_type, params = default_type, {}
    raw_type = _first(fields, "content-type")
    if raw_type is not None:
        main, pairs = _split_parameters(raw_type)
        main = main.lower()
        params = decode_parameters(pairs)
        # RFC 2045 §5.2: an unusable Content-Type means the default, text/plain.
        content_type = main if _MEDIA_TYPE.fullmatch(main) else "text/plain"
    if content_type.startswith("multipart/") and not 0 < len(params.get("boundary", "")) <= _MAX_BOUNDARY_CHARS:
        content_type = "text/plain"  # no usable boundary: the body is all there is to show, as in the standard library
    disposition, disposition_params = "", {}
    raw_disposition = _first(fields, "content-disposition")
    if raw_disposition is not None:
        main, pairs = _split_parameters(raw_disposition)
        disposition = main.lower()
        disposition_params = decode_parameters(pairs)
    filename = disposition_params.get("filename") or params.get("name") or ""
    return _Entity(
        buf=buf,
        body_start=body_start,
        end=end,
        content_type=content_type,
        params=params,
        disposition=disposition,
        filename=clean_text(decode_header_text(filename)).strip(),
        content_id=clean_text(_strip_angle_brackets(_first(fields, "content-id") or "")),
        encoding=(_first(fields, "content-transfer-encoding") or "7bit").strip().lower() or "7bit",
    )


def _split_multipart(buf: bytes, start: int, end: int, boundary: bytes, limit: int) -> list[tuple[int, int]]:
    """The (start, end) of each part of a multipart body, at most ``limit``; a missing close delimiter is tolerated.

    A delimiter is ``--boundary`` at the start of a line, then optionally ``--``, then only white space; the line
    break before it belongs to it (RFC 2046 §5.1.1). The preamble and epilogue are dropped.
    """
    delimiter = b"--" + boundary
    parts: list[tuple[int, int]] = []
    part_start: int | None = None
    pos = start
    while len(parts) < limit:
        found = buf.find(delimiter, pos, end)
        if found < 0:
            break
        pos = found + 1
        if found > start and buf[found - 1] != 0x0A:
            continue
        after = found + len(delimiter)
        closing = buf.startswith(b"--", after, end)
        newline = buf.find(b"\n", after, end)
        line_end = end if newline < 0 else newline + 1
        if buf[after + 2 if closing else after : line_end].strip(b" \t\r\n"):
            continue  # a longer boundary that starts with this one, or text
        if part_start is not None:
            part_end = found
            if part_end > part_start and buf[part_end - 1] == 0x0A:
                part_end -= 1
                if part_end > part_start and buf[part_end - 1] == 0x0D:
                    part_end -= 1
            parts.append((part_start, part_end))
        if closing:
            return parts
        part_start = pos = line_end
    if part_start is not None and len(parts) < limit:
        parts.append((part_start, end))  # truncated: no close delimiter
    return parts


def _children(entity: _Entity, limit: int) -> list[_Entity]:
    boundary = entity.boundary
    if boundary is None or limit <= 0:
        return []
    default_type = "message/rfc822" if entity.content_type == "multipart/digest" else "text/plain"
    return [
        _read_entity(entity.buf, start, end, default_type)
        for start, end in _split_multipart(entity.buf, entity.body_start, entity.end, boundary, limit)
    ]


def _leaves(top: _Entity) -> list[tuple[str, _Entity, bool]]:
    """(section, entity, inside multipart/related) for each leaf, in document order, within the limits."""
    leaves: list[tuple[str, _Entity, bool]] = []
    if not top.is_multipart:
        return [("1", top, False)]
    budget = MAX_PARTS
    stack: list[tuple[str, _Entity, int, bool]] = [("", top, 0, False)]
    while stack:
        section, entity, depth, in_related = stack.pop()
        if not entity.is_multipart:
            leaves.append((section, entity, in_related))
            continue
        if depth >= MAX_MULTIPART_DEPTH or budget <= 0:
            continue
        children = _children(entity, budget)
        budget -= len(children)
        related = in_related or entity.content_type == "multipart/related"
        for number in range(len(children), 0, -1):
            child_section = f"{section}.{number}" if section else str(number)
            stack.append((child_section, children[number - 1], depth + 1, related))
    return leaves


def _is_identity(encoding: str) -> bool:
    return type(make_decoder(encoding)) is IncrementalDecoder


def _decoded_size(entity: _Entity) -> int:
    if _is_identity(entity.encoding):
        return entity.end - entity.body_start
    decoder = make_decoder(entity.encoding)
    total = 0
    for offset in range(entity.body_start, entity.end, _DECODE_CHUNK):
        total += len(decoder.feed(entity.buf[offset : min(offset + _DECODE_CHUNK, entity.end)]))
    return total + len(decoder.finish())


def parse_message(raw: bytes) -> ParsedMessage:
    """Headers, the text and HTML bodies, and the attachments of a whole message. Never raises."""
    buf = bytes(raw)
    fields, body_start = _read_fields(buf, 0, len(buf))
    headers = _parsed_headers(fields)
    top = _entity(buf, fields, body_start, len(buf), "text/plain")
    text_body: str | None = None
    html_body: str | None = None
    attachments: list[PartInfo] = []
    for section, entity, in_related in _leaves(top):
        is_attachment, inline = classify_part(entity.content_type, entity.disposition, entity.filename, in_related)
        if not is_attachment:
            if entity.content_type == "text/plain" and text_body is None:
                text_body = decode_text(entity.body(), entity.params.get("charset"))
            elif entity.content_type == "text/html" and html_body is None:
                html_body = decode_text(entity.body(), entity.params.get("charset"))
            continue
        attachments.append(
            PartInfo(
                section=section,
                filename=entity.filename,
                content_type=entity.content_type,
                size_bytes=_decoded_size(entity),
                inline=inline,
                content_id=entity.content_id,
                encoding=entity.encoding,
            )
        )
    return ParsedMessage(
        **{f.name: getattr(headers, f.name) for f in dataclasses.fields(ParsedHeaders)},
        text_body=text_body or "",
        html_body=html_body or "",
        attachments=tuple(attachments),
    )


_SECTION = re.compile(r"[1-9][0-9]{0,5}(?:\.[1-9][0-9]{0,5}){0,63}")


def part_bytes(raw: bytes, section: str) -> bytes | None:
    """The decoded content of one IMAP body section ("1", "2.1", ...) of a whole message; None if there is none.

    Numbering is :func:`parse_message`'s (RFC 3501), including the parts of encapsulated messages. A multipart
    section gives its raw body, an encapsulated message its whole text.
    """
    if not _SECTION.fullmatch(section):
        return None
    buf = bytes(raw)
    numbers = [int(number) for number in section.split(".")]
    level = _read_entity(buf, 0, len(buf), "text/plain", MAX_HEADER_LINES)  # whose parts the next number counts
    for index, number in enumerate(numbers):
        if level.is_multipart:
            children = _children(level, number)
            if len(children) < number:
                return None
            node = children[number - 1]
        elif number == 1:
            node = level  # a message that is not multipart has one part: its body
        else:
            return None
        if index == len(numbers) - 1:
            return node.body()
        if node.is_multipart:
            level = node
        elif node.content_type in _ENCAPSULATED:
            if _is_identity(node.encoding):
                level = _read_entity(node.buf, node.body_start, node.end, "text/plain", MAX_HEADER_LINES)
            else:
                inner = node.body()
                level = _read_entity(inner, 0, len(inner), "text/plain", MAX_HEADER_LINES)
        else:
            return None
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------------

# SMTP's CRLF, and only 7-bit output: non-ASCII text goes quoted-printable or base64, so no relay needs 8BITMIME.
# Subject and the address fields are encoded and folded here (see _subject_field) and stored raw; refold_source
# "none" makes the generator write them as they are.
_POLICY = email.policy.SMTP.clone(cte_type="7bit", refold_source="none")

# Characters that may not reach a header: line breaks (including the ones str.splitlines() honours, which the
# standard library's folding splits on), NUL and other controls, and lone surrogates, which cannot be encoded.
_HEADER_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029\ud800-\udfff]")
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
_CONTENT_ID = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]{1," + str(MAX_CONTENT_ID_CHARS) + "}")
_MESSAGE_ID_TEXT = re.compile(r"[\x21-\x3b\x3d\x3f-\x7e]+")  # printable ASCII without "<" and ">"
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_COMPRESSED_TYPES = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "compress": "application/x-compress",
}


class _Violations:
    """Collects (reason, FieldViolation) in request order, up to a cap."""

    def __init__(self) -> None:
        self.items: list[tuple[str, FieldViolation]] = []

    def add(self, reason: str, field_path: str, description: str) -> None:
        if len(self.items) < _MAX_VIOLATIONS:
            self.items.append((reason, FieldViolation(field_path, description)))

    def header_text(self, value: str, field_path: str) -> bool:
        """False (and a HEADER_INJECTION violation) if ``value`` cannot go into a header."""
        if _HEADER_UNSAFE.search(value):
            self.add("HEADER_INJECTION", field_path, "must not contain line breaks, NUL or other control characters")
            return False
        return True


def _addr_spec(text: str) -> Address | None:
    """``text`` as an RFC 5322 addr-spec (ASCII, no comments or folding white space), or None."""
    if not text or len(text) > MAX_ADDRESS_CHARS or not text.isascii():
        return None
    try:
        address = Address(addr_spec=text)
    except Exception:  # HeaderParseError, ValueError, and IndexError on some inputs such as "a@"
        return None
    if not address.username or not address.domain:
        return None
    rest = text
    if text.startswith('"'):
        i = 1
        while i < len(text) and text[i] != '"':
            i += 2 if text[i] == "\\" else 1
        rest = text[i + 1 :]
    if any(c in rest for c in " \t()"):
        return None
    return address


def _check_recipients(
    violations: _Violations, addresses: Sequence[EmailAddress], path: str
) -> list[tuple[EmailAddress, Address | None]]:
    checked: list[tuple[EmailAddress, Address | None]] = []
    for index, recipient in enumerate(addresses[:MAX_RECIPIENTS]):
        prefix = f"{path}[{index}]"
        if violations.header_text(recipient.display_name, f"{prefix}.display_name") and (
            len(recipient.display_name) > MAX_DISPLAY_NAME_CHARS
        ):
            violations.add(
                "DISPLAY_NAME_TOO_LONG", f"{prefix}.display_name", f"at most {MAX_DISPLAY_NAME_CHARS} characters"
            )
        parsed = None
        if violations.header_text(recipient.address, f"{prefix}.address"):
            parsed = _addr_spec(recipient.address)
            if parsed is None:
                violations.add("INVALID_ADDRESS", f"{prefix}.address", "not a valid email address (local@domain)")
        checked.append((recipient, parsed))
    return checked


def _message_id(value: str) -> str | None:
    """A message id in angle brackets, or None when it is not one."""
    inner = _strip_angle_brackets(value)
    if not inner or not _MESSAGE_ID_TEXT.fullmatch(inner) or len(inner) + 2 > MAX_MESSAGE_ID_CHARS:
        return None
    return f"<{inner}>"


def _attachment_type(attachment: OutgoingAttachment) -> str:
    if attachment.content_type:
        return attachment.content_type.lower()
    guessed, compression = mimetypes.guess_type(attachment.filename, strict=False)
    if compression:
        return _COMPRESSED_TYPES.get(compression, "application/octet-stream")
    return guessed.lower() if guessed and _CONTENT_TYPE.fullmatch(guessed) else "application/octet-stream"


def _check_attachments(violations: _Violations, attachments: Sequence[OutgoingAttachment]) -> None:
    if len(attachments) > MAX_ATTACHMENTS:
        violations.add("TOO_MANY_ATTACHMENTS", "message.attachments", f"at most {MAX_ATTACHMENTS} attachments")
    if sum(len(a.content) for a in attachments) > MAX_ATTACHMENT_BYTES:
        violations.add("ATTACHMENTS_TOO_LARGE", "message.attachments", f"at most {MAX_ATTACHMENT_BYTES} bytes in total")
    for index, attachment in enumerate(attachments[:MAX_ATTACHMENTS]):
        prefix = f"message.attachments[{index}]"
        if not violations.header_text(attachment.filename, f"{prefix}.filename"):
            pass
        elif not attachment.filename.strip():
            violations.add("INVALID_ATTACHMENT", f"{prefix}.filename", "a file name is required")
        elif len(attachment.filename) > MAX_FILENAME_CHARS:
            violations.add("INVALID_ATTACHMENT", f"{prefix}.filename", f"at most {MAX_FILENAME_CHARS} characters")
        if attachment.content_type and violations.header_text(attachment.content_type, f"{prefix}.content_type"):
            if not _CONTENT_TYPE.fullmatch(attachment.content_type):
                violations.add("INVALID_CONTENT_TYPE", f"{prefix}.content_type", "must be a MIME type, type/subtype")
            elif attachment.content_type.lower().startswith("multipart/"):
                violations.add("INVALID_CONTENT_TYPE", f"{prefix}.content_type", "must not be a multipart type")
        if (
            attachment.content_id
            and violations.header_text(attachment.content_id, f"{prefix}.content_id")
            and not _CONTENT_ID.fullmatch(_strip_angle_brackets(attachment.content_id))
        ):
            violations.add(
                "INVALID_CONTENT_ID",
                f"{prefix}.content_id",
                f"letters, digits and !#$%&'*+/=?^_`{{|}}~.@- only, at most {MAX_CONTENT_ID_CHARS}",
            )


_Checked = list[tuple[EmailAddress, Address | None]]


def _validate(outgoing: OutgoingMessage, display_name: str) -> tuple[_Checked, _Checked, _Checked, _Checked]:
    """Check every header-bound field; raise InvalidArgument listing all violations."""
    violations = _Violations()
    total = len(outgoing.to) + len(outgoing.cc) + len(outgoing.bcc)
    if total == 0:
        violations.add("NO_RECIPIENTS", "message.to_recipients", "at least one recipient in to, cc or bcc")
    elif total > MAX_RECIPIENTS:
        violations.add(
            "TOO_MANY_RECIPIENTS", "message.to_recipients", f"at most {MAX_RECIPIENTS} recipients in to, cc and bcc"
        )
    if len(outgoing.reply_to) > MAX_RECIPIENTS:
        violations.add("TOO_MANY_RECIPIENTS", "message.reply_to", f"at most {MAX_RECIPIENTS} addresses")
    lists = (
        _check_recipients(violations, outgoing.to, "message.to_recipients"),
        _check_recipients(violations, outgoing.cc, "message.cc_recipients"),
        _check_recipients(violations, outgoing.bcc, "message.bcc_recipients"),
        _check_recipients(violations, outgoing.reply_to, "message.reply_to"),
    )
    if violations.header_text(outgoing.subject, "message.subject") and len(outgoing.subject) > MAX_SUBJECT_CHARS:
        violations.add("SUBJECT_TOO_LONG", "message.subject", f"at most {MAX_SUBJECT_CHARS} characters")
    for body, path in ((outgoing.text_body, "message.text_body"), (outgoing.html_body, "message.html_body")):
        if re.search("[\ud800-\udfff]", body):
            violations.add("INVALID_TEXT", path, "must be valid Unicode text")
    _check_attachments(violations, outgoing.attachments)
    if (
        outgoing.in_reply_to
        and violations.header_text(outgoing.in_reply_to, "message.in_reply_to")
        and _message_id(outgoing.in_reply_to) is None
    ):
        violations.add("INVALID_MESSAGE_ID", "message.in_reply_to", "not a message id such as <id@host>")
    if len(outgoing.references) > MAX_REFERENCES:
        violations.add("TOO_MANY_REFERENCES", "message.references", f"at most {MAX_REFERENCES} message ids")
    for index, reference in enumerate(outgoing.references[:MAX_REFERENCES]):
        path = f"message.references[{index}]"
        if violations.header_text(reference, path) and _message_id(reference) is None:
            violations.add("INVALID_MESSAGE_ID", path, "not a message id such as <id@host>")
    if violations.header_text(display_name, "message.sender_display_name") and (
        len(display_name) > MAX_DISPLAY_NAME_CHARS
    ):
        violations.add(
            "DISPLAY_NAME_TOO_LONG", "message.sender_display_name", f"at most {MAX_DISPLAY_NAME_CHARS} characters"
        )
    if violations.items:
        raise InvalidArgument(
            "the message is invalid",
            reason=violations.items[0][0],
            field_violations=[violation for _, violation in violations.items],
        )
    return lists


def _header_addresses(checked: Sequence[tuple[EmailAddress, Address | None]]) -> str:
    mailboxes: list[tuple[str, Address]] = []
    for recipient, parsed in checked:
        assert parsed is not None  # validation refused the request otherwise
        mailboxes.append((recipient.display_name, parsed))
    return _address_field(mailboxes)


def _add_part(
    target: MIMEPart,
    attachment: OutgoingAttachment,
    *,
    related: bool,
) -> None:
    maintype, _, subtype = _attachment_type(attachment).partition("/")
    content_id = _strip_angle_brackets(attachment.content_id)
    cte = "base64"
    if maintype == "message" and attachment.content.isascii() and _short_lines(attachment.content):
        cte = "7bit"  # RFC 2046 §5.2.1: message/rfc822 must not be base64 when it can be avoided
    add = target.add_related if related else target.add_attachment
    add(
        attachment.content,
        maintype,
        subtype,
        filename=attachment.filename,
        cid=f"<{content_id}>" if content_id else None,
        disposition="inline" if attachment.inline else "attachment",
        cte=cte,
    )


# The standard library's folder moves white space between encoded words, where decoders drop it (so "a  日本"
# arrives as "a 日本"), and keeps a space between adjacent encoded words of a display name. These fields are
# therefore written here: plain when that is exact, else RFC 2047 words (UTF-8, base64) one per line.
_WORD_OCTETS = 39  # 52 base64 characters: a 64-character word, so "Reply-To: " + word stays within 78
_FOLD_WIDTH = 78
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ATOM_PHRASE = re.compile(f"{_ATEXT}(?: {_ATEXT})*")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


def _encoded_words(text: str) -> list[str]:
    chunks: list[bytes] = []
    chunk = b""
    for char in text:
        octets = char.encode("utf-8")
        if len(chunk) + len(octets) > _WORD_OCTETS:
            chunks.append(chunk)
            chunk = b""
        chunk += octets
    chunks.append(chunk)
    return [f"=?utf-8?b?{base64.b64encode(c).decode('ascii')}?=" for c in chunks]


def _subject_field(subject: str) -> str:
    """The Subject value, folded ("\n " between lines): plain ASCII when exact, else encoded words."""
    if _PRINTABLE.fullmatch(subject) and "=?" not in subject and subject == subject.strip():
        lines: list[str] = []
        line = ""
        width = len("Subject: ")
        for piece in re.split(r"(?<=\S)(?=\s)", subject):  # break only before white space
            if line and width + len(line) + len(piece) > _FOLD_WIDTH:
                lines.append(line)
                line, width = piece, 0
            else:
                line += piece
        lines.append(line)
        if all(len(x) <= _FOLD_WIDTH for x in lines[1:]) and len("Subject: ") + len(lines[0]) <= _FOLD_WIDTH:
            return "\n".join(lines)
    return "\n ".join(_encoded_words(subject))


def _mailbox_lines(display_name: str, address: Address) -> list[str]:
    spec = address.addr_spec
    if not display_name:
        return [spec]
    if len(display_name) <= 60 and "=?" not in display_name:
        if _ATOM_PHRASE.fullmatch(display_name):
            return [f"{display_name} <{spec}>"]
        if _PRINTABLE.fullmatch(display_name):
            quoted = display_name.replace("\\", "\\\\").replace('"', '\\"')
            return [f'"{quoted}" <{spec}>']
    words = _encoded_words(display_name)
    if len("Reply-To: ") + len(words[-1]) + len(spec) + len(" <>,") <= _FOLD_WIDTH:
        words[-1] += f" <{spec}>"
    else:
        words.append(f"<{spec}>")
    return words


def _address_field(mailboxes: Sequence[tuple[str, Address]]) -> str:
    """An address-list value, one mailbox (or encoded word) per line."""
    lines: list[str] = []
    for index, (display_name, address) in enumerate(mailboxes):
        mailbox = _mailbox_lines(display_name, address)
        if index < len(mailboxes) - 1:
            mailbox[-1] += ","
        lines.extend(mailbox)
    return "\n ".join(lines)


def _short_lines(data: bytes) -> bool:
    return all(len(line) <= 998 for line in data.splitlines())


def build_message(
    outgoing: OutgoingMessage,
    sender: EmailAddress,
    *,
    message_id_domain: str,
    now: datetime | None = None,
) -> BuiltMessage:
    """An RFC 5322 message for ``outgoing``, from ``sender`` (the account's own address).

    Raises ``InvalidArgument`` listing every bad field (reason: the first one's) and builds nothing then;
    ``FailedPrecondition`` when the account's own address cannot be used as a sender. Bcc recipients go into
    ``envelope_recipients`` only.

    Structure: text and/or HTML (multipart/alternative when both); inline parts wrap the HTML in multipart/related
    (without HTML they become inline parts of multipart/mixed); attachments make it multipart/mixed.
    """
    if not _DOMAIN.fullmatch(message_id_domain) or ".." in message_id_domain:
        raise ValueError("message_id_domain must be a domain name")
    display_name = outgoing.sender_display_name or sender.display_name
    to, cc, bcc, reply_to = _validate(outgoing, display_name)
    from_address = _addr_spec(sender.address) if not _HEADER_UNSAFE.search(sender.address) else None
    if from_address is None:
        raise FailedPrecondition("the account's address cannot be used as a sender", reason="INVALID_SENDER_ADDRESS")

    when = now or datetime.now(UTC)
    when = (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
    message_id = f"<{secrets.token_hex(16)}@{message_id_domain.lower()}>"

    message = EmailMessage(policy=_POLICY)
    message.set_raw("From", _address_field([(display_name, from_address)]))
    if to:
        message.set_raw("To", _header_addresses(to))
    if cc:
        message.set_raw("Cc", _header_addresses(cc))
    if reply_to:
        message.set_raw("Reply-To", _header_addresses(reply_to))
    if outgoing.subject:
        message.set_raw("Subject", _subject_field(outgoing.subject))
    message["Date"] = email.utils.format_datetime(when)
    message["Message-ID"] = message_id
    if outgoing.in_reply_to:
        message["In-Reply-To"] = _message_id(outgoing.in_reply_to) or ""
    if outgoing.references:
        message["References"] = " ".join(_message_id(r) or "" for r in outgoing.references)

    html_part: MIMEPart | None = None
    if outgoing.html_body and outgoing.text_body:
        message.set_content(outgoing.text_body)
        message.add_alternative(outgoing.html_body, subtype="html")
        html_part = list(message.iter_parts())[1]
    elif outgoing.html_body:
        message.set_content(outgoing.html_body, subtype="html")
        html_part = message
    else:
        message.set_content(outgoing.text_body)

    inline = [a for a in outgoing.attachments if a.inline]
    if html_part is not None:
        for attachment in inline:
            _add_part(html_part, attachment, related=True)
        inline = []
    for attachment in [*inline, *(a for a in outgoing.attachments if not a.inline)]:
        _add_part(message, attachment, related=False)

    envelope: dict[str, str] = {}
    for _, parsed in (*to, *cc, *bcc):
        assert parsed is not None
        envelope.setdefault(f"{parsed.username}@{parsed.domain.lower()}", parsed.addr_spec)
    bcc_field = b""
    if bcc:
        holder = EmailMessage(policy=_POLICY)
        holder.set_raw("Bcc", _header_addresses(bcc))
        bcc_field = holder.as_bytes(policy=_POLICY).rstrip(b"\r\n") + b"\r\n"
    return BuiltMessage(
        raw=message.as_bytes(policy=_POLICY),
        internet_message_id=message_id,
        envelope_recipients=tuple(envelope.values()),
        bcc_field=bcc_field,
    )
