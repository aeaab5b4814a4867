"""The benchmark suite's smoke pass (``python -m bench --quick``): every figure still runs and produces its numbers.

Benchmarks are not timed tests: nothing here looks at a measured value, only that the command works end to end
(its own Dovecot, broker processes, load processes, emulators) and writes the JSON that runs are compared by.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import FIGURES

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(os.geteuid() != 0, reason="the bench runs its private Dovecot as root")
def test_the_quick_bench_produces_every_figure(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--results", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("GRPC_")},
    )
    tail = "\n".join(finished.stdout.splitlines()[-40:] + finished.stderr.splitlines()[-20:])
    assert finished.returncode == 0, tail
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
