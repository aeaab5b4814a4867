"""The parts a figure runs against: a private Dovecot, the broker in its own process, mTLS gRPC clients.

The broker is started the way an operator starts it, ``python -m server.cli serve --config FILE``, with a TOML
config written into a temporary directory: the test PKI's server certificate and client CA, the mail harness's
CA as the IMAP trust store, and a policy that lets the bench's client identity call everything.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import secrets
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
from mailbroker.v1 import account_service_pb2 as apb
from mailbroker.v1 import account_service_pb2_grpc, mail_service_pb2_grpc
from mailbroker.v1 import resources_pb2 as rpb

from bench import profiling
from bench.proc import ProcStatus, status
from bench.report import REPO, FigureResult
from server.config import ServerConfig
from tests.mailserver import Dovecot, Mailbox
from tests.mailserver.users import MailUsers
from tests.pki import PemPair, TestPki

DOMAIN = "example.test"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
N = TypeVar("N", int, float)
_BANNER = re.compile(r"serving on \S+:(\d+) ")

READ: tuple[rpb.Capability, ...] = (rpb.CAPABILITY_METADATA, rpb.CAPABILITY_READ)
# Accounts name their server by host name, as real ones do, so the broker resolves it (/etc/hosts here) like it
# would in production; the harness's certificate is valid for it.
IMAP_HOST = "localhost"
BENCH_LIMIT = 1_000_000


class MailHarness:
    """A private Dovecot (IMAPS + LMTP) and its users; ``extra_config`` is appended to its dovecot.conf."""

    def __init__(self, *, extra_config: str = "") -> None:
        self.users = MailUsers()
        self._counter = itertools.count(1)
        self.dovecot = Dovecot(users=self.users, extra_config=extra_config)

    def new_mailbox(self, name: str = "bench") -> Mailbox:
        address = f"{name}-{next(self._counter)}-{secrets.token_hex(3)}@{DOMAIN}"
        password = secrets.token_urlsafe(18)
        self.users.add(address, password)
        return Mailbox(address, password)

    @property
    def ca_path(self) -> Path:
        return self.dovecot.tls.ca_path

    @property
    def instance_name(self) -> str:
        """Dovecot's instance_name as tests/mailserver/dovecot.py sets it: its processes are titled
        ``dovecot-<instance_name>/<service>``."""
        return f"mailbroker-test-{self.dovecot.directory.name}"

    def close(self) -> None:
        self.dovecot.stop()

    def __enter__(self) -> MailHarness:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


class LmtpSender:
    """One LMTP connection to Dovecot kept open for many deliveries (blocking: call it from a thread)."""

    def __init__(self, dovecot: Dovecot) -> None:
        self._lmtp = smtplib.LMTP(dovecot.host, dovecot.lmtp_port, timeout=30)

    def deliver(self, recipient: str, raw: bytes) -> float:
        """Deliver ``raw``; return ``time.perf_counter()`` taken just before the transaction (MAIL FROM) began."""
        started = time.perf_counter()
        refused = self._lmtp.sendmail(f"sender@{DOMAIN}", [recipient], raw)
        if refused:
            raise RuntimeError(f"LMTP refused {refused}")
        return started

    def close(self) -> None:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            self._lmtp.quit()


def _toml(value: Any) -> str:
    # JSON strings, numbers, booleans and arrays of them are valid TOML values.
    return json.dumps(str(value) if isinstance(value, Path) else value)


def broker_toml(directory: Path, pki: TestPki, mail_ca: Path, settings: Mapping[str, Mapping[str, Any]]) -> str:
    """The broker's config file: the test PKI for mTLS, the mail CA for IMAP, the bench client allowed everything."""
    sections: dict[str, dict[str, Any]] = {
        "server": {"listen": "127.0.0.1:0", "shutdown_grace_seconds": 1},
        "tls": {"cert": pki.server.cert, "key": pki.server.key, "client_ca": pki.ca},
        # The harness's Dovecot is on loopback, which the SSRF guard refuses unless allowed.
        "imap": {"ca_file": mail_ca, "allowed_networks": ["127.0.0.0/8", "::1/128"]},
        "logging": {"level": "INFO"},
        # The bench is one client identity making a whole fleet's load (10,000 streams, 1,000 watched accounts,
        # hundreds of calls in flight): per-identity and per-account limits are raised out of its way.
        "limits": {
            "max_concurrent_calls_per_identity": BENCH_LIMIT,
            "max_streams_per_identity": BENCH_LIMIT,
            "max_watches_per_account": BENCH_LIMIT,
        },
    }
    for name, values in settings.items():
        sections.setdefault(name, {}).update(values)
    lines = [f"data_dir = {_toml(directory / 'data')}"]
    for name, values in sections.items():
        lines.append(f"\n[{name}]")
        lines.extend(f"{key} = {_toml(value)}" for key, value in values.items())
    lines += ["\n[[policy.rules]]", f"identities = {_toml([pki.alice.identity])}", 'methods = ["*"]']
    return "\n".join(lines) + "\n"


