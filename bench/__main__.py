"""``python -m bench``: run the performance figures, print the table, write bench/results/<timestamp>.json.

    python -m bench                 every figure at full scale (about 25 minutes on 2 cores, 11 of them the fuzz)
    python -m bench --quick         small counts, about 100 s: a smoke pass (checks only that every
                                    figure produced its numbers; never times; the test suite runs it)
    python -m bench --only feed_latency --profile    one figure, with a py-spy profile of the broker
    python -m bench --event-loop asyncio             the broker on asyncio's loop instead of uvloop

Exit status: 0 when every figure produced its numbers, 1 when one failed. A missed target is reported, not failed:
these are benchmarks, not timed tests.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench import fuzz, imap_feeds, imap_reads, oauth, profiling, scale
from bench.harness import Run
from bench.proc import kernel_setting_at_least, raise_open_files_limit
from bench.report import REPO, FigureResult, render_table, write_json
from server.config import EVENT_LOOPS, ServerConfig
from tests.pki import make_test_pki

FIGURES: dict[str, Callable[[Run], FigureResult]] = {
    "get_message_vs_imapclient": imap_reads.get_message_vs_imapclient,
    "naive_vs_broker": imap_reads.naive_vs_broker,
    "feed_latency": imap_feeds.feed_latency,
    "watched_accounts_1000": imap_feeds.watched_accounts_1000,
    "list_messages_100k": imap_reads.list_messages_100k,
    "attachment_25mb": imap_reads.attachment_25mb,
    "fuzz": fuzz.fuzz,
    "watch_streams_10000": scale.watch_streams_10000,
    "get_account_throughput": scale.get_account_throughput,
    "oauth_single_flight": oauth.oauth_single_flight,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke pass of about 100 s")
    parser.add_argument("--only", action="append", choices=sorted(FIGURES), metavar="NAME", help="run only NAME")
    parser.add_argument("--profile", action="store_true", help="record the broker with py-spy during each figure")
    parser.add_argument(
        "--probe", action="store_true", help="run the broker under bench/probe.py: GC pauses and event-loop stalls"
    )
    parser.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default=ServerConfig().event_loop,
        help="the broker's and the bare server's event loop ([server] event_loop; default %(default)s)",
    )
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results", help="where the JSON goes")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (broker and Dovecot logs)")
    parser.add_argument("--list", action="store_true", help="list the figures and exit")
    return parser


def run_figure(name: str, run: Run) -> FigureResult:
    started = time.monotonic()
    try:
        result = FIGURES[name](run)
    except Exception as exc:  # one broken figure must not hide the others' numbers
        traceback.print_exc()
        result = FigureResult(name, error=f"{type(exc).__name__}: {exc}")
    result.seconds = time.monotonic() - started
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        print("\n".join(FIGURES))
        return 0
    if args.profile and profiling.py_spy() is None:
        print("--profile needs py-spy: pip install py-spy", file=sys.stderr)
        return 2
    names = [name for name in FIGURES if not args.only or name in args.only]
    open_files = raise_open_files_limit()
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    workdir = Path(tempfile.mkdtemp(prefix="mailbroker-bench-"))
    run = Run(
        quick=args.quick,
        workdir=workdir,
        pki=make_test_pki(workdir),
        profile_dir=args.results / f"{stamp}-profiles" if args.profile else None,
        probe=args.probe,
        event_loop=args.event_loop,
    )
    results = []
    try:
        # Every imap process of the test Dovecot runs as the dovecot user, and each watching one (or hibernated
        # connection) holds an inotify instance: Linux's default of 128 per user would leave the rest polling.
        with kernel_setting_at_least("fs/inotify/max_user_instances", 8192) as inotify:
            machine = [inotify, f"RLIMIT_NOFILE {open_files}", f"broker event loop {args.event_loop}"]
            print("; ".join(machine), flush=True)
            for name in names:
                print(f"running {name}{' (quick)' if args.quick else ''} ...", flush=True)
                result = run_figure(name, run)
                results.append(result)
                outcome = result.error or ", ".join(f"{m.name}: {m.shown()}" for m in result.metrics[:2])
                print(f"  {result.seconds:.1f} s: {outcome}", flush=True)
    finally:
        if args.keep:
            print(f"scratch directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(render_table(results))
    path = args.results / f"{stamp}{'-quick' if args.quick else ''}.json"
    write_json(path, started, args.quick, results, machine)
    print(f"\nwrote {path}")
    failed = [result.figure for result in results if not result.produced]
    if failed:
        print(f"no numbers from: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
