"""A consumer installs the generated stubs alone, without the server or its dependencies."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_stub_distribution_installs_without_the_server(tmp_path: Path) -> None:
    env_dir = tmp_path / "consumer"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(ROOT / "generated" / "python")],
        check=True,
        capture_output=True,
        timeout=600,
    )
    probe = (
        "import importlib.util as u\n"
        "from mailbroker.v1 import account_service_pb2, account_service_pb2_grpc, mail_service_pb2_grpc\n"
        "assert account_service_pb2.DESCRIPTOR.services_by_name['AccountService']\n"
        "missing = [m for m in ('server', 'sqlalchemy', 'cryptography', 'alembic') if u.find_spec(m)]\n"
        "print(','.join(missing))\n"
    )
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert result.stdout.strip() == ""
    assert sys.prefix != str(env_dir)