class BrokerProcess:
    """The broker under test in its own process, on a free loopback port; its log goes to ``broker.log``.
    ``settings`` adds to or overrides its config file, by section: ``{"mail": {"folder_poll_seconds": 60}}``."""

    def __init__(
        self,
        directory: Path,
        pki: TestPki,
        mail_ca: Path,
        *,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        probe: bool = False,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.config_path = directory / "broker.toml"
        self.log_path = directory / "broker.log"
        self.banner_path = directory / "broker.out"
        # With a probe (bench/probe.py), GC pauses and event-loop stalls of the broker go to probe.jsonl.
        self.probe_path = directory / "probe.jsonl" if probe else None
        self.config_path.write_text(broker_toml(directory, pki, mail_ca, settings or {}))
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("MAILBROKER_", "GRPC_"))}
        started = time.monotonic()
        with self.log_path.open("ab") as log, self.banner_path.open("wb") as banner:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    *(["bench.probe", str(self.probe_path)] if self.probe_path else ["server.cli"]),
                    "serve",
                    "--config",
                    str(self.config_path),
                ],
                cwd=REPO,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=banner,
                stderr=log,
            )
        try:
            self.port = self._await_banner(started + START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        self.target = f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self._process.pid

    def _await_banner(self, deadline: float) -> int:
        """The port from the line the broker prints once it serves."""
        while time.monotonic() < deadline and self._process.poll() is None:
            match = _BANNER.search(self.banner_path.read_text(errors="replace"))
            if match:
                return int(match.group(1))
            time.sleep(0.02)
        log = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the broker did not start (exit {self._process.poll()}); its log ends:\n{log}")

    def status(self) -> ProcStatus:
        return status(self.pid)

    def probe_records(self, since: float = 0.0, until: float = float("inf")) -> list[dict[str, Any]]:
        """The probe's records (GC pauses, event-loop stalls) stamped between ``since`` and ``until``."""
        if self.probe_path is None or not self.probe_path.exists():
            return []
        records = [json.loads(line) for line in self.probe_path.read_text().splitlines() if line.strip()]
        return [r for r in records if since <= r["at"] <= until]

    def stop(self) -> None:
        """SIGTERM (graceful shutdown), SIGKILL if it takes longer than STOP_TIMEOUT."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def credentials(self, client: PemPair | None = None) -> grpc.ChannelCredentials:
        key, cert = (client or self.pki.alice).key_cert_pair()
        return grpc.ssl_channel_credentials(
            root_certificates=self.pki.ca.read_bytes(), private_key=key, certificate_chain=cert
        )

    def channel(self) -> grpc.Channel:
        """A blocking channel as the bench client (alice): the lightest client for unary calls."""
        return grpc.secure_channel(self.target, self.credentials())

    def aio_channel(self) -> grpc.aio.Channel:
        """An asyncio channel as the bench client, for many concurrent streams."""
        return grpc.aio.secure_channel(self.target, self.credentials())

    def __enter__(self) -> BrokerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def connect_request(
    dovecot: Dovecot, box: Mailbox, capabilities: tuple[rpb.Capability, ...] = READ
) -> apb.ConnectImapAccountRequest:
    """An IMAP account on the harness's Dovecot over implicit TLS (no SMTP: the figures do not send)."""
    return apb.ConnectImapAccountRequest(
        imap_server=rpb.MailServer(
            host=IMAP_HOST, port=dovecot.imap_port, security=rpb.TRANSPORT_SECURITY_IMPLICIT_TLS
        ),
        username=box.address,
        password=box.password,
        capabilities=capabilities,
    )


def connect_account(channel: grpc.Channel, dovecot: Dovecot, box: Mailbox) -> str:
    """Connect a mailbox through the broker (it logs in to Dovecot first); return the account's resource name."""
    account: rpb.Account = account_stub(channel).ConnectImapAccount(connect_request(dovecot, box), timeout=30)
    return account.name


def account_stub(channel: grpc.Channel | grpc.aio.Channel) -> account_service_pb2_grpc.AccountServiceStub:
    return account_service_pb2_grpc.AccountServiceStub(channel)  # type: ignore[no-untyped-call]


def mail_stub(channel: grpc.Channel | grpc.aio.Channel) -> mail_service_pb2_grpc.MailServiceStub:
    return mail_service_pb2_grpc.MailServiceStub(channel)  # type: ignore[no-untyped-call]


@dataclass
class Run:
    """What every figure of one run shares: the mode, a scratch directory, the client PKI, profiling."""

    quick: bool
    workdir: Path
    pki: TestPki
    profile_dir: Path | None = None
    probe: bool = False
    event_loop: str = ServerConfig().event_loop  # the broker's and the bare server's (``--event-loop``)

    def count(self, full: N, quick: N) -> N:
        """``full`` in a full run, ``quick`` in a quick one."""
        return quick if self.quick else full

    @contextlib.contextmanager
    def environment(
        self,
        result: FigureResult,
        *,
        dovecot_config: str = "",
        name: str = "",
        settings: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Iterator[tuple[MailHarness, BrokerProcess]]:
        """A fresh Dovecot and a fresh broker process for one figure (so figures do not share memory or
        connections), stopped afterwards; ``name`` tells apart several environments of one figure."""
        directory = self.workdir / "-".join(filter(None, (result.figure, name)))
        settings = {**(settings or {})}
        settings["server"] = {"event_loop": self.event_loop, **settings.get("server", {})}
        with (
            MailHarness(extra_config=dovecot_config) as mail,
            BrokerProcess(directory, self.pki, mail.ca_path, settings=settings, probe=self.probe) as process,
        ):
            result.details["broker_start_seconds"] = round(process.start_seconds, 3)
            yield mail, process

    @contextlib.contextmanager
    def profiled(self, result: FigureResult, pid: int, phase: str) -> Iterator[None]:
        """With ``--profile``: py-spy records the broker during the block and the figure's notes get the top frames."""
        if self.profile_dir is None:
            yield
            return
        with profiling.record(pid, self.profile_dir / f"{result.figure}-{phase}.txt") as profile:
            yield
        result.details.setdefault("profiles", {})[phase] = asdict(profile)
        result.notes.append(f"profile of {phase}:")
        result.notes.extend(profile.lines())
