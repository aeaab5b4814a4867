"""Logs carry metadata only: canary secrets logged every way we know never reach output, at any level."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import imaplib
import io
import json
import logging
import os
import re
import stat
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote_plus, urlencode

import pytest

from server.errors import ConfigurationError
from server.logging import (
    ALLOWED_FIELDS,
    JsonFormatter,
    RedactingFilter,
    configure_logging,
    get_logger,
    redact,
)
from server.logging.handlers import BrokerFileHandler, BrokerStreamHandler

# --- Canaries --------------------------------------------------------------------------------------------------------
# Values shaped like the real thing. They are never printed: leak reports name the canary, not its value.


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


EMAIL = "canary.person+x@example.test"
ACCESS_TOKEN = "ya29.a0AfB_Cnry7Qx2Lm9Vt4Wk8Pz1Rs5Hj3Ng6Bd0Fc"
REFRESH_TOKEN = "1//0gCnryRfrsh-Tk9Lm2Qx7Vz4Wp8Ks1Jd5Hb3Nc6"
JWT = ".".join(
    (
        _b64url(json.dumps({"alg": "RS256", "typ": "JWT"}).encode()),
        _b64url(json.dumps({"sub": "cnry-sub-7781", "upn": EMAIL}).encode()),
        _b64url(hashlib.sha256(b"jwt canary signature").digest()),
    )
)
PASSWORD = "Cnry-Passw0rd!hunter2"
SUBJECT = "Cnry subject: merger plans for Q3"
HEX_SECRET = hashlib.sha256(b"mailbroker logging canary hex").hexdigest()[:40]  # 40 hex characters
B64_SECRET = base64.b64encode(hashlib.sha256(b"mailbroker logging canary").digest()).decode()  # 44 characters

CANARIES = {
    "email": EMAIL,
    "access token": ACCESS_TOKEN,
    "refresh token": REFRESH_TOKEN,
    "jwt": JWT,
    "password": PASSWORD,
    "subject": SUBJECT,
    "hex secret": HEX_SECRET,
    "base64 secret": B64_SECRET,
}
# Distinctive parts, so that a partial leak (a token cut in two, an address without its domain) is caught too.
FRAGMENTS = {
    "email local part": "canary.person",
    "access token body": "Cnry7Qx2Lm9Vt4Wk8Pz1Rs5Hj3Ng6Bd0Fc",
    "refresh token body": "Cnry" + "Rfrsh-Tk9Lm2Qx7Vz4Wp8Ks1Jd5Hb3Nc6",
    "jwt signature": JWT.rsplit(".", 1)[1],
    "password body": "hunter2",
    "subject words": "merger plans",
    "hex secret head": HEX_SECRET[:16],
    "base64 secret head": B64_SECRET[:16],
}
ACCOUNT_ID = "a3kx9q2m7v4t8b1n6c5z0w2y4"  # an opaque account id: metadata, must survive


def _encodings(value: str) -> dict[str, str]:
    raw = value.encode()
    return {
        "raw": value,
        "url-encoded": quote(value, safe=""),
        "form-encoded": quote_plus(value),
        "base64": base64.b64encode(raw).decode().rstrip("="),
        "base64url": _b64url(raw),
        "hex": raw.hex(),
    }


_BASE64_LIKE = re.compile(r"[A-Za-z0-9+/_-]{12,}")
_HEX_LIKE = re.compile(r"(?:[0-9a-fA-F]{2}){8,}")


def _decoded_views(text: str) -> dict[str, str]:
    """``text`` plus what its URL escapes, base64 runs and hex runs decode to (a canary may be wrapped in them)."""
    views = {"output": text, "url-decoded output": unquote_plus(text)}
    blobs = []
    for run in _BASE64_LIKE.findall(text):
        for offset in range(4):  # the run may start mid-quantum when it was cut out of a longer blob
            chunk = run[offset:]
            chunk = chunk[: len(chunk) - len(chunk) % 4]
            with contextlib.suppress(ValueError):
                blobs.append(base64.b64decode(chunk.replace("-", "+").replace("_", "/")))
    views["decoded base64"] = b"\n".join(blobs).decode("utf-8", "replace")
    views["decoded hex"] = b"\n".join(bytes.fromhex(run) for run in _HEX_LIKE.findall(text)).decode("utf-8", "replace")
    return views


def leaks(text: str) -> list[str]:
    """Names (never values) of the canaries found in ``text``, in any encoding or decoded form."""
    found = [
        f"{name} ({encoding})"
        for name, value in CANARIES.items()
        for encoding, encoded in _encodings(value).items()
        if encoded in text
    ]
    for view, decoded in _decoded_views(text).items():
        found += [f"{name} (in {view})" for name, value in CANARIES.items() if value in decoded]
        found += [f"{name} (in {view})" for name, fragment in FRAGMENTS.items() if fragment in decoded]
    return sorted(set(found))


# --- Emitting everything ---------------------------------------------------------------------------------------------


def _raise_provider_error() -> None:
    """Fail the way a driver might: messages full of data, chained to a lower-level error."""
    try:
        raise ConnectionError(f"refresh failed for {EMAIL} with {REFRESH_TOKEN}")
    except ConnectionError as low:
        raise RuntimeError(f"{SUBJECT} / {PASSWORD} / {ACCESS_TOKEN} / {JWT} / {HEX_SECRET} / {B64_SECRET}") from low


def _captured_error() -> RuntimeError:
    try:
        _raise_provider_error()
    except RuntimeError as exc:
        return exc
    raise AssertionError("unreachable")


def _emit_ours() -> int:
    """Log the canaries through the broker's own logger in every way a call site could; return the record count."""
    log = get_logger("mailbroker.test")
    # Message arguments. A subject formatted into a message cannot be recognised by shape, so it is not logged this
    # way (that is what the allow-list is for); it goes through extra and exception messages below.
    log.info("token refresh for %s: access=%s refresh=%s", EMAIL, ACCESS_TOKEN, REFRESH_TOKEN)
    log.debug("assertion %s digest %s key %s", JWT, HEX_SECRET, B64_SECRET)
    form = {"grant_type": "refresh_token", "refresh_token": REFRESH_TOKEN, "client_secret": B64_SECRET}
    log.info("form body %s", urlencode({**form, "login_hint": EMAIL, "password": PASSWORD}))
    body = {"access_token": ACCESS_TOKEN, "id_token": JWT, "subject": SUBJECT, "password": PASSWORD}
    log.info("provider replied %s", json.dumps(body))
    log.info("named %(who)s", {"who": EMAIL})
    # extra: fields off the allow-list, then on it with token-shaped values.
    secrets_off_list = {"password": PASSWORD, "subject": SUBJECT, "to": EMAIL, "token": ACCESS_TOKEN}
    log.info("extras", extra={**secrets_off_list, "headers": {"Authorization": f"Bearer {ACCESS_TOKEN}"}})
    on_list = {"reason": EMAIL, "caller": ACCESS_TOKEN, "path": REFRESH_TOKEN, "event": JWT, "component": HEX_SECRET}
    log.info("allow-listed", extra={**on_list, "provider": B64_SECRET, "account": ACCOUNT_ID})
    # Exceptions: attached, passed as an argument, passed as the message.
    try:
        _raise_provider_error()
    except RuntimeError as exc:
        log.exception("provider call failed", extra={"account": ACCOUNT_ID})
        log.error("provider call failed: %s (%r)", exc, exc)
        log.warning(exc)
    log.error("failed later", exc_info=_captured_error())
    return 11


