"""Running the operator commands (`mailbroker keys ...`, `mailbroker audit verify`) against a test broker's store."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from server.config import Config

MAILBROKER = [sys.executable, "-m", "server.cli"]


def write_config(config: Config, path: Path) -> Path:
    """A TOML file naming the same data directory, store, key file and anchor as ``config``."""
    path.write_text(
        f'data_dir = "{config.data_dir}"\n'
        f'[store]\nurl = "{config.store_url}"\n'
        f'[keys]\nfile = "{config.keyring_file}"\n'
        f'[audit]\nanchor_file = "{config.audit_anchor_file}"\n',
        encoding="utf-8",
    )
    return path


@dataclass(frozen=True)
class Result:
    status: int
    stdout: str
    stderr: str


def _environment() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "MAILBROKER_KEKS" and not k.startswith("MAILBROKER_")}


def run(config_file: Path, *args: str) -> Result:
    done = subprocess.run(
        [*MAILBROKER, *args, "--config", str(config_file)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_environment(),
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


async def run_async(config_file: Path, *args: str) -> Result:
    process = await asyncio.create_subprocess_exec(
        *MAILBROKER,
        *args,
        "--config",
        str(config_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_environment(),
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())
