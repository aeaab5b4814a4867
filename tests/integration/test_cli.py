"""The `mailbroker` command as an operator meets it: first run, the printed grpcurl commands, operator mistakes."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pki import make_test_pki

MAILBROKER = [sys.executable, "-m", "server.cli"]
GRPCURL = str(Path(sys.executable).parent / "grpcurl")


class Serving:
    def __init__(self, process: subprocess.Popen[str], banner: list[str]) -> None:
        self.process = process
        self.banner = banner

    def commands(self) -> list[list[str]]:
        return [shlex.split(line) for line in self.banner if "grpcurl" in line and "-cacert" in line]

    def target(self) -> str:
        return self.banner[0].split()[4]

    def stop(self) -> int:
        """SIGTERM, as an operator or an orchestrator would; returns the exit status."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()


def _serve(data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> Serving:
    process = subprocess.Popen(
        [*MAILBROKER, "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None
    banner: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        banner.append(line.rstrip("\n"))
        if "ListAccounts" in line:
            return Serving(process, banner)
    process.kill()
    process.wait()
    process.stdout.close()
    raise AssertionError(f"the broker did not print its banner (got {len(banner)} lines)")


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[Serving]:
    running = _serve(tmp_path / "var")
    yield running
    running.stop()


def _grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRPCURL, *args], capture_output=True, text=True, timeout=30, check=False)


def test_first_run_creates_the_embedded_defaults(serving: Serving, tmp_path: Path) -> None:
    data = tmp_path / "var"
    for name in ("ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem"):
        assert (data / "dev-pki" / name).is_file()
    assert stat.S_IMODE((data / "keys.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "dev-pki" / "client-key.pem").stat().st_mode) == 0o600
    assert (data / "mailbroker.db").is_file()
    assert any(str(data / "dev-pki" / "client.pem") in line for line in serving.banner)


def test_the_printed_grpcurl_commands_work_as_printed(serving: Serving) -> None:
    list_cmd, list_accounts_cmd = serving.commands()
    listed = subprocess.run(list_cmd, capture_output=True, text=True, timeout=30, check=True).stdout.split()
    assert "mailbroker.v1.AccountService" in listed
    assert "mailbroker.v1.MailService" in listed
    assert "grpc.health.v1.Health" in listed
    page = subprocess.run(list_accounts_cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    assert json.loads(page) == {}  # an empty ListAccountsResponse


def test_grpcurl_describe_and_health(serving: Serving) -> None:
    tls = serving.commands()[0][1:-2]  # -cacert … -key …
    described = _grpcurl(*tls, serving.target(), "describe", "mailbroker.v1.AccountService")
    assert described.returncode == 0
    assert "rpc ListAccounts ( .mailbroker.v1.ListAccountsRequest )" in described.stdout
    described = _grpcurl(*tls, serving.target(), "describe", "mailbroker.v1.MailService")
    assert "rpc WatchMailbox ( .mailbroker.v1.WatchMailboxRequest ) returns ( stream .mailbroker.v1.MailboxEvent )" in (
        described.stdout
    )
    described = _grpcurl(*tls, serving.target(), "describe", "mailbroker.v1.MailboxEvent")
    assert ".mailbroker.v1.ResyncRequired resync_required = 15;" in described.stdout
    health = _grpcurl(*tls, serving.target(), "grpc.health.v1.Health/Check")
    assert health.returncode == 0
    assert json.loads(health.stdout) == {"status": "SERVING"}
    error = _grpcurl(
        *tls, "-d", '{"name": "accounts/nope"}', serving.target(), "mailbroker.v1.AccountService/GetAccount"
    )
    assert error.returncode != 0
    assert "NotFound" in error.stderr


def test_grpcurl_without_a_client_certificate_or_with_a_foreign_one_fails(serving: Serving, tmp_path: Path) -> None:
    tls = serving.commands()[0][1:-2]
    ca = tls[tls.index("-cacert") + 1]
    anonymous = _grpcurl("-cacert", ca, serving.target(), "list")
    assert anonymous.returncode != 0
    assert "mailbroker.v1" not in anonymous.stdout
    (tmp_path / "other").mkdir()
    foreign = make_test_pki(tmp_path / "other").foreign
    refused = _grpcurl("-cacert", ca, "-cert", str(foreign.cert), "-key", str(foreign.key), serving.target(), "list")
    assert refused.returncode != 0
    assert "mailbroker.v1" not in refused.stdout


def test_sigterm_stops_the_broker_cleanly_and_a_restart_reuses_pki_and_keys(tmp_path: Path) -> None:
    data = tmp_path / "var"
    first = _serve(data)
    ca, keys = (data / "dev-pki" / "ca.pem").read_bytes(), (data / "keys.json").read_bytes()
    assert first.stop() == 0
    second = _serve(data)
    try:
        assert (data / "dev-pki" / "ca.pem").read_bytes() == ca
        assert (data / "keys.json").read_bytes() == keys
        listed = subprocess.run(second.commands()[1], capture_output=True, text=True, timeout=30, check=True)
        assert json.loads(listed.stdout) == {}
    finally:
        second.stop()


def _fails_in_one_line(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [*MAILBROKER, *args], capture_output=True, text=True, timeout=60, check=False, env={**os.environ, **(env or {})}
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailbroker: error: ")
    return lines[0]


def test_operator_mistakes_are_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nlisten = 1")
    assert "not valid TOML" in _fails_in_one_line("serve", "--config", str(bad))

    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[server]\nlisten = "127.0.0.1:0"\nlistne = "x"\n')
    assert "unknown setting server.listne" in _fails_in_one_line("serve", "--config", str(unknown))

    assert "cannot read config file" in _fails_in_one_line("serve", "--config", str(tmp_path / "missing.toml"))

    missing_cert = tmp_path / "tls.toml"
    missing_cert.write_text(
        f'data_dir = "{tmp_path / "d1"}"\n[tls]\ncert = "{tmp_path}/nope.pem"\nkey = "{tmp_path}/nope-key.pem"\n'
        f'client_ca = "{tmp_path}/ca.pem"\n'
    )
    assert "cannot read TLS" in _fails_in_one_line("serve", "--config", str(missing_cert))

    assert "server.listen" in _fails_in_one_line("serve", "--data-dir", str(tmp_path / "d2"), "--listen", "nope")
    assert "logging.level" in _fails_in_one_line(
        "serve", "--data-dir", str(tmp_path / "d3"), env={"MAILBROKER_LOGGING_LEVEL": "LOUD"}
    )


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _fails_in_one_line("serve", "--data-dir", str(tmp_path / "var"), "--listen", f"127.0.0.1:{port}")
    assert "cannot listen" in line


def test_a_store_without_its_key_refuses_to_start(tmp_path: Path) -> None:
    data = tmp_path / "var"
    first = _serve(data)
    first.stop()
    (data / "keys.json").unlink()
    assert "key file" in _fails_in_one_line("serve", "--data-dir", str(data), "--listen", "127.0.0.1:0")
    assert not (data / "keys.json").exists()


def test_dev_pki_adds_clients_and_keys_init_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    subprocess.run(
        [*MAILBROKER, "dev-pki", "--out", str(out), "--client", "billing"], check=True, capture_output=True, timeout=60
    )
    for name in ("ca.pem", "server.pem", "client.pem", "billing.pem", "billing-key.pem"):
        assert (out / name).is_file()
    keys = tmp_path / "k.json"
    subprocess.run([*MAILBROKER, "keys", "init", "--file", str(keys)], check=True, capture_output=True, timeout=60)
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    before = keys.read_bytes()
    _fails_in_one_line("keys", "init", "--file", str(keys))
    assert keys.read_bytes() == before


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_broker_serves_on_either_event_loop(tmp_path: Path, loop: str) -> None:
    log = tmp_path / "broker.jsonl"
    running = _serve(tmp_path / "var", env={"MAILBROKER_SERVER_EVENT_LOOP": loop, "MAILBROKER_LOGGING_FILE": str(log)})
    try:
        listed = subprocess.run(running.commands()[1], capture_output=True, text=True, timeout=30, check=True)
        assert json.loads(listed.stdout) == {}
    finally:
        stopped = running.stop()
    assert stopped == 0
    started = [json.loads(line) for line in log.read_text().splitlines() if '"startup"' in line]
    assert [line["event_loop"] for line in started] == [loop]


def test_an_unknown_event_loop_is_one_line(tmp_path: Path) -> None:
    unknown = {"MAILBROKER_SERVER_EVENT_LOOP": "trio"}
    line = _fails_in_one_line("serve", "--data-dir", str(tmp_path / "var"), env=unknown)
    assert "server.event_loop" in line
