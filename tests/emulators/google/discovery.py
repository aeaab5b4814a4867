"""The Gmail discovery document shipped in google-api-python-client: routes, scopes, and a schema validator.

The emulator routes Gmail requests by the same document the client library builds its URLs from, so a path the
library would not produce is a 404 here too, and every JSON body it answers with can be checked against the schema
the document names as the method's response.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import googleapiclient

GMAIL_DISCOVERY_PATH = Path(googleapiclient.__file__).parent / "discovery_cache" / "documents" / "gmail.v1.json"


@functools.cache
def gmail_discovery() -> dict[str, Any]:
    """The parsed Gmail v1 discovery document (cached; treat as read-only)."""
    return json.loads(GMAIL_DISCOVERY_PATH.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Method:
    """One REST method of the discovery document."""

    id: str
    http_method: str
    path: str
    pattern: re.Pattern[str]
    scopes: tuple[str, ...]
    parameters: dict[str, Any]
    response: str | None
    request: str | None
    upload_path: re.Pattern[str] | None


def _template_regex(template: str) -> re.Pattern[str]:
    """``gmail/v1/users/{userId}/messages/{id}`` -> a regex with one named group per path parameter."""
    out = ""
    for literal, name in re.findall(r"([^{]*)(?:\{\+?(\w+)\})?", template):
        out += re.escape(literal)
        if name:
            out += f"(?P<{name}>[^/]+)"
    return re.compile(f"/{out}")


def _walk_methods(resource: dict[str, Any]) -> list[dict[str, Any]]:
    found = list(resource.get("methods", {}).values())
    for child in resource.get("resources", {}).values():
        found.extend(_walk_methods(child))
    return found


@functools.cache
def gmail_methods() -> tuple[Method, ...]:
    """Every method of the Gmail document, with a regex for its path (relative to the root URL)."""
    doc = gmail_discovery()
    methods = []
    for raw in _walk_methods(doc):
        upload = raw.get("mediaUpload", {}).get("protocols", {}).get("simple", {}).get("path")
        methods.append(
            Method(
                id=raw["id"],
                http_method=raw["httpMethod"],
                path=raw["path"],
                pattern=_template_regex(doc["servicePath"] + raw["path"]),
                scopes=tuple(raw.get("scopes", ())),
                parameters=raw.get("parameters", {}),
                response=raw.get("response", {}).get("$ref"),
                request=raw.get("request", {}).get("$ref"),
                upload_path=_template_regex(upload.lstrip("/")) if upload else None,
            )
        )
    return tuple(methods)


def method_by_id(method_id: str) -> Method:
    for method in gmail_methods():
        if method.id == method_id:
            return method
    raise KeyError(method_id)


_INT64 = re.compile(r"-?(0|[1-9][0-9]*)")
_UINT64 = re.compile(r"0|[1-9][0-9]*")
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1)}


def validate(value: Any, schema: dict[str, Any], path: str = "$", schemas: dict[str, Any] | None = None) -> list[str]:
    """Check ``value`` against a discovery-document schema; return the problems found (empty when it conforms).

    Covers what Gmail's schemas use: ``$ref``, ``type`` (object, array, string, integer, number, boolean, any),
    ``properties`` (a property the schema does not name is a problem), ``additionalProperties``, ``items``,
    ``enum``, and the JSON encodings of ``format``: int64/uint64 as decimal strings, int32/uint32 as numbers in
    range, byte as base64 (URL-safe or standard alphabet).
    """
    schemas = gmail_discovery()["schemas"] if schemas is None else schemas
    if "$ref" in schema:
        return validate(value, schemas[schema["$ref"]], path, schemas)
    problems: list[str] = []
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {type(value).__name__}"]
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in properties:
                problems += validate(item, properties[key], f"{path}.{key}", schemas)
            elif extra is not None:
                problems += validate(item, extra, f"{path}[{key!r}]", schemas)
            else:
                problems.append(f"{path}: unknown property {key!r}")
    elif kind == "array":
        if not isinstance(value, list):
            return [f"{path}: expected an array, got {type(value).__name__}"]
        for index, item in enumerate(value):
            problems += validate(item, schema.get("items", {}), f"{path}[{index}]", schemas)
    elif kind == "string":
        problems += _validate_string(value, schema, path)
    elif kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{path}: expected an integer, got {type(value).__name__}"]
        low, high = _INT_RANGES.get(schema.get("format", ""), (None, None))
        if low is not None and high is not None and not low <= value <= high:
            problems.append(f"{path}: {value} out of range for {schema['format']}")
    elif kind == "number":
        if not isinstance(value, int | float) or isinstance(value, bool):
            return [f"{path}: expected a number, got {type(value).__name__}"]
    elif kind == "boolean":
        if not isinstance(value, bool):
            return [f"{path}: expected a boolean, got {type(value).__name__}"]
    elif kind not in ("any", None):
        problems.append(f"{path}: schema type {kind!r} is not understood by this validator")
    return problems


def _validate_string(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    if not isinstance(value, str):
        return [f"{path}: expected a string, got {type(value).__name__}"]
    fmt = schema.get("format")
    if fmt == "int64" and not _INT64.fullmatch(value):
        return [f"{path}: {value!r} is not an int64 in decimal"]
    if fmt == "uint64" and not _UINT64.fullmatch(value):
        return [f"{path}: {value!r} is not a uint64 in decimal"]
    if fmt == "byte":
        try:
            base64.b64decode(value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4), validate=True)
        except (binascii.Error, ValueError):
            return [f"{path}: not base64"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} is not one of {schema['enum']}"]
    return []