def _emit_libraries() -> int:
    """Log the canaries the way the libraries the broker runs do, at DEBUG; return the record count."""
    query = urlencode({"grant_type": "refresh_token", "refresh_token": REFRESH_TOKEN, "login_hint": EMAIL})
    logging.getLogger("urllib3.connectionpool").debug(
        '%s://%s:%s "%s %s %s" %s %s',
        "https",
        "oauth2.googleapis.com",
        443,
        "POST",
        f"/token?{query}",
        "HTTP/1.1",
        200,
        9,
    )
    token_response = {"access_token": JWT, "refresh_token": B64_SECRET, "id_token_claims": {"upn": EMAIL}}
    logging.getLogger("msal.application").debug("Token response: %s", token_response)
    search = quote(f"from:{EMAIL}", safe="")
    logging.getLogger("googleapiclient.discovery").debug(
        "URL being requested: GET %s", f"https://gmail.googleapis.com/gmail/v1/users/{quote(EMAIL)}/messages?q={search}"
    )
    logging.getLogger("google.auth.transport.requests").debug(
        "Making request: %s %s %s",
        "POST",
        "https://oauth2.googleapis.com/token",
        {"authorization": f"Bearer {ACCESS_TOKEN}"},
    )
    imap = logging.getLogger("imapclient.imapclient")
    imap.debug("> b'%s'", f'KFLB1 LOGIN {EMAIL} "{PASSWORD}"')
    xoauth2 = base64.b64encode(f"user={EMAIL}\x01auth=Bearer {ACCESS_TOKEN}\x01\x01".encode()).decode()
    imap.debug("> b'KFLB2 AUTHENTICATE XOAUTH2 %s'", xoauth2)
    imap.debug("> b'%s'", xoauth2)
    plain = base64.b64encode(f"\0{EMAIL}\0{PASSWORD}".encode()).decode()
    imap.debug("> b'%s'", plain)
    # At WARNING: grpc's Cython layer is held there even at DEBUG (see LOCK_HOLDING_LOGGERS).
    logging.getLogger("grpc._cython.cygrpc").warning("metadata %s", [("authorization", f"Bearer {JWT}")])
    logging.getLogger("grpc._cython.cygrpc").error("Unexpected error in servicer", exc_info=_captured_error())
    return 10


