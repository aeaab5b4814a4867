"""Reload the policy when its config file changes on disk, the same way SIGHUP does.

A poll, no new dependency: every ``[policy] watch_interval_seconds`` the file is ``stat``-ed, and read and hashed
when its identity, size or times moved (or when they were taken too close to its last write to rule out a second
write in the same clock tick, the "racily clean" case of git's index). New content is acted on once it has stayed
the same from one poll to the next, so a file caught half-written is not loaded (unless its writer stalls for a
whole interval); then ``on_change`` runs (it reloads and logs ``policy_reloaded`` or ``policy_reload_refused``,
keeping the policy in force). The same content again (a ``touch``, an editor rewriting unchanged bytes, a broken
file left as it is) does nothing, so a refused file is logged once, not at every poll. A file missing or unreadable
for a moment (an editor or a config-map update replacing it) is looked at again at the next poll. The path is
followed through symlinks, so a swapped link target counts as a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("mailbroker.policy")

# A stat taken less than this after the file's last modification may share its clock tick with a later write
# (coarse file system timestamps included): the content is hashed again until a stat is taken later than that.
RACY_NANOSECONDS = 2_000_000_000
_Stat = tuple[int, int, int, int, int]  # device, inode, size, mtime_ns, ctime_ns


class PolicyFileWatch:
    """Polls ``path``; :meth:`start` runs the poll on the event loop every ``interval`` seconds until :meth:`stop`.

    Construct it before the file is loaded: the content seen then is the baseline, so a change made between the
    load and the first poll is still noticed (at worst the same content is reloaded once).
    """

    def __init__(self, path: Path, on_change: Callable[[], None]) -> None:
        self._path = path
        self._on_change = on_change
        self._looked_at = time.time_ns()  # when ``_stat`` was taken
        self._stat = self._stat_now()
        self._seen = self._digest_now()  # the content at the last look
        self._digest = self._seen  # the content last acted on (at start: the one loaded)
        self._task: asyncio.Task[None] | None = None

    def _stat_now(self) -> _Stat | None:
        try:
            s = os.stat(self._path)
        except OSError:
            return None
        return (s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)

    def _digest_now(self) -> bytes | None:
        try:
            return hashlib.sha256(self._path.read_bytes()).digest()
        except OSError:
            return None

    def _racy(self) -> bool:
        return self._stat is not None and self._stat[3] + RACY_NANOSECONDS >= self._looked_at

    def poll(self) -> bool:
        """Look at the file once. True when its content differs from the content last acted on and is the same as
        at the previous look (then it is the content acted on)."""
        now = time.time_ns()
        stat = self._stat_now()
        if stat is None:
            return False
        if stat != self._stat or self._racy():
            digest = self._digest_now()
            if digest is None:
                return False
            self._stat, self._looked_at = stat, now
            if digest != self._seen:
                self._seen = digest  # changed since the last look: acted on once it stays put
                return False
        if self._seen == self._digest:
            return False
        self._digest = self._seen
        return True

    async def _run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                changed = await asyncio.to_thread(self.poll)
            except Exception:  # never end the watch: the next poll may do better
                log.warning("policy file watch: the poll failed", exc_info=True, extra={"event": "policy_watch_failed"})
                continue
            if changed:
                log.info("config file changed on disk: reloading the policy", extra={"event": "policy_file_changed"})
                try:
                    self._on_change()
                except Exception:
                    log.error("policy reload failed", exc_info=True, extra={"event": "policy_watch_failed"})

    def start(self, interval: float) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(interval), name="policy-file-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
