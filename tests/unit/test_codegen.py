"""The committed stubs (Python, TypeScript/JavaScript, Go) match the protos, and the checker notices when they do
not."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _codegen(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/codegen.py", *args], cwd=cwd, capture_output=True, text=True, check=False
    )


def test_generated_stubs_are_current() -> None:
    result = _codegen(ROOT, "--check")
    assert result.returncode == 0, result.stderr


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """protos/, generated/ and scripts/ in a scratch tree, the Node tools linked in."""
    repo = tmp_path / "repo"
    for name in ("protos", "generated", "scripts"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    (repo / "node_modules").symlink_to(ROOT / "node_modules")
    return repo


def test_a_proto_change_makes_every_language_stale(copy: Path) -> None:
    proto = copy / "protos" / "mailbroker" / "v1" / "resources.proto"
    proto.write_text(proto.read_text().replace("PROVIDER_IMAP = 3;", "PROVIDER_IMAP = 3;\n  PROVIDER_OTHER = 4;"))
    result = _codegen(copy, "--check")
    assert result.returncode == 1
    for stale in (
        "generated/python/mailbroker/v1/resources_pb2.py",
        "generated/ts/mailbroker/v1/resources_pb.js",
        "generated/ts/mailbroker/v1/resources_pb.d.ts",
        "generated/go/mailbroker/v1/resources.pb.go",
    ):
        assert stale in result.stderr
    assert "account_service" not in result.stderr

    assert _codegen(copy).returncode == 0
    assert "PROVIDER_OTHER" in (copy / "generated/go/mailbroker/v1/resources.pb.go").read_text()
    assert _codegen(copy, "--check").returncode == 0


@pytest.mark.parametrize(
    ("path", "edit"),
    [
        ("generated/ts/mailbroker/v1/mail_service_pb.js", "hand edit"),
        ("generated/go/mailbroker/v1/mail_service_grpc.pb.go", "hand edit"),
        ("generated/ts/package.json", "hand edit"),
        ("generated/go/mailbroker/v1/extra.go", "new"),
        ("generated/ts/mailbroker/v1/mail_service_pb.d.ts", "deleted"),
    ],
)
def test_a_hand_edited_extra_or_missing_file_is_stale(copy: Path, path: str, edit: str) -> None:
    target = copy / path
    if edit == "deleted":
        target.unlink()
    elif edit == "new":
        target.write_text("package mailbrokerv1\n")
    else:
        target.write_text(target.read_text() + "\n// edited\n")
    result = _codegen(copy, "--check")
    assert result.returncode == 1
    assert path in result.stderr


def test_regenerating_leaves_hand_written_files_alone(copy: Path) -> None:
    pyproject = copy / "generated" / "python" / "pyproject.toml"
    before = pyproject.read_bytes()
    (copy / "generated" / "go" / "mailbroker" / "v1" / "extra.go").write_text("package mailbrokerv1\n")
    assert _codegen(copy).returncode == 0
    assert pyproject.read_bytes() == before
    assert not (copy / "generated" / "go" / "mailbroker" / "v1" / "extra.go").exists()
    assert _codegen(copy, "--check").returncode == 0
