"""Render an exception as type names and stack frames only, never its message.

``str(exc)`` may hold anything: a provider's error text with the address in it, a SQL parameter, a header. So a
rendered traceback here keeps what comes from code (exception types; file, line and function of each frame) and
drops what may come from data (messages, ``__notes__``, source lines, locals). The ``__cause__``/``__context__``
chain and exception groups are followed the way the interpreter prints them, within fixed bounds.
"""

from __future__ import annotations

import sys
import traceback
from types import TracebackType
from typing import Final, TypeAlias

ExcInfo: TypeAlias = tuple[type[BaseException] | None, BaseException | None, TracebackType | None]

_MAX_CHAIN: Final = 8  # exceptions followed through __cause__/__context__
_MAX_GROUP: Final = 8  # sub-exceptions shown per exception group
_MAX_DEPTH: Final = 4  # nesting of exception groups
_MAX_FRAMES: Final = 40  # innermost frames kept per traceback (a RecursionError has ~1000)

_CAUSE: Final = "The above exception was the direct cause of the following exception:"
_CONTEXT: Final = "During handling of the above exception, another exception occurred:"


def type_name(exc_type: type[BaseException]) -> str:
    """``ValueError`` for builtins, ``package.module.Name`` otherwise."""
    module = exc_type.__module__
    name = exc_type.__qualname__
    return name if module in ("builtins", "__main__") else f"{module}.{name}"


def short_path(filename: str) -> str:
    """A code file's path relative to the import root it was loaded from (``server/app.py``,
    ``grpc/aio/_server.py``): shorter to read, and free of install directories whose random-looking names the
    redactor would rightly mask."""
    best = ""
    for root in sys.path:
        if root and filename.startswith(root.rstrip("/") + "/") and len(root) > len(best):
            best = root.rstrip("/") + "/"
    return filename[len(best) :] if best else filename


def _frames(tb: TracebackType | None) -> list[str]:
    frames = [
        f'  File "{short_path(frame.f_code.co_filename)}", line {lineno}, in {frame.f_code.co_qualname}'
        for frame, lineno in traceback.walk_tb(tb)
    ]
    if len(frames) > _MAX_FRAMES:
        omitted = len(frames) - _MAX_FRAMES
        frames = [f"  ... {omitted} outer frames omitted", *frames[-_MAX_FRAMES:]]
    return frames


def _chain(exc: BaseException) -> list[tuple[BaseException, str | None]]:
    """The exception and its predecessors, oldest first, each with the line that links it to its successor."""
    chain: list[tuple[BaseException, str | None]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link: str | None = None
    while current is not None and id(current) not in seen and len(chain) < _MAX_CHAIN:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current = None
    chain.reverse()
    return chain


def _render(exc: BaseException, tb: TracebackType | None, depth: int) -> list[str]:
    lines: list[str] = []
    for entry, link in _chain(exc):
        entry_tb = tb if entry is exc else entry.__traceback__
        if entry_tb is not None:
            lines.append("Traceback (most recent call last):")
            lines.extend(_frames(entry_tb))
        lines.append(type_name(type(entry)))
        if isinstance(entry, BaseExceptionGroup) and depth < _MAX_DEPTH:
            members = entry.exceptions
            for index, member in enumerate(members[:_MAX_GROUP], start=1):
                lines.append(f"  +---------------- {index} ----------------")
                lines.extend(f"  | {line}" for line in _render(member, member.__traceback__, depth + 1))
            if len(members) > _MAX_GROUP:
                lines.append(f"  +---------------- ... and {len(members) - _MAX_GROUP} more ----------------")
        if link is not None:
            lines.extend(("", link, ""))
    return lines


def format_exception(exc_info: ExcInfo) -> str | None:
    """Render ``exc_info`` (as from ``sys.exc_info()``) without any message; None when there is no exception."""
    exc_type, exc, tb = exc_info
    if exc is None:
        return type_name(exc_type) if exc_type is not None else None
    return "\n".join(_render(exc, tb, depth=0))