THIRD_PARTY_NAMES = (
    "urllib3.connectionpool",
    "msal.application",
    "googleapiclient.discovery",
    "google.auth.transport.requests",
    "imapclient.imapclient",
    "grpc._cython.cygrpc",
)


# --- Fixtures and helpers --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state; put it back so tests (and pytest) are unaffected."""
    manager = logging.Logger.manager
    root = logging.getLogger()
    loggers = {name: item for name, item in manager.loggerDict.items() if isinstance(item, logging.Logger)}
    saved = {name: (lg.level, lg.propagate, list(lg.handlers), lg.disabled) for name, lg in loggers.items()}
    handlers = {handler for lg in loggers.values() for handler in lg.handlers}
    saved_filters = {handler: list(handler.filters) for handler in handlers}
    saved_root_level = root.level
    saved_last_resort = logging.lastResort
    saved_imap_debug = imaplib.Debug  # type: ignore[attr-defined]
    saved_http_debug = http.client.HTTPConnection.debuglevel
    yield
    logging.captureWarnings(False)
    for handler in list(root.handlers):
        if isinstance(handler, BrokerStreamHandler | BrokerFileHandler):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(saved_root_level)
    for name, item in list(manager.loggerDict.items()):
        if not isinstance(item, logging.Logger):
            continue
        level, propagate, logger_handlers, disabled = saved.get(name, (logging.NOTSET, True, [], False))
        item.setLevel(level)
        item.propagate, item.handlers, item.disabled = propagate, list(logger_handlers), disabled
    for handler, filters in saved_filters.items():
        handler.filters = filters
    if logging.lastResort is not saved_last_resort and logging.lastResort is not None:
        logging.lastResort.close()
    logging.lastResort = saved_last_resort
    imaplib.Debug = saved_imap_debug  # type: ignore[attr-defined]
    http.client.HTTPConnection.debuglevel = saved_http_debug


def _configure(tmp_path: Path, level: str = "DEBUG") -> tuple[io.StringIO, Path]:
    stream = io.StringIO()
    log_file = tmp_path / "broker.log"
    configure_logging(level, stream=stream, file=log_file)
    return stream, log_file


def _records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def _flush() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()


# --- The promise -----------------------------------------------------------------------------------------------------


