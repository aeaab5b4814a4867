"""PolicyFileWatch.poll, one look at a time (no timing): new content is acted on once, after it stayed the same
from one look to the next; the same content, a touch, a missing file are not changes."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from server.policy_watch import PolicyFileWatch


def _watch(path: Path) -> tuple[PolicyFileWatch, list[int]]:
    calls: list[int] = []
    return PolicyFileWatch(path, lambda: calls.append(1)), calls


def test_new_content_is_acted_on_once_after_it_settled(tmp_path: Path) -> None:
    path = tmp_path / "mailbroker.toml"
    path.write_text("a = 1\n")
    watch, _ = _watch(path)
    assert [watch.poll() for _ in range(3)] == [False, False, False]
    path.write_text("a = 2\n")
    assert [watch.poll() for _ in range(3)] == [False, True, False]


def test_content_caught_changing_between_looks_waits_until_it_stays_put(tmp_path: Path) -> None:
    path = tmp_path / "mailbroker.toml"
    path.write_text("a = 1\n")
    watch, _ = _watch(path)
    path.write_text("")  # a look in the middle of an in-place write: truncated
    assert watch.poll() is False
    path.write_text("a = 22\n")  # the write completes
    assert [watch.poll() for _ in range(3)] == [False, True, False]


def test_a_touch_or_the_same_bytes_again_is_no_change(tmp_path: Path) -> None:
    path = tmp_path / "mailbroker.toml"
    path.write_text("a = 1\n")
    watch, _ = _watch(path)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    path.write_text("a = 1\n")
    assert [watch.poll() for _ in range(3)] == [False, False, False]


def test_a_file_replaced_by_rename_or_missing_for_a_while_is_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "mailbroker.toml"
    path.write_text("a = 1\n")
    watch, _ = _watch(path)
    path.unlink()
    assert [watch.poll() for _ in range(2)] == [False, False]
    staged = tmp_path / "staged.toml"
    staged.write_text("a = 3\n")
    staged.replace(path)
    assert [watch.poll() for _ in range(3)] == [False, True, False]
    # Back to content acted on before is a change too.
    path.write_text("a = 1\n")
    assert [watch.poll() for _ in range(3)] == [False, True, False]


async def test_the_running_watch_calls_back_and_stops(tmp_path: Path) -> None:
    path = tmp_path / "mailbroker.toml"
    path.write_text("a = 1\n")
    changed = asyncio.Event()
    watch = PolicyFileWatch(path, changed.set)
    watch.start(0.01)
    try:
        path.write_text("a = 2\n")
        await asyncio.wait_for(changed.wait(), timeout=30)  # generous: polled, not timed
    finally:
        await watch.stop()
