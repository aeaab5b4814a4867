"""Writes messages straight into a Dovecot Maildir, the fast way to fill a folder with many thousand messages.

Dovecot finds the files when a client next opens the folder and gives them UIDs in file-name order, which here is
the order they were written in. File names carry ``S=`` (size) and ``W=`` (size with CRLF line ends) so that Dovecot
need not read each file to learn them. See https://doc.dovecot.org/admin_manual/mailbox_formats/maildir/.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# IMAP system flags and their Maildir info letters, which must be written in ASCII order.
_FLAG_LETTERS = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}


@dataclass(frozen=True)
class MaildirMessage:
    """One message to write: its raw bytes, IMAP system flags and internal date (the file's mtime)."""

    raw: bytes
    flags: tuple[str, ...] = ()
    internal_date: datetime | None = None


MessageFactory = Callable[[int], bytes | MaildirMessage]
"""Makes message number i (0-based) of a bulk fill: raw bytes, or a MaildirMessage for flags and dates."""


def folder_path(maildir: Path, folder: str) -> Path:
    """Return the directory of ``folder`` in a Maildir++ layout (Dovecot's default: ``.Sub.Folder`` for Sub.Folder)."""
    if folder.upper() == "INBOX":
        return maildir
    if not folder or folder.startswith(".") or "/" in folder or folder in {".", ".."}:
        raise ValueError(f"unsupported folder name {folder!r} for a Maildir++ layout")
    return maildir / f".{folder}"


def ensure_folder(path: Path, uid: int, gid: int, *, is_inbox: bool) -> None:
    """Create a Maildir folder (cur, new, tmp; ``maildirfolder`` marks a subfolder) owned by ``uid``:``gid``."""
    for directory in (path.parent, path, path / "cur", path / "new", path / "tmp"):
        if not directory.exists():
            directory.mkdir(mode=0o700)
            os.chown(directory, uid, gid)
    if not is_inbox and not (path / "maildirfolder").exists():
        marker = path / "maildirfolder"
        marker.touch(mode=0o600)
        os.chown(marker, uid, gid)


def write_messages(
    path: Path, count: int, factory: MessageFactory, uid: int, gid: int, *, start: float | None = None
) -> None:
    """Write ``count`` messages made by ``factory`` into the ``cur`` directory of the Maildir folder at ``path``."""
    cur = path / "cur"
    base = int(start if start is not None else time.time())
    pid = os.getpid()
    for index in range(count):
        made = factory(index)
        message = made if isinstance(made, MaildirMessage) else MaildirMessage(raw=made)
        raw = message.raw
        virtual_size = len(raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        # Dovecot orders new files by the seconds and then the M<microseconds> of their names: both rise with index.
        # The index ends the base name because Dovecot's hash of file names mixes poorly: names that differ only in
        # their middle collide so often that opening a folder of 100,000 such files takes minutes instead of seconds.
        name = (
            f"{base + index // 1_000_000}.M{index % 1_000_000}P{pid}.mailbroker-test-{index}"
            f",S={len(raw)},W={virtual_size}:2,{_info(message.flags)}"
        )
        fd = os.open(cur / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchown(fd, uid, gid)
            _write_all(fd, raw)
            if message.internal_date is not None:
                stamp = message.internal_date.timestamp()
                os.utime(fd, (stamp, stamp))
        finally:
            os.close(fd)


def _info(flags: Iterable[str]) -> str:
    letters = []
    for flag in flags:
        letter = _FLAG_LETTERS.get(flag)
        if letter is None:
            raise ValueError(f"bulk fill writes IMAP system flags only, not {flag!r}")
        letters.append(letter)
    return "".join(sorted(set(letters)))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
