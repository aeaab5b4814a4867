"""Sampling profiles of the broker process with py-spy (``--profile``): where its time goes during a figure.

py-spy attaches to the running broker from outside (ptrace, no code change, ``--nonblocking`` so the broker is not
paused) and writes collapsed stacks of the threads that were not idle. This module keeps the raw file and summarises
it as the frames with the most samples on their own ("self": the frame was running) and the broker's own functions
(server/) with everything they called ("total"). Samples whose innermost frame is a wait py-spy does not recognise
as idle (the event loop's epoll, an executor thread waiting for work, gRPC's poller thread inside its C code) are
left out of both, so the shares are of the time the broker spent working.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.report import REPO

RATE = 250  # samples per second: enough detail for a few seconds, little overhead on a 2-core machine
# "raw" (collapsed stacks, summarised below); BENCH_PROFILE_FORMAT=chrometrace keeps each sample's time instead,
# to see what the broker did at one moment (a stall the probe found), in chrome://tracing or Perfetto.
FORMAT = os.environ.get("BENCH_PROFILE_FORMAT", "raw")
_THREAD = re.compile(r"^(?:thread|process) \(")
_WAITS = (
    "select (selectors.py",
    "_worker (concurrent/futures/thread.py",
    "Thread.run (threading.py",
    "wait (threading.py",
)
_WHERE = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass
class Profile:
    """A summary of one recording: samples, top frames by self and by total samples, samples per thread."""

    raw_path: str = ""
    samples: int = 0
    top_self: list[tuple[str, float]] = field(default_factory=list)
    top_total: list[tuple[str, float]] = field(default_factory=list)  # the broker's own frames only
    threads: list[tuple[str, float]] = field(default_factory=list)
    error: str = ""

    def lines(self, count: int = 10) -> list[str]:
        if self.error:
            return [f"profile failed: {self.error}"]
        out = [f"py-spy: {self.samples} samples of broker threads at work (raw stacks: {self.raw_path})"]
        out += [f"  self  {share:5.1%}  {frame}" for frame, share in self.top_self[:count]]
        out += [f"  total {share:5.1%}  {frame}" for frame, share in self.top_total[:count]]
        out += [f"  thread {share:5.1%}  {name}" for name, share in self.threads[:4]]
        return out


def py_spy() -> str | None:
    """The py-spy executable next to this interpreter or on PATH (``pip install py-spy``), else None."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def record(pid: int, raw_path: Path) -> Iterator[Profile]:
    """Record the process ``pid`` for the duration of the block; the yielded Profile is filled in at the end."""
    profile = Profile(raw_path=str(raw_path))
    executable = py_spy()
    if executable is None:
        profile.error = "py-spy is not installed (pip install py-spy)"
        yield profile
        return
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            executable,
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(RATE),
            "--format",
            FORMAT,
            "--threads",
            "--nonblocking",
            "--output",
            str(raw_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield profile
    finally:
        process.send_signal(signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
        if raw_path.exists() and FORMAT != "raw":
            profile.error = f"{FORMAT} written to {raw_path}, not summarised"
        elif raw_path.exists():
            summarise(raw_path, profile)
        else:
            profile.error = stderr.decode(errors="replace").strip()[-300:] or "no output"


def summarise(raw_path: Path, profile: Profile, count: int = 25) -> None:
    """Fill ``profile`` from py-spy's collapsed stacks (``frame;frame;... samples`` per line)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        weight = int(number)
        frames = stack.split(";")
        thread = ""
        while frames and _THREAD.match(frames[0]):
            thread = frames.pop(0)
        named = [_short(frame) for frame in frames]
        if not named or any(wait in named[-1] for wait in _WAITS):
            continue
        samples += weight
        threads[thread] += weight
        own[named[-1]] += weight
        for frame in set(named):
            # The broker's own functions, less the start-up frames every main-thread sample passes through.
            if frame.partition("(")[2].startswith("server/") and "server/cli.py" not in frame:
                total[frame] += weight
    profile.samples = samples
    if samples:
        profile.top_self = [(frame, n / samples) for frame, n in own.most_common(count)]
        profile.top_total = [(frame, n / samples) for frame, n in total.most_common(count)]
        profile.threads = [(name, n / samples) for name, n in threads.most_common(8)]


def _short(frame: str) -> str:
    """``function (path/to/module.py:12)`` → ``function (module.py:12)``, site-packages paths cut to the package."""
    match = _WHERE.match(frame)
    if match is None:
        return frame
    path = match.group("file")
    for marker in ("site-packages/", f"{REPO}/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    line = match.group("line")
    return f"{match.group('function')} ({path}:{line})" if line else f"{match.group('function')} ({path})"


def python_threads(pid: int) -> dict[str, int]:
    """Python threads of a process by name (digits folded), from ``py-spy dump``; empty without py-spy."""
    executable = py_spy()
    if executable is None:
        return {}
    argv = [executable, "dump", "--pid", str(pid), "--nonblocking"]
    dump = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False).stdout
    names: Counter[str] = Counter()
    for match in re.finditer(r'^Thread (?:0x)?[0-9A-Fa-f]+ \([^)]*\): "([^"]*)"', dump, re.M):
        names[re.sub(r"\d+", "N", match.group(1))] += 1
    return dict(names.most_common())
