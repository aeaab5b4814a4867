"""The benchmark suite's smoke pass (``python -m bench --quick``): every figure still runs and produces its numbers.

Benchmarks are not timed tests: nothing here looks at a measured value, only that the command works end to end
(its own Dovecot, broker processes, load processes, emulators) and writes the JSON that runs are compared by.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import FIGURES

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(os.geteuid() != 0, reason="the bench runs its private Dovecot as root")
def test_the_quick_bench_produces_every_figure(tmp_path: Path) -> None:
    bench = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", "--results", str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("GRPC_")},
    )
    try:
        stdout, stderr = bench.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        # ^C: the bench's own clean-up stops its Dovecot, brokers and load processes, which outlive a kill.
        bench.send_signal(signal.SIGINT)
        stdout, stderr = bench.communicate(timeout=120)
        raise AssertionError("the quick bench did not finish in 15 minutes:\n" + stdout[-3000:]) from None
    tail = "\n".join(stdout.splitlines()[-40:] + stderr.splitlines()[-20:])
    assert bench.returncode == 0, tail
    (written,) = tmp_path.glob("*-quick.json")
    record = json.loads(written.read_text())
    assert record["quick"] is True
    assert record["environment"]["cpus"] == os.cpu_count()
    figures = {figure["figure"]: figure for figure in record["figures"]}
    assert sorted(figures) == sorted(FIGURES)
    for name, figure in figures.items():
        assert figure["error"] == "", name
        assert figure["metrics"], name
        assert all(isinstance(metric["value"], int | float) for metric in figure["metrics"]), name
        # The table prints a verdict for every metric with a target: target and value are there to compare.
        assert all(metric["target"] is None or {"op", "bound"} <= set(metric["target"]) for metric in figure["metrics"])
