"""The committed stubs match the protos, and the checker notices when they do not."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_current() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/codegen.py", "--check"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_a_stale_stub_is_detected(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", copy / "protos")
    shutil.copytree(ROOT / "generated", copy / "generated")
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    proto = copy / "protos" / "mailbroker" / "v1" / "resources.proto"
    proto.write_text(proto.read_text().replace("PROVIDER_IMAP = 3;", "PROVIDER_IMAP = 3;\n  PROVIDER_OTHER = 4;"))
    result = subprocess.run(
        [sys.executable, "scripts/codegen.py", "--check"], cwd=copy, capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert "resources_pb2.py" in result.stderr
