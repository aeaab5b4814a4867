"""Partial responses: the ``fields`` system parameter (``messages(id,threadId),nextPageToken``, ``payload/headers``),
checked against the response schema as Google checks it (an unknown field is a 400, not an empty answer)."""

from __future__ import annotations

import re
from typing import Any

from tests.emulators.google import errors
from tests.emulators.google.discovery import gmail_discovery

Selection = dict[str, Any]  # name -> sub-selection, or None for the whole value

_TOKEN = re.compile(r"\s*([A-Za-z0-9_*]+|[/,()])")


def parse(text: str) -> Selection:
    tokens = [m.group(1) for m in _TOKEN.finditer(text)]
    if "".join(tokens) != re.sub(r"\s+", "", text) or not tokens:
        raise errors.bad_request(f"Invalid field selection {text}", location="fields")
    selection, rest = _parse_list(tokens, text)
    if rest:
        raise errors.bad_request(f"Invalid field selection {text}", location="fields")
    return selection


def _parse_list(tokens: list[str], text: str) -> tuple[Selection, list[str]]:
    tree: Selection = {}
    while True:
        path = [_name(tokens, text)]
        tokens = tokens[1:]
        while tokens[:1] == ["/"]:
            path.append(_name(tokens[1:], text))
            tokens = tokens[2:]
        sub = None
        if tokens[:1] == ["("]:
            sub, tokens = _parse_list(tokens[1:], text)
            if tokens[:1] != [")"]:
                raise errors.bad_request(f"Invalid field selection {text}", location="fields")
            tokens = tokens[1:]
        _insert(tree, path, sub)
        if tokens[:1] != [","]:
            return tree, tokens
        tokens = tokens[1:]


def _name(tokens: list[str], text: str) -> str:
    if not tokens or not re.fullmatch(r"[A-Za-z0-9_*]+", tokens[0]):
        raise errors.bad_request(f"Invalid field selection {text}", location="fields")
    return tokens[0]


def _insert(tree: Selection, path: list[str], sub: Selection | None) -> None:
    for name in path[:-1]:
        if name in tree and tree[name] is None:
            return  # already selected whole
        tree = tree.setdefault(name, {})
    last = path[-1]
    if sub is None or tree.get(last, {}) is None:
        tree[last] = None
    else:
        tree.setdefault(last, {}).update(sub)


def check(selection: Selection | None, schema: dict[str, Any]) -> None:
    """Raise 400 if the selection names a field the schema does not have."""
    schemas = gmail_discovery()["schemas"]
    while "$ref" in schema or schema.get("type") == "array":
        schema = schemas[schema["$ref"]] if "$ref" in schema else schema.get("items", {})
    if selection is None:
        return
    properties = schema.get("properties", {})
    for name, sub in selection.items():
        if name == "*":
            continue
        if name not in properties:
            raise errors.bad_request(f"Invalid field selection {name}", location="fields")
        check(sub, properties[name])


def apply(value: Any, selection: Selection | None) -> Any:
    if selection is None:
        return value
    if isinstance(value, list):
        return [apply(item, selection) for item in value]
    if not isinstance(value, dict):
        return value
    if "*" in selection:
        return {key: apply(item, selection.get(key)) for key, item in value.items()}
    return {key: apply(value[key], sub) for key, sub in selection.items() if key in value}
