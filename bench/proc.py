"""What a process uses, read from /proc (Linux): threads, resident memory, peak resident memory."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

MiB = 1024 * 1024


@dataclass(frozen=True)
class ProcStatus:
    """A snapshot of /proc/PID/status: thread count and VmRSS/VmHWM in bytes."""

    threads: int
    rss: int
    hwm: int

    @property
    def rss_mib(self) -> float:
        return self.rss / MiB

    @property
    def hwm_mib(self) -> float:
        return self.hwm / MiB


def status(pid: int) -> ProcStatus:
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return ProcStatus(
        threads=int(fields["Threads"]),
        rss=_kib(fields["VmRSS"]),
        hwm=_kib(fields["VmHWM"]),
    )


def _kib(value: str) -> int:
    number, _, unit = value.partition(" ")
    if unit.strip() != "kB":
        raise ValueError(f"unexpected unit in /proc status: {value!r}")
    return int(number) * 1024


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current VmRSS (writing "5" to clear_refs, Linux 4.0+), so a later VmHWM is this phase's."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (children inherit it); return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


class Sampler:
    """Samples a process's status every ``interval`` seconds in a thread; keeps the maxima (``with`` block)."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self._pid = pid
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self.max_rss = 0
        self.max_threads = 0
        self.samples = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def sample(self) -> None:
        try:
            now = status(self._pid)
        except (FileNotFoundError, ProcessLookupError):
            return
        self.max_rss = max(self.max_rss, now.rss)
        self.max_threads = max(self.max_threads, now.threads)
        self.samples += 1

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def thread_names(pid: int) -> dict[str, int]:
    """How many threads of a process go by each name (/proc/PID/task/*/comm, digits folded: ``worker_N``)."""
    names: Counter[str] = Counter()
    for comm in Path(f"/proc/{pid}/task").glob("*/comm"):
        with contextlib.suppress(OSError):
            names[re.sub(r"\d+", "N", comm.read_text().strip())] += 1
    return dict(names.most_common())


@contextlib.contextmanager
def kernel_setting_at_least(name: str, minimum: int) -> Iterator[str]:
    """Raise the sysctl ``name`` (e.g. ``fs/inotify/max_user_instances``) to ``minimum`` for the block, then put it
    back; yields what was done, for the record. Needs root; without it the setting stays as it is."""
    path = Path("/proc/sys") / name
    try:
        before = int(path.read_text())
    except (OSError, ValueError):
        yield f"{name}: unreadable, left alone"
        return
    if before >= minimum:
        yield f"{name} = {before}"
        return
    try:
        path.write_text(str(minimum))
    except OSError as exc:
        yield f"{name} = {before} (could not raise it to {minimum}: {exc.strerror})"
        return
    try:
        yield f"{name} raised from {before} to {minimum} for the run"
    finally:
        path.write_text(str(before))


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5), after pid and (comm)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat (all cores together)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / ticks, sum(values) / ticks


class CpuWindow:
    """CPU used by a process and by the whole machine during a ``with`` block, as shares of one core."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.process_cores = 0.0
        self.machine_cores = 0.0
        self.cores = os.cpu_count() or 1

    def __enter__(self) -> CpuWindow:
        self._start = (time.monotonic(), cpu_seconds(self._pid), machine_cpu())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        began, process, (busy, total) = self._start
        elapsed = time.monotonic() - began
        now_busy, now_total = machine_cpu()
        self.process_cores = (cpu_seconds(self._pid) - process) / elapsed
        self.machine_cores = (now_busy - busy) / (now_total - total) * self.cores if now_total > total else 0.0