def test_no_canary_reaches_stream_file_or_stdio_at_debug(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    stream, log_file = _configure(tmp_path, "DEBUG")

    expected = _emit_ours() + _emit_libraries()
    _flush()

    out, err = capfd.readouterr()
    for name, text in (("stream", stream.getvalue()), ("file", log_file.read_text()), ("stdout+stderr", out + err)):
        found = leaks(text)
        assert not found, f"canaries leaked to {name}: {found}"
    # The same lines went to both places, and every record made it (nothing was dropped to be safe).
    same = stream.getvalue() == log_file.read_text()
    assert same, "stream and file differ"
    records = _records(stream.getvalue())
    assert len(records) == expected
    assert set(THIRD_PARTY_NAMES) <= {record["logger"] for record in records}
    masked = all(any(marker in record["msg"] for record in records) for marker in ("[EMAIL]", "[REDACTED]"))
    assert masked, "no masking markers in the output"


def test_every_line_is_json_with_known_keys_only(tmp_path: Path) -> None:
    stream, _ = _configure(tmp_path, "DEBUG")

    _emit_ours()
    _emit_libraries()

    allowed = {"ts", "level", "logger", "msg", "exc"} | ALLOWED_FIELDS
    lines = stream.getvalue().splitlines()
    assert lines
    for line in lines:
        record = json.loads(line)
        keys = set(record) if isinstance(record, dict) else set()
        assert keys <= allowed, f"unexpected keys {sorted(keys - allowed)}"
        assert {"ts", "level", "logger", "msg"} <= keys
        ts = str(record["ts"])
        assert ts.endswith("Z") and ts[10] == "T" and len(ts) == 24, "ts is not RFC 3339 UTC with milliseconds"


def test_allow_listed_field_appears_and_other_extra_is_dropped(tmp_path: Path) -> None:
    stream, _ = _configure(tmp_path, "INFO")

    extra = {"account": ACCOUNT_ID, "duration_ms": 12.5, "status": "NOT_FOUND", "attempt": 2, "colour": "blue"}
    get_logger("mailbroker.test").info("call finished", extra=extra)

    (record,) = _records(stream.getvalue())
    assert record["account"] == ACCOUNT_ID
    assert record["duration_ms"] == 12.5
    assert record["status"] == "NOT_FOUND"
    assert record["attempt"] == 2
    assert "colour" not in record
    assert "blue" not in stream.getvalue()
    assert record["msg"] == "call finished"
    assert record["level"] == "INFO"
    assert record["logger"] == "mailbroker.test"


def test_traceback_names_types_and_frames_but_not_messages(tmp_path: Path) -> None:
    stream, _ = _configure(tmp_path, "INFO")

    try:
        _raise_provider_error()
    except RuntimeError:
        get_logger("mailbroker.test").exception("provider call failed")

    (record,) = _records(stream.getvalue())
    exc = record["exc"]
    found = leaks(exc)
    assert not found, f"exception messages leaked: {found}"
    # Types of the exception and its __cause__, the link between them, and the frame (file, line, function).
    needles = ("RuntimeError", "ConnectionError", "direct cause", "_raise_provider_error", "test_logging.py", ", line ")
    missing = [needle for needle in needles if needle not in exc]
    assert not missing, f"traceback lacks {missing}"


def test_exception_group_members_are_rendered_by_type() -> None:
    try:
        raise ExceptionGroup(SUBJECT, [ValueError(EMAIL), KeyError(PASSWORD)])
    except ExceptionGroup:
        record = logging.LogRecord("mailbroker.test", logging.ERROR, __file__, 1, "batch failed", None, sys.exc_info())

    exc = json.loads(JsonFormatter().format(record))["exc"]

    found = leaks(exc)
    assert not found, f"exception messages leaked: {found}"
    missing = [name for name in ("ExceptionGroup", "ValueError", "KeyError") if name not in exc]
    assert not missing, f"traceback lacks {missing}"


def test_filter_makes_a_plain_handler_safe(tmp_path: Path) -> None:
    """A handler with a stdlib Formatter, even one naming extra fields, prints nothing the filter did not mask."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s subject=%(subject)s password=%(password)s"))
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("mailbroker.test.plain")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False

    extra = {"subject": SUBJECT, "password": PASSWORD}
    logger.debug("refresh for %s with %s", EMAIL, REFRESH_TOKEN, extra=extra)
    try:
        _raise_provider_error()
    except RuntimeError:
        logger.exception("provider call failed", extra=extra)

    out = stream.getvalue()
    found = leaks(out)
    assert not found, f"canaries leaked through a plain formatter: {found}"
    # The address was masked (not dropped) and Formatter appended the safe traceback.
    missing = [needle for needle in ("[EMAIL]", "RuntimeError", "_raise_provider_error") if needle not in out]
    assert not missing, f"output lacks {missing}"


def test_filter_withholds_a_traceback_rendered_by_someone_else() -> None:
    try:
        _raise_provider_error()
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    logging.Formatter().format(record)  # caches the full traceback, messages included, in record.exc_text
    record.exc_info = None

    assert RedactingFilter().filter(record) is True

    found = leaks(logging.Formatter().format(record))
    assert not found, f"foreign traceback leaked: {found}"
    withheld = record.exc_text is not None and "withheld" in record.exc_text
    assert withheld, "exc_text was not replaced"


def test_filter_masks_and_keeps_a_record_whose_message_cannot_be_formatted() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError(EMAIL)

    bad_args = logging.LogRecord("x", logging.INFO, __file__, 1, "%d for " + EMAIL, ("not a number",), None)
    bad_msg = logging.LogRecord("x", logging.INFO, __file__, 1, Unprintable(), None, None)

    assert RedactingFilter().filter(bad_args) is True
    assert RedactingFilter().filter(bad_msg) is True

    found = leaks(bad_args.getMessage() + bad_msg.getMessage())
    assert not found, f"canaries leaked: {found}"
    assert bad_args.args is None
    kept = "[EMAIL]" in bad_args.getMessage() and "unprintable" in bad_msg.getMessage()
    assert kept, "records were not kept in masked form"


# --- configure_logging ---------------------------------------------------------------------------------------------


def test_configure_twice_replaces_handlers_instead_of_doubling(tmp_path: Path) -> None:
    logging.getLogger().addHandler(logging.StreamHandler(io.StringIO()))  # someone else's handler
    configure_logging("INFO", stream=io.StringIO(), file=tmp_path / "first.log")
    stream, _ = _configure(tmp_path, "INFO")

    get_logger("mailbroker.test").info("once")

    root = logging.getLogger()
    assert len(root.handlers) == 2
    for handler in root.handlers:
        assert isinstance(handler.formatter, JsonFormatter)
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    assert len(_records(stream.getvalue())) == 1


def test_log_file_is_owner_only_even_if_it_existed(tmp_path: Path) -> None:
    existing = tmp_path / "existing.log"
    existing.write_text("")
    existing.chmod(0o644)

    configure_logging("INFO", stream=io.StringIO(), file=existing)
    configure_logging("INFO", stream=io.StringIO(), file=tmp_path / "new.log")

    assert stat.S_IMODE(existing.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "new.log").stat().st_mode) == 0o600


def test_log_file_permissions_do_not_depend_on_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        configure_logging("INFO", stream=io.StringIO(), file=tmp_path / "umask.log")
    finally:
        os.umask(previous)

    assert stat.S_IMODE((tmp_path / "umask.log").stat().st_mode) == 0o600


def test_log_file_symlink_and_bad_level_are_configuration_errors(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    link = tmp_path / "broker.log"
    link.symlink_to(target)

    with pytest.raises(ConfigurationError):
        configure_logging("INFO", stream=io.StringIO(), file=link)
    with pytest.raises(ConfigurationError):
        configure_logging("LOUD", stream=io.StringIO())


@pytest.mark.parametrize("name", ["urllib3.connectionpool", "msal.application", "sqlalchemy.engine.Engine"])
def test_libraries_are_capped_at_warning_unless_debug(tmp_path: Path, name: str) -> None:
    stream, _ = _configure(tmp_path, "INFO")
    library = logging.getLogger(name)

    library.debug("debug line")
    library.info("info line")
    library.warning("warning line")

    assert [record["msg"] for record in _records(stream.getvalue())] == ["warning line"]


def test_libraries_speak_at_debug_but_content_traces_never_do(tmp_path: Path) -> None:
    stream, _ = _configure(tmp_path, "DEBUG")

    logging.getLogger("urllib3.connectionpool").debug("library debug line")
    logging.getLogger("imapclient.imaplib").debug("< * 1 FETCH (BODY[] {120} ...)")
    logging.getLogger("mail.log").info("('127.0.0.1', 5) >> b'DATA'")

    assert [record["msg"] for record in _records(stream.getvalue())] == ["library debug line"]


def test_grpc_cython_debug_lines_stay_off_at_debug(tmp_path: Path) -> None:
    # They are logged under gRPC's global aio lock: a handler's lock held meanwhile by a thread whose garbage
    # collection finalises a grpc object deadlocks the process (see LOCK_HOLDING_LOGGERS).
    _configure(tmp_path, "DEBUG")

    assert logging.getLogger("grpc").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("grpc._cython.cygrpc").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("grpc._cython.cygrpc").isEnabledFor(logging.WARNING)


def test_library_handlers_are_removed_and_records_propagate(tmp_path: Path) -> None:
    sqlalchemy_engine = logging.getLogger("sqlalchemy.engine.Engine")  # what echo=True sets up
    sqlalchemy_engine.addHandler(logging.StreamHandler(sys.stdout))
    sqlalchemy_engine.setLevel(logging.INFO)
    sqlalchemy_engine.propagate = False
    urllib3 = logging.getLogger("urllib3")
    urllib3.addHandler(logging.NullHandler())

    _configure(tmp_path, "INFO")

    for logger in (sqlalchemy_engine, urllib3):
        assert logger.handlers == []
        assert logger.propagate is True
    assert sqlalchemy_engine.level == logging.NOTSET


def test_existing_handlers_elsewhere_get_the_filter(tmp_path: Path) -> None:
    stream = io.StringIO()
    other = logging.getLogger("some.other.component")
    other.addHandler(logging.StreamHandler(stream))
    other.propagate = False

    _configure(tmp_path, "INFO")
    other.warning("user %s", EMAIL)

    found = leaks(stream.getvalue())
    assert not found, f"canaries leaked through a pre-existing handler: {found}"
    masked = "[EMAIL]" in stream.getvalue()
    assert masked, "the record did not reach the pre-existing handler"


def test_last_resort_is_filtered_and_nothing_reaches_stderr(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    stream, _ = _configure(tmp_path, "INFO")
    orphan = logging.getLogger("mailbroker.orphan")  # no handlers, does not propagate: lastResort's case
    orphan.propagate = False

    orphan.warning("orphan %s %s", EMAIL, ACCESS_TOKEN)

    out, err = capfd.readouterr()  # read first: a failure report would otherwise replay captured stderr
    found = leaks(stream.getvalue() + out + err)
    assert not found, f"canaries leaked via lastResort: {found}"
    assert isinstance(logging.lastResort, BrokerStreamHandler)
    assert [record["logger"] for record in _records(stream.getvalue())] == ["mailbroker.orphan"]


def test_imaplib_debug_printing_is_switched_off(tmp_path: Path) -> None:
    imaplib.Debug = 4  # type: ignore[attr-defined]
    http.client.HTTPConnection.debuglevel = 1

    _configure(tmp_path, "DEBUG")

    assert imaplib.Debug == 0  # type: ignore[attr-defined]
    assert http.client.HTTPConnection.debuglevel == 0


def test_warnings_go_through_the_same_handlers(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    stream, _ = _configure(tmp_path, "INFO")

    # Not a canary: if capture broke, pytest's own warning summary would print this text.
    address = "not.a.canary@example.test"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"could not reach {address}", UserWarning, stacklevel=1)

    out, err = capfd.readouterr()
    survived = "not.a.canary" in stream.getvalue() + out + err
    assert not survived, "the address in a warning reached output"
    records = _records(stream.getvalue())
    assert [record["logger"] for record in records] == ["py.warnings"]
    masked = "[EMAIL]" in records[0]["msg"]
    assert masked, "the warning was not logged in masked form"


def test_a_failing_handler_reports_without_record_content(capfd: pytest.CaptureFixture[str]) -> None:
    class BrokenStream(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(f"disk full while writing {EMAIL}")

    configure_logging("INFO", stream=BrokenStream())
    get_logger("mailbroker.test").error("could not send for %s", EMAIL)

    out, err = capfd.readouterr()
    found = leaks(out + err)
    assert not found, f"canaries leaked from handleError: {found}"
    reported = "could not be written" in err
    assert reported, "the handler failure was not reported"


# --- redact() ------------------------------------------------------------------------------------------------------

SHAPES = [
    ("address", f"sending for {EMAIL} now", "canary.person", "[EMAIL]"),
    ("address url-encoded", f"login_hint={quote(EMAIL, safe='')}&prompt=none", "canary.person", "[EMAIL]"),
    ("address double-encoded", "hint=canary.person%2540example.test", "canary.person", "[EMAIL]"),
    ("quoted local part", 'to "canary person"@example.test', "canary person", "[EMAIL]"),
    ("display name", '"Canary Person" <canary.person@example.test>', "Canary Person", "[EMAIL]"),
    ("address in a repr", f"{{'to': '{EMAIL}'}}", "canary.person", "[EMAIL]"),
    ("bearer", f"Bearer {ACCESS_TOKEN}", "Cnry7Qx2Lm9Vt4Wk8Pz1Rs5Hj3Ng6Bd0Fc", "[REDACTED]"),
    ("basic", "Authorization Basic Y25yeTpodW50ZXIy", "Y25yeTpodW50ZXIy", "[REDACTED]"),
    ("authorization header", "Authorization: MSAuth1.0 actor=cnry-secret-actor", "cnry-secret-actor", "[REDACTED]"),
    ("header dict", "{'authorization': 'Bearer cnryshort'}", "cnryshort", "[REDACTED]"),
    ("google access token", f"using {ACCESS_TOKEN}", "Cnry7Qx2Lm9Vt4Wk8Pz1Rs5Hj3Ng6Bd0Fc", "[REDACTED]"),
    ("google refresh token", f"using {REFRESH_TOKEN}", "Rfrsh-Tk9", "[REDACTED]"),
    ("refresh token url-encoded", f"using {quote(REFRESH_TOKEN, safe='')}", "Rfrsh-Tk9", "[REDACTED]"),
    ("google auth code", "code 4/0AfJohXcnryAuthCode0123456789abc", "cnryAuthCode", "[REDACTED]"),
    ("jwt", f"assertion {JWT}", JWT.split(".")[1], "[REDACTED]"),
    ("query access_token", "https://x.test/cb?access_token=cnryAT&state=1", "cnryAT", "[REDACTED]"),
    ("query refresh_token", "grant_type=refresh_token&refresh_token=cnryRT", "cnryRT", "[REDACTED]"),
    ("query code", "/callback?code=cnryCode&state=abc", "cnryCode", "[REDACTED]"),
    ("form password", "username=u&password=cnry%21pw&x=1", "cnry%21pw", "[REDACTED]"),
    ("form client_secret", "client_id=x&client_secret=cnrySecret", "cnrySecret", "[REDACTED]"),
    ("form code_verifier", "code_verifier=cnryVerifier&code=x", "cnryVerifier", "[REDACTED]"),
    ("form assertion", "client_assertion_type=jwt&assertion=cnryAssert", "cnryAssert", "[REDACTED]"),
    ("url-encoded pair", "state=x%26refresh_token%3Dcnry9RT%26y", "cnry9RT", "[REDACTED]"),
    ("json refresh_token", '{"refresh_token": "cnry json token", "expires_in": 3599}', "cnry json", "[REDACTED]"),
    ("json password", '{"password":"cnry pw with spaces"}', "cnry pw", "[REDACTED]"),
    ("escaped json", '{\\"password\\": \\"cnry pw\\"}', "cnry pw", "[REDACTED]"),
    ("repr password", "{'password': 'cnry pw'}", "cnry pw", "[REDACTED]"),
    ("upper-case key", "PASSWORD=cnryUpper", "cnryUpper", "[REDACTED]"),
    ("yaml-ish pair", "client_secret: cnryYaml", "cnryYaml", "[REDACTED]"),
    ("gmail search", "GET /gmail/v1/users/me/messages?q=subject%3Acnry%20merger&alt=json", "merger", "[REDACTED]"),
    ("graph json subject", '{"subject": "cnry merger", "bodyPreview": "cnry body"}', "merger", "[REDACTED]"),
    ("imap login", "  12:34.56 > b'KFLB1 LOGIN canary \"cnry pw\"\\r\\n'", "cnry pw", "[REDACTED]"),
    ("imap authenticate", "> b'KFLB2 AUTHENTICATE PLAIN AGNucnkAY25yeXB3'", "AGNucnkAY25yeXB3", "[REDACTED]"),
    ("sasl continuation", "> b'AGNucnkAY25yeXB3'", "AGNucnkAY25yeXB3", "[REDACTED]"),
    ("smtp auth", "send: 'AUTH PLAIN AGNucnkAY25yeXB3\\r\\n'", "AGNucnkAY25yeXB3", "[REDACTED]"),
    ("hex run", f"digest {HEX_SECRET}", HEX_SECRET[:16], "[REDACTED]"),
    ("base64 run", f"key={B64_SECRET}", B64_SECRET[:16], "[REDACTED]"),
    (
        "base64url run",
        f"key {_b64url(hashlib.sha256(b'x').digest())}",
        _b64url(hashlib.sha256(b"x").digest()),
        "[REDACTED]",
    ),
]


SHAPES_BY_NAME = {name: (text, secret, marker) for name, text, secret, marker in SHAPES}


# Parametrised by name: pytest prints a failing test's parameters, and these hold canaries.
@pytest.mark.parametrize("shape", list(SHAPES_BY_NAME))
def test_redact_masks_each_shape(shape: str) -> None:
    text, secret, marker = SHAPES_BY_NAME[shape]

    masked = redact(text)

    # Booleans, so that a failure report cannot print the secret.
    survived, marked = secret in masked, marker in masked
    assert not survived, "secret survived redaction"
    assert marked, "no marker in the redacted text"


BENIGN = [
    "/mailbroker.v1.AccountService/GetAccount",
    "/mailbroker.v1.MailService/StreamMailboxChangesForAccountV2",
    f"account {ACCOUNT_ID} status=NOT_FOUND duration_ms=12.5",
    "status OK, DEADLINE_EXCEEDED, PERMISSION_DENIED, UNAVAILABLE after 3 attempts in 1042.7 ms",
    "caller spiffe://corp/billing method /mailbroker.v1.MailService/SendMessage",
    "request 3f2a1b4c-5d6e-7f80-91a2-b3c4d5e6f708 finished",
    '  File "/work/main/.venv/lib/python3.11/site-packages/google/auth/transport/requests.py", line 12, in request',
    "test_exception_traceback_shows_type_and_function_name",
    "CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=LOGIN LOGINDISABLED IDLE",
    "listening on port 50051 with kek_version 3",
]


@pytest.mark.parametrize("text", BENIGN)
def test_redact_leaves_metadata_alone(text: str) -> None:
    assert redact(text) == text


def test_redact_masks_random_keys_with_a_negligible_miss_rate() -> None:
    # Deterministic stand-ins for random 32-byte keys.
    keys = [base64.b64encode(hashlib.sha256(f"key {n}".encode()).digest()).decode() for n in range(5000)]

    missed = sum(1 for key in keys if key[:-1] in redact(f"k {key} x"))

    assert missed <= 5  # at most 0.1 %; the heuristic's design rate is well under 0.01 %


def test_redact_never_raises() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert redact(Unprintable()) == "[REDACTED]"  # type: ignore[arg-type]
    assert redact("") == ""
    assert redact("\ud800 lone surrogate \x00 nul") == "\ud800 lone surrogate \x00 nul"


def test_redact_keeps_surrounding_text() -> None:
    kept = (
        redact(f"to={EMAIL}&from=x") == "to=[EMAIL]&from=x"
        and redact(f"token refresh for {EMAIL}: ok") == "token refresh for [EMAIL]: ok"
    )
    assert kept, "text around the address changed"
