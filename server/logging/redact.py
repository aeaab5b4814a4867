"""Mask addresses, credentials and token shapes in free text before it reaches a log line.

This is the backstop behind the field allow-list. It recognises *shapes* (an address, a ``Bearer`` value, a
``ya29.`` token, a JWT, ``password=...``, an IMAP ``LOGIN`` line, long base64/hex runs), so it cannot recognise free
text such as a subject formatted into a message: keeping that out of logs is the caller's job, this module makes
the common slips harmless.

Each rule is a precompiled pattern guarded by a cheap substring test, so a line pays only for the shapes it might
contain, and no pattern backtracks quadratically on a long line (runs are matched from their start only). About
0.1-0.3 ms for a 4 KiB line, a few microseconds for a typical one. :func:`redact` never raises: if anything goes
wrong it withholds the whole text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

REDACTED: Final = "[REDACTED]"
EMAIL: Final = "[EMAIL]"


@dataclass(frozen=True, slots=True)
class _Rule:
    """One shape: run ``pattern`` when any trigger occurs in the text (or its lower-case form if ``fold``)."""

    pattern: re.Pattern[str]
    replacement: str | Callable[[re.Match[str]], str]
    triggers: tuple[str, ...] = ()
    fold: bool = False


# --- Protocol traces (imaplib debug output, imapclient's protocol logger, SMTP servers) -----------------------------

# Everything after LOGIN is credentials. After AUTHENTICATE/AUTH the mechanism stays and any initial response goes.
# The look-behind keeps capability lists such as "AUTH=LOGIN" intact.
_IMAP_LOGIN = re.compile(r"(?<![=\w])LOGIN[ \t]+[^\r\n]*")
_SASL_COMMAND = re.compile(r"(?<![=\w])(AUTHENTICATE|AUTH)[ \t]+([\w-]+)[ \t]+[^\r\n]*")
# A SASL continuation: a traced line that is nothing but one base64 blob (the client's answer to "+ "). Too short
# for the long-run rule (PLAIN for a short address and password is ~20 characters), so it is matched by position.
_SASL_CONTINUATION = re.compile(
    r"""(?m)^(?P<pre>[ \t]*(?:\d\d:\d\d\.\d\d[ \t]+)?(?:[<>+]|[CS]:|send:|reply:)[ \t]*(?:b?['"])?)"""
    r"""(?P<blob>[A-Za-z0-9+/]{8,}={0,2})(?P<post>(?:\\r\\n)?['"]?[ \t]*)$"""
)

# --- HTTP credentials ---------------------------------------------------------------------------------------------

# Credential headers lose their whole value, whatever the scheme.
_CREDENTIAL_HEADER = re.compile(
    r"""(?i)(?<![\w-])(?P<key>(?:proxy-)?authorization|(?:set-)?cookie)(?P<sep>["']?[ \t]*[:=][ \t]*)"""
    r"""(?P<value>"[^"\r\n]*"?|'[^'\r\n]*'?|[^\r\n"']+)"""
)
_AUTH_SCHEME = re.compile(r"\b(Bearer|bearer|BEARER|Basic|BASIC)(?:[ \t]+|%20|\+)[A-Za-z0-9\-._~+/%]+=*")

# --- key=value and "key": "value" ---------------------------------------------------------------------------------

# Query strings, form bodies, JSON, Python reprs and their URL-encoded forms (%3D for "="; a bare value ends at "&"
# or "%26"). Keys in three groups: OAuth, passwords and API keys, message content as it appears in provider JSON.
_SECRET_KEYS: Final = (
    "access_token",
    "refresh_token",
    "id_token",
    "token",
    "code",
    "code_verifier",
    "client_secret",
    "client_assertion",
    "assertion",
    # --
    "password",
    "passwd",
    "pass",
    "pwd",
    "secret",
    "private_key",
    "api_key",
    "apikey",
    "api-key",
    "x-api-key",
    "x-goog-api-key",
    # --
    "subject",
    "snippet",
    "bodyPreview",
    "body",
    "content",
)
# Spelled out as lower, Capitalised and UPPER instead of (?i): case-folded alternation is several times slower.
_KEY_ALTERNATION: Final = "|".join(
    dict.fromkeys(
        re.escape(variant)
        for key in sorted(_SECRET_KEYS, key=len, reverse=True)
        for variant in (key, key[:1].upper() + key[1:], key.upper())
    )
)
_VALUE: Final = (
    r"""(?:\\"(?:(?!\\").)*\\"|"(?:[^"\\\r\n]|\\.)*"|'(?:[^'\\\r\n]|\\.)*'"""
    r"""|(?:[^\s&"'<>,;(){}\[\]%]|%(?!26))+)"""
)
# The key must follow a non-key character or a URL escape such as "%26" ("+" or "/" before it means it sits inside
# a base64 run). redact() puts a space in front of the text so that a key at the very start has one too; consuming
# it, rather than a look-behind, lets the engine skip ahead to candidate characters.
_KEY_VALUE = re.compile(
    r"""(?P<head>(?:[^\w$%+/-]|%[0-9A-Fa-f]{2})(?:"""
    + _KEY_ALTERNATION
    + r""")\\?["']?[ \t]*(?:=|:|%3D)[ \t]*)"""
    + _VALUE
)
_KEY_TRIGGERS: Final = (
    "token",
    "code",
    "assertion",
    "secret",
    "pass",
    "pwd",
    "key",
    "subject",
    "snippet",
    "body",
    "content",
)
# Search queries carry what a caller looked for (a sender, a subject): Gmail `q`, Graph `$search` and `$filter`.
# Short names, so only as URL parameters.
_QUERY_PARAM = re.compile(r"(?P<head>[?&](?:q|\$search|%24search|\$filter|%24filter)=)" + _VALUE)

# --- Provider token shapes ----------------------------------------------------------------------------------------

# JWTs (Microsoft access tokens, id tokens, client assertions): three base64url segments, the first a JSON header.
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Google: access tokens start "ya29.", refresh tokens "1//", authorization codes "4/0" (also URL-encoded).
_GOOGLE_TOKEN = re.compile(
    r"\bya29\.[A-Za-z0-9_\-.]{8,}|\b1(?://|%2[Ff]%2[Ff])[A-Za-z0-9_-]{8,}|\b4(?:/|%2[Ff])0[A-Za-z0-9_-]{16,}"
)

# --- Addresses ----------------------------------------------------------------------------------------------------

# A dotted-atom or loosely quoted local part, "@" or its URL-encoded forms, a domain or IP literal. "=", "&" and "/"
# are left out of the local part so that "to=a@b", "q&a@b" and "/users/a@b" keep their surroundings. The
# look-behind starts a match only at the beginning of a run, so a long run without "@" is scanned once.
_LOCAL_CHARS: Final = r"\w!#$%'*+?^{|}~.\-"
_EMAIL_ADDRESS = re.compile(
    r'(?:"[^"\r\n]{1,64}"|(?<![' + _LOCAL_CHARS + r"])[" + _LOCAL_CHARS + r"]+)"
    r"(?:@|%40|%2540)"
    r"(?:\[[^\]\s]{1,64}\]|[\w-]+(?:\.[\w-]+)*)"
)
# A quoted display name in front of an address is personal data too: '"Jo Doe" <[EMAIL]>' becomes '[EMAIL]'.
_DISPLAY_NAME = re.compile(r'"[^"\r\n]{0,128}"[ \t]*<\[EMAIL\]>')

# --- Long opaque runs: keys, secrets, encoded credentials ---------------------------------------------------------

# Candidates are maximal runs of the base64 alphabets plus "%" (URL-encoded "+", "/", "="); a greedy run needs no
# look-behind to stay maximal, because a shorter run fails from every start. Inside a candidate, hex runs are
# masked outright and base64 runs if _looks_random says so, which spares paths and CamelCase identifiers.
_LONG_RUN = re.compile(r"[A-Za-z0-9+/_%-]{32,}=*")
_HEX_RUN = re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{32,}(?![0-9A-Fa-f])")
_BASE64_RUN = re.compile(r"(?<![A-Za-z0-9+/_-])(?:[A-Za-z0-9+/_-]|%2[BbFf]){32,}(?:=|%3[Dd]){0,2}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_MIN_RUN: Final = 32
# Words and identifiers split into chunks ("Stream", "Mailbox", "V", "2") averaging 4.5+ characters; random base64
# averages under 2 and a random 32-character run reaches 4.0 in fewer than 1 in 10,000 cases. Requiring both letter
# cases spares lower-case paths and ids (random base64 of this length has both all but always).
_CHUNK = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_MAX_RANDOM_CHUNK: Final = 4.0


def _looks_random(run: str) -> bool:
    """Tell a base64-encoded secret from a path or identifier drawn from the same alphabet."""
    if "%" in run:
        run = run.replace("%2B", "+").replace("%2b", "+").replace("%2F", "/").replace("%2f", "/")
        run = run.replace("%3D", "").replace("%3d", "")
    text = run.rstrip("=")
    if len(text) < _MIN_RUN or text.islower() or text.isupper() or _UUID.fullmatch(text):
        return False
    chunks = _CHUNK.findall(text)
    return sum(map(len, chunks)) / len(chunks) < _MAX_RANDOM_CHUNK


def _mask_base64(match: re.Match[str]) -> str:
    return REDACTED if _looks_random(match.group()) else match.group()


def _mask_long_run(match: re.Match[str]) -> str:
    run = _HEX_RUN.sub(REDACTED, match.group())
    if "%" in run or REDACTED in run:
        # URL escapes or a masked hex stretch split the candidate: judge each base64 run inside it.
        return _BASE64_RUN.sub(_mask_base64, run)
    return REDACTED if _looks_random(run) else run


def _mask_email(match: re.Match[str]) -> str:
    # A run that starts with "'" is a repr such as 'a@b': keep the quote, mask the address.
    return "'" + EMAIL if match.group().startswith("'") else EMAIL


def _mask_sasl_command(match: re.Match[str]) -> str:
    return f"{match.group(1)} {match.group(2)} {REDACTED}"


_KEEP_KEY: Final = rf"\g<head>{REDACTED}"

# Order matters: protocol lines and headers before generic key=value (so "Authorization: Bearer x" loses both
# words), whole runs before token prefixes (so a "1//" inside a base64 run cannot leave the rest of it behind).
_RULES: Final = (
    _Rule(_IMAP_LOGIN, f"LOGIN {REDACTED}", ("LOGIN",)),
    _Rule(_SASL_COMMAND, _mask_sasl_command, ("AUTH",)),
    _Rule(_SASL_CONTINUATION, rf"\g<pre>{REDACTED}\g<post>", ("<", ">", "+", "C:", "S:", "send:", "reply:")),
    _Rule(_CREDENTIAL_HEADER, rf"\g<key>\g<sep>{REDACTED}", ("authoriz", "cookie"), fold=True),
    _Rule(_AUTH_SCHEME, rf"\1 {REDACTED}", ("bearer", "basic"), fold=True),
    _Rule(_KEY_VALUE, _KEEP_KEY, _KEY_TRIGGERS, fold=True),
    _Rule(_QUERY_PARAM, _KEEP_KEY, ("q=", "search=", "filter=", "search%3", "filter%3")),
    _Rule(_JWT, REDACTED, ("eyJ",)),
    _Rule(_EMAIL_ADDRESS, _mask_email, ("@", "%40", "%2540")),
    _Rule(_DISPLAY_NAME, EMAIL, (f"<{EMAIL}>",)),
    _Rule(_LONG_RUN, _mask_long_run),
    _Rule(_GOOGLE_TOKEN, REDACTED, ("ya29.", "1//", "1%2", "4/0", "4%2")),
)


# Every trigger in one pattern per case mode, so the common text with none of them (the access log's fields, most
# messages) costs two scans instead of a Python-level test per rule. Exactly the gating of the loop below: a
# fold rule's triggers are looked for in the lower-cased text, the others as written.
_ANY_TRIGGER: Final = re.compile("|".join(re.escape(t) for r in _RULES if not r.fold for t in r.triggers))
_ANY_FOLDED_TRIGGER: Final = re.compile("|".join(re.escape(t) for r in _RULES if r.fold for t in r.triggers))
# The long-run rule is the only one without a trigger. When no trigger occurs in the text, no rule before it
# applies, and no rule after it can start to: it only swaps parts of runs for "[REDACTED]", and no trigger of a
# later rule contains "[" or "]" (so none can be made across the seam) or occurs inside "[REDACTED]".
_LONG_RUN_AT: Final = next(index for index, rule in enumerate(_RULES) if not rule.triggers)
if (
    _RULES[_LONG_RUN_AT].pattern is not _LONG_RUN
    or any(not rule.triggers for rule in _RULES[_LONG_RUN_AT + 1 :])
    or any("[" in t or "]" in t or t in REDACTED for rule in _RULES[_LONG_RUN_AT + 1 :] for t in rule.triggers)
):  # pragma: no cover - a change to the rules that breaks the fast path in redact() fails at import
    raise AssertionError("redact(): the no-trigger fast path no longer matches the rules")


def redact(text: str) -> str:
    """Return ``text`` with addresses, credentials and token shapes replaced by fixed markers; never raises."""
    try:
        if not isinstance(text, str):  # callers are typed, third-party code is not
            text = str(text)
        if _ANY_TRIGGER.search(text) is None and _ANY_FOLDED_TRIGGER.search(text.lower()) is None:
            # No rule but the long-run one can apply (see _LONG_RUN_AT); it needs a run of 32 characters.
            return _LONG_RUN.sub(_mask_long_run, text) if len(text) >= _MIN_RUN else text
        # The leading space gives a key at the very start the separator _KEY_VALUE consumes; every rule keeps it.
        text = " " + text
        folded: str | None = None
        for rule in _RULES:
            if rule.triggers:
                haystack = text
                if rule.fold:
                    folded = haystack = folded if folded is not None else text.lower()
                if not any(trigger in haystack for trigger in rule.triggers):
                    continue
            masked = rule.pattern.sub(rule.replacement, text)
            if masked != text:
                text, folded = masked, None
        return text[1:] if text.startswith(" ") else text
    except Exception:  # a log line must never break the caller: withhold rather than guess
        return REDACTED
