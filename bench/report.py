"""Figures, their targets, the printed table and the JSON record of a run."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    """A bound a metric should meet: ``value <= bound``, ``value >= bound`` or exactly ``value == bound``."""

    op: Literal["<=", ">=", "=="]
    bound: float

    def met(self, value: float) -> bool:
        if self.op == "==":
            return value == self.bound
        return value <= self.bound if self.op == "<=" else value >= self.bound

    def describe(self, unit: str) -> str:
        sign = {"<=": "≤", ">=": "≥", "==": "exactly"}[self.op]
        return f"{sign} {_number(self.bound)}{_unit(unit)}"

    def verdict(self, value: float) -> str:
        """ "ok"/"MISS" with where the value stands against the bound."""
        word = "ok" if self.met(value) else "MISS"
        if self.op == "==":
            return word
        if self.op == "<=":
            return f"{word} ({value / self.bound:.0%} of limit)" if self.bound else word
        return f"{word} ({value / self.bound:.2g}x the minimum)" if self.bound else word


@dataclass
class Metric:
    """One number a figure measured; with a target it counts towards the verdict, without it is context."""

    name: str
    value: float
    unit: str
    target: Target | None = None
    detail: str = ""

    def shown(self) -> str:
        text = f"{_number(self.value)}{_unit(self.unit)}"
        return f"{text} ({self.detail})" if self.detail else text


@dataclass
class FigureResult:
    """What one figure produced: its metrics, where the broker ran, raw details for the JSON, how long it took."""

    figure: str
    metrics: list[Metric] = field(default_factory=list)
    setup: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""

    def add(self, name: str, value: float, unit: str, target: Target | None = None, detail: str = "") -> Metric:
        metric = Metric(name, value, unit, target, detail)
        self.metrics.append(metric)
        return metric

    @property
    def produced(self) -> bool:
        """True when the figure ran to the end and every number is a real number."""
        return not self.error and bool(self.metrics) and all(math.isfinite(m.value) for m in self.metrics)

    @property
    def misses(self) -> list[Metric]:
        return [m for m in self.metrics if m.target is not None and not m.target.met(m.value)]


def _number(value: float) -> str:
    if value == int(value) and abs(value) >= 10:
        return f"{int(value):,}"
    return f"{value:.3g}"


def _unit(unit: str) -> str:
    return unit if unit in ("x", "%") else f" {unit}" if unit else ""


def render_table(results: list[FigureResult]) -> str:
    """The figure | measured | target | verdict table, one row per metric, then each figure's setup and notes."""
    rows = [("figure", "metric", "measured", "target", "verdict")]
    for result in results:
        if result.error:
            rows.append((result.figure, "ERROR", result.error.splitlines()[0][:80], "", "no number"))
            continue
        for index, metric in enumerate(result.metrics):
            rows.append(
                (
                    result.figure if index == 0 else "",
                    metric.name,
                    metric.shown(),
                    metric.target.describe(metric.unit) if metric.target else "",
                    metric.target.verdict(metric.value) if metric.target else "info",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for number, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    lines.append("")
    for result in results:
        lines.append(f"{result.figure} ({result.seconds:.1f} s): {result.setup}")
        lines.extend(f"  - {note}" for note in result.notes)
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Where the figures were measured, so runs on different machines or versions are not compared blindly."""
    import grpc
    import imapclient
    import uvloop

    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "imapclient": imapclient.__version__,
        "uvloop": uvloop.__version__,
        "dovecot": _command(["dovecot", "--version"]),
        "commit": _command(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
        "dirty": bool(_command(["git", "-C", str(REPO), "status", "--porcelain", "--", "server"])),
    }


def _command(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except OSError:
        return ""


def write_json(path: Path, started: datetime, quick: bool, results: list[FigureResult], machine: list[str]) -> None:
    """The run as JSON: environment, machine settings, mode, and every figure with all its numbers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "started": started.isoformat(timespec="seconds"),
        "quick": quick,
        "environment": {**environment(), "settings": machine},
        "figures": [asdict(result) for result in results],
    }
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
