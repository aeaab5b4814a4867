"""Mask addresses, credentials and token shapes in free text before it reaches a log line.

This is the backstop behind the field allow-list: it recognises *shapes* (an address, a ``Bearer`` value, a
``ya29.`` token, a JWT, ``password=...``, an IMAP ``LOGIN`` line, long base64/hex runs), so it cannot recognise
free text such as a subject that was formatted into a message. Keeping such text out of logs is the caller's job;
this module makes the common slips harmless.

Every pattern is precompiled and linear-time (runs are anchored at their start with a look-behind, so a long line
without a match is scanned once), and :func:`redact` never raises: if anything goes wrong it withholds the whole
text.
"""

from __future__ import annotations

import re
from typing import Final

REDACTED: Final = "[REDACTED]"
EMAIL: Final = "[EMAIL]"

# Protocol traces (imaplib debug output, imapclient's protocol logger, SMTP servers). Everything after LOGIN is
# credentials; after AUTHENTICATE/AUTH the mechanism name is kept and any initial response withheld. The
# look-behind keeps capability lists such as "AUTH=LOGIN" intact.
_IMAP_LOGIN = re.compile(r"(?<![=\w])LOGIN[ \t]+[^\r\n]*")
_SASL_COMMAND = re.compile(r"(?<![=\w])(AUTHENTICATE|AUTH)[ \t]+([\w-]+)[ \t]+[^\r\n]*")
# A SASL continuation: a traced line that is nothing but one base64 blob (the client's response to "+ ").
_SASL_CONTINUATION = re.compile(
    r"""(?m)^(?P<pre>[ \t]*(?:\d\d:\d\d\.\d\d[ \t]+)?(?:[<>+]|[CS]:|send:|reply:)[ \t]*(?:b?['"])?)"""
    r"""(?P<blob>[A-Za-z0-9+/]{8,}={0,2})(?P<post>(?:\\r\\n)?['"]?[ \t]*)$"""
)

# HTTP credentials headers: the whole value goes, whatever the scheme.
_CREDENTIAL_HEADER = re.compile(
    r"""(?i)(?<![\w-])(?P<key>(?:proxy-)?authorization|(?:set-)?cookie)(?P<sep>["']?[ \t]*[:=][ \t]*)"""
    r"""(?P<value>"[^"\r\n]*"?|'[^'\r\n]*'?|[^\r\n"']+)"""
)
_AUTH_SCHEME = re.compile(r"\b(Bearer|bearer|BEARER|Basic|BASIC)(?:[ \t]+|%20|\+)[A-Za-z0-9\-._~+/%]+=*")

# Secrets and content in key=value / "key": "value" form: query strings, form bodies, JSON, Python reprs and
# URL-encoded forms (%3D for "=", a value ends at "&" or "%26"). Grouped: OAuth, passwords and keys, then message
# content as it appears in provider JSON. "+" and "/" before a key mean it sits inside a base64 run, not a key.
_SECRET_KEYS: Final = (
    "access_token|refresh_token|id_token|token|code|code_verifier|client_secret|client_assertion|assertion"
    "|password|passwd|pass|pwd|secret|private_key|api[_-]?key|x[_-]api[_-]key|x[_-]goog[_-]api[_-]key"
    "|subject|snippet|bodypreview|body|content"
)
_VALUE: Final = (
    r"""(?P<value>\\"(?:(?!\\").)*\\"|"(?:[^"\\\r\n]|\\.)*"|'(?:[^'\\\r\n]|\\.)*'"""
    r"""|(?:[^\s&"'<>,;(){}\[\]%]|%(?!26))+)"""
)
_KEY_VALUE = re.compile(
    r"""(?i)(?<![\w$%+/-])(?P<key>""" + _SECRET_KEYS + r""")(?P<sep>\\?["']?[ \t]*(?:=|:|%3D)[ \t]*)""" + _VALUE
)
# Search queries carry what a caller looked for (a sender, a subject): Gmail `q`, Graph `$search` and `$filter`.
# Short names, so only as URL parameters.
_QUERY_PARAM = re.compile(r"(?<=[?&])(?P<key>q|\$search|%24search|\$filter|%24filter)(?P<sep>=)" + _VALUE)

# Provider token shapes. JWTs (Microsoft access tokens, id tokens, assertions) are three base64url segments, the
# first a JSON header ("eyJ"). Google: access tokens start "ya29.", refresh tokens "1//", authorization codes "4/0".
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_GOOGLE_TOKEN = re.compile(
    r"\bya29\.[A-Za-z0-9_\-.]{8,}|\b1(?://|%2[Ff]%2[Ff])[A-Za-z0-9_-]{8,}|\b4(?:/|%2[Ff])0[A-Za-z0-9_-]{16,}"
)

