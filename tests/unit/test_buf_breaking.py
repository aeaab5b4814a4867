"""scripts/buf-breaking compares protos/ with the last release tag, else the previous commit, else says why not."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "node_modules" / ".bin" / "buf"
pytestmark = pytest.mark.skipif(not BUF.exists(), reason="buf comes from `npm ci` (scripts/test runs it)")

RESOURCES = Path("protos/mailbroker/v1/resources.proto")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.test", "-c", "commit.gpgsign=false", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", repo / "protos")
    (repo / "scripts").mkdir()
    for name in ("codegen.py", "buf-breaking"):
        shutil.copy2(ROOT / "scripts" / name, repo / "scripts" / name)
    shutil.copy2(ROOT / "buf.yaml", repo / "buf.yaml")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    return repo


def _check(repo: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BUF": str(BUF), "PYTHON": sys.executable}
    return subprocess.run(
        [str(repo / "scripts" / "buf-breaking")], cwd=repo, env=env, capture_output=True, text=True, check=False
    )


def _commit_change(repo: Path, old: str, new: str) -> None:
    proto = repo / RESOURCES
    text = proto.read_text()
    assert old in text
    proto.write_text(text.replace(old, new))
    _git(repo, "commit", "-q", "-am", "change")


def test_a_single_commit_clone_is_skipped_with_a_reason(tmp_path: Path) -> None:
    result = _check(_repo(tmp_path))
    assert result.returncode == 0
    assert "skipped, HEAD is the first commit" in result.stderr


def test_a_shallow_clone_is_skipped_with_a_reason(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    _commit_change(repo, "PROVIDER_IMAP = 3;", "PROVIDER_IMAP = 3;\n  PROVIDER_OTHER = 4;")
    shallow = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{repo}", str(shallow)], check=True)
    result = _check(shallow)
    assert result.returncode == 0
    assert "skipped, shallow clone" in result.stderr


def test_against_the_previous_commit_a_compatible_change_passes_and_a_breaking_one_fails(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    _commit_change(repo, "PROVIDER_IMAP = 3;", "PROVIDER_IMAP = 3;\n  PROVIDER_OTHER = 4;")
    passed = _check(repo)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "against the previous commit" in passed.stderr

    _commit_change(repo, "  PROVIDER_OTHER = 4;\n", "")
    failed = _check(repo)
    assert failed.returncode != 0
    assert 'enum value "4" on enum "Provider" was deleted' in failed.stdout


def test_a_release_tag_wins_over_the_previous_commit(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    _git(repo, "tag", "v0.1.0")
    _commit_change(repo, "PROVIDER_IMAP = 3;", "PROVIDER_IMAP = 3;\n  PROVIDER_OTHER = 4;")
    _commit_change(repo, "  PROVIDER_OTHER = 4;\n", "")  # back to the release: compatible with v0.1.0
    result = _check(repo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "against the last release tag v0.1.0" in result.stderr

    _commit_change(repo, "  PROVIDER_IMAP = 3;\n", "")
    result = _check(repo)
    assert result.returncode != 0
    assert 'enum value "3" on enum "Provider" was deleted' in result.stdout
