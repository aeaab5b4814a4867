"""Gmail batch requests (multipart/mixed of application/http parts, at most 100 calls), at ``/batch/gmail/v1``
(the documented endpoint) and ``/batch`` (where googleapiclient's ``new_batch_http_request`` posts). Each inner call
goes through the same Gmail dispatcher, with its own Authorization header, faults and counters."""

from __future__ import annotations

import secrets
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from tests.emulators.google import errors, gmail, payload
from tests.emulators.google.state import GoogleState
from tests.emulators.google.wire import Request, Response

MAX_CALLS = 100


def dispatch(state: GoogleState, request: Request) -> Response:
    with state.lock:
        state.counters["batch"] += 1
    content_type = request.header("content-type") or ""
    if request.method != "POST" or not content_type.lower().startswith("multipart/mixed"):
        error = errors.bad_request("A batch request is a POST of multipart/mixed")
        return Response.json(400, error.body())
    container = payload.parse(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + request.body)
    parts = container.get_payload()
    if not isinstance(parts, list) or not parts:
        return Response.json(400, errors.bad_request("Empty batch").body())
    if len(parts) > MAX_CALLS:
        return Response.json(400, errors.bad_request(f"Too many requests in a batch (at most {MAX_CALLS})").body())
    boundary = "batch_" + secrets.token_hex(12)
    out = []
    for part in parts:
        inner = _inner_request(part.get_payload(decode=True) or b"")
        response = gmail.dispatch(state, inner) if inner else Response.json(400, errors.bad_request("Bad part").body())
        content_id = str(part.get("Content-ID", "")).strip()
        reply_id = f"<response-{content_id[1:]}" if content_id.startswith("<") else f"response-{content_id}"
        status_line = f"HTTP/1.1 {response.status} {HTTPStatus(response.status).phrase}\r\n"
        headers = "".join(f"{name}: {value}\r\n" for name, value in response.headers.items())
        out.append(
            f"--{boundary}\r\nContent-Type: application/http\r\nContent-ID: {reply_id}\r\n\r\n".encode()
            + f"{status_line}{headers}Content-Length: {len(response.body)}\r\n\r\n".encode()
            + response.body
            + b"\r\n"
        )
    body = b"".join(out) + f"--{boundary}--\r\n".encode()
    return Response(200, body, {"Content-Type": f"multipart/mixed; boundary={boundary}"})


def _inner_request(data: bytes) -> Request | None:
    head, _, body = data.replace(b"\r\n", b"\n").partition(b"\n\n")
    lines = head.decode("utf-8", "replace").split("\n")
    try:
        method, target, _version = lines[0].split(" ", 2)
    except ValueError:
        return None
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    split = urlsplit(target)
    return Request(method, split.path, parse_qs(split.query, keep_blank_values=True), headers, body)