# Addresses: a dotted-atom or loosely quoted local part, "@" (or its URL-encoded forms), a domain or IP literal.
# "=", "&" and "/" are left out of the local part so that "to=a@b", "q&a@b" and "/users/a@b" keep their
# surroundings; the look-behind starts a match only at the beginning of a run, which keeps the scan linear.
_LOCAL_CHARS: Final = r"\w!#$%'*+?^{|}~.\-"
_EMAIL_ADDRESS = re.compile(
    r'(?:"[^"\r\n]{1,64}"|(?<![' + _LOCAL_CHARS + r"])[" + _LOCAL_CHARS + r"]+)"
    r"(?:@|%40|%2540)"
    r"(?:\[[^\]\s]{1,64}\]|[\w-]+(?:\.[\w-]+)*)"
)
# A quoted display name in front of an address is personal data too: '"Jo Doe" <[EMAIL]>' becomes '[EMAIL]'.
_DISPLAY_NAME = re.compile(r'"[^"\r\n]{0,128}"[ \t]*<\[EMAIL\]>')

# Long opaque runs: keys, secrets, encoded credentials. Hex is masked outright; base64 candidates (either alphabet,
# with URL-encoded "+" and "/") are judged by _looks_random so that paths and CamelCase identifiers survive.
_HEX_RUN = re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{32,}(?![0-9A-Fa-f])")
_BASE64_RUN = re.compile(r"(?<![A-Za-z0-9+/_-])(?:[A-Za-z0-9+/_-]|%2[BbFf]){32,}(?:=|%3[Dd]){0,2}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_MIN_RUN = 32
# Words and identifiers split into chunks ("Stream", "Mailbox", "V", "2") averaging 4.5+ characters; random base64
# averages under 2, and a random 32-character run reaches 4.0 in well under 1 in 10,000 cases. Requiring both
# letter cases leaves lower-case paths and ids alone (random base64 has both all but always).
_CHUNK = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_MAX_RANDOM_CHUNK: Final = 4.0


def _looks_random(run: str) -> bool:
    """Tell a base64-encoded secret from a path or identifier drawn from the same alphabet."""
    text = run.replace("%2B", "+").replace("%2b", "+").replace("%2F", "/").replace("%2f", "/").rstrip("=")
    if len(text) < _MIN_RUN or _UUID.fullmatch(text):
        return False
    if text.lower() == text or text.upper() == text:
        return False
    chunks = _CHUNK.findall(text)
    return sum(map(len, chunks)) / len(chunks) < _MAX_RANDOM_CHUNK


def _mask_base64(match: re.Match[str]) -> str:
    return REDACTED if _looks_random(match.group()) else match.group()


def _mask_email(match: re.Match[str]) -> str:
    # A run that starts with "'" is a quoted repr such as 'a@b': keep the quote, mask the address.
    return "'" + EMAIL if match.group().startswith("'") else EMAIL


def _mask_sasl_command(match: re.Match[str]) -> str:
    return f"{match.group(1)} {match.group(2)} {REDACTED}"


def redact(text: str) -> str:
    """Return ``text`` with addresses, credentials and token shapes replaced by fixed markers; never raises."""
    try:
        if not isinstance(text, str):  # defensive: callers are typed, third-party code is not
            text = str(text)
        if "LOGIN" in text:
            text = _IMAP_LOGIN.sub(f"LOGIN {REDACTED}", text)
        if "AUTH" in text:
            text = _SASL_COMMAND.sub(_mask_sasl_command, text)
        text = _SASL_CONTINUATION.sub(rf"\g<pre>{REDACTED}\g<post>", text)
        text = _CREDENTIAL_HEADER.sub(rf"\g<key>\g<sep>{REDACTED}", text)
        text = _AUTH_SCHEME.sub(rf"\1 {REDACTED}", text)
        text = _KEY_VALUE.sub(rf"\g<key>\g<sep>{REDACTED}", text)
        if "?" in text or "&" in text:
            text = _QUERY_PARAM.sub(rf"\g<key>\g<sep>{REDACTED}", text)
        if "eyJ" in text:
            text = _JWT.sub(REDACTED, text)
        if "@" in text or "%40" in text:
            text = _EMAIL_ADDRESS.sub(_mask_email, text)
            text = _DISPLAY_NAME.sub(EMAIL, text)
        text = _HEX_RUN.sub(REDACTED, text)
        # Whole runs before token prefixes: a "1//" inside a base64 run must not split it into an unmasked rest.
        text = _BASE64_RUN.sub(_mask_base64, text)
        return _GOOGLE_TOKEN.sub(REDACTED, text)
    except Exception:  # a log line must never break the caller: withhold rather than guess
        return REDACTED
