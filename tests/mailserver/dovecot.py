"""A private Dovecot (IMAP + LMTP) run from a temporary directory, for integration tests.

Layout of the temporary directory (mode 0711: Dovecot's unprivileged processes must reach ``mail/``)::

    dovecot.conf    the whole configuration (nothing is read from /etc/dovecot)
    users/<address> one passwd-file per user, written on every change of the user table (root:dovecot 0640)
    tls/            test CA and server certificate, unless the caller brings its own
    run/ state/     base_dir and state_dir
    dovecot.log     everything Dovecot logs
    mail/<address>/Maildir    one home per user, owned by the dovecot user

Dovecot must be installed (``scripts/install-system-deps``) and the tests must run as root: the master process
starts as root and runs the login, auth and mail processes as the dovecot and dovenull users.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType

from imapclient import IMAPClient

from tests.mailserver.maildir import MessageFactory, ensure_folder, folder_path, write_messages
from tests.mailserver.tls import ServerTls
from tests.mailserver.users import MailUsers

HOST = "127.0.0.1"
# Also a loopback address, but one the kernel never picks as the source of a connection to it (127.0.0.1 is), so
# Dovecot does not count the connection as "secured" (remote IP = local IP) and applies its TLS rules.
INSECURE_HOST = "127.0.0.2"
SPECIAL_USE_FOLDERS = {
    "Sent": "\\Sent",
    "Drafts": "\\Drafts",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
    "Archive": "\\Archive",
}
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
_START_ATTEMPTS = 3  # free ports are picked before Dovecot binds them: another process may take one meanwhile

_CONFIG = """\
# Written by tests/mailserver/dovecot.py for one test run.
base_dir = {run_dir}
state_dir = {state_dir}
log_path = {log_path}
info_log_path = {log_path}
instance_name = {instance_name}
protocols = imap lmtp
listen = {host}

default_login_user = dovenull
default_internal_user = dovecot
default_internal_group = dovecot
first_valid_uid = 1

ssl = {ssl}
ssl_cert = <{cert_path}
ssl_key = <{key_path}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = {disable_plaintext_auth}
auth_mechanisms = plain login
# Tests of a wrong password should not wait the default 2 s (Dovecot still answers a failure after up to 0.5 s:
# its timer for delayed failures runs every 500 ms).
auth_failure_delay = 0
auth_cache_size = 0

passdb {{
  driver = passwd-file
  # One file per user: Dovecot looks at a passwd-file at most once a second, so a user added to a shared file
  # in the same second as another lookup would stay unknown until the next second.
  args = scheme=PLAIN username_format=%u {users_dir}/%u
}}
userdb {{
  driver = static
  args = uid={mail_user} gid={mail_group} home={mail_dir}/%u
}}

mail_location = maildir:~/Maildir
# Durability is not what tests need; speed is.
mail_fsync = never
# Dovecot watches the mailbox with inotify while a client IDLEs; this is only the fallback poll.
mailbox_idle_check_interval = 1 secs

namespace inbox {{
  inbox = yes
{special_use_mailboxes}
}}

# Tests may hold many connections at once (feeds, pools): one login process serves them all ("high-performance"
# mode; the default starts a process per connection, 100 at most), and a user may have many sessions from one IP.
service imap-login {{
  service_count = 0
  process_min_avail = 1
  inet_listener imap {{
    address = {host}, {insecure_host}
    port = {starttls_port}
  }}
  inet_listener imaps {{
    address = {host}, {insecure_host}
    port = {imap_port}
    ssl = yes
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = {host}
    port = {lmtp_port}
  }}
}}
service imap {{
  process_limit = 1024
}}
protocol imap {{
  mail_max_userip_connections = 1000
}}
# No auth penalty (the documented way to turn it off): after a failed login from an IP, Dovecot would otherwise
# delay that IP's next logins by 2, 4, 8 then 15 s, and tests of wrong passwords all come from 127.0.0.1.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
# No statistics: a process still waiting for the stats service's handshake when the master stops (as the port
# probes at start-up can leave one) holds the stop up for 5 s.
stats_writer_socket_path =
"""

_MAILBOX = """\
  mailbox {name} {{
    special_use = {flag}
    auto = subscribe
  }}"""


class DovecotError(RuntimeError):
    """Dovecot did not start, or a delivery to it failed."""


class Dovecot:
    """A private Dovecot serving IMAPS, IMAP with STARTTLS and LMTP on free ports of 127.0.0.1.

    ``allow_plaintext_auth=False`` (the default) sets ``ssl = required``; ``True`` sets ``ssl = yes`` and
    ``disable_plaintext_auth = no``, so that a client may log in on the STARTTLS port without starting TLS. Note
    that Dovecot counts a connection whose remote address equals its local address as secured, and 127.0.0.1 to
    127.0.0.1 is such a connection: see :attr:`insecure_host` for an address from which it is not.

    Use as a context manager, or call :meth:`stop`; an instance that is garbage collected or still running at
    interpreter exit is stopped too. Two instances may run at once.
    """

    host = HOST
    insecure_host = INSECURE_HOST

    def __init__(
        self,
        *,
        users: MailUsers | None = None,
        tls: ServerTls | None = None,
        allow_plaintext_auth: bool = False,
        directory: Path | None = None,
        extra_config: str = "",
    ) -> None:
        """Start Dovecot; return once all three ports answer (raises DovecotError if they do not within 10 s).

        ``extra_config`` is appended to the generated dovecot.conf: a later setting wins, and a section named again
        (``service imap { ... }``) is merged with the earlier one (bench/ raises limits for 1,000 IDLE connections).
        """
        executable = shutil.which("dovecot") or ("/usr/sbin/dovecot" if Path("/usr/sbin/dovecot").exists() else None)
        if executable is None:
            raise DovecotError("dovecot is not installed: run scripts/install-system-deps as root")
        if os.geteuid() != 0:
            raise DovecotError("the test Dovecot must be started as root (its processes then drop to dovecot/dovenull)")
        self.users = users if users is not None else MailUsers()
        self.allow_plaintext_auth = allow_plaintext_auth
        self.extra_config = extra_config
        self._owns_directory = directory is None
        self.directory = (
            Path(tempfile.mkdtemp(prefix="mailbroker-dovecot-", dir=_fast_tmp())) if directory is None else directory
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[..., Dovecot] | None = None
        self.mail_dir = self.directory / "mail"
        self.run_dir = self.directory / "run"
        self.state_dir = self.directory / "state"
        self.log_path = self.directory / "dovecot.log"
        self.stderr_path = self.directory / "dovecot.stderr"
        self.config_path = self.directory / "dovecot.conf"
        self.users_dir = self.directory / "users"
        self._mail_uid = pwd.getpwnam("dovecot").pw_uid
        self._mail_gid = grp.getgrnam("dovecot").gr_gid
        self._written_users: dict[str, tuple[str, int]] = {}
        """Address -> (password, mtime) of each passwd-file written."""
        self._users_lock = threading.Lock()
        self.imap_port = self.starttls_port = self.lmtp_port = 0
        self.start_seconds = 0.0
        """How long the last start took, from spawning Dovecot to all ports answering."""

        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.directory.chmod(0o711)
            self.tls = tls if tls is not None else ServerTls.create(self.directory / "tls")
            for path in (self.mail_dir, self.state_dir):
                path.mkdir(mode=0o750, exist_ok=True)
            os.chown(self.mail_dir, self._mail_uid, self._mail_gid)
            self.users_dir.mkdir(mode=0o750)
            os.chown(self.users_dir, 0, self._mail_gid)
            self.users.subscribe(self._write_users)
            self._start(executable)
        except BaseException:
            self.stop()
            raise

    # -- life cycle -----------------------------------------------------------------------------------------------

    def _start(self, executable: str, *, same_ports: bool = False) -> None:
        for attempt in range(1, _START_ATTEMPTS + 1):
            if not same_ports:
                self.imap_port, self.starttls_port, self.lmtp_port = _free_ports(3)
            self.config_path.write_text(self._config() + self.extra_config)
            log_start = {path: _size(path) for path in (self.stderr_path, self.log_path)}
            started = time.monotonic()
            # -F keeps the master (the pid in run/master.pid) in the foreground as our child, so that stop() can
            # wait for it; its own session keeps a Ctrl-C meant for pytest from reaching it before stop() does.
            with self.stderr_path.open("ab") as stderr:
                process = subprocess.Popen(
                    [executable, "-F", "-c", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                    start_new_session=True,
                )
            self._process = process
            owned = self.directory if self._owns_directory else None
            self._finalizer = weakref.finalize(self, _cleanup, process, owned)
            if self._wait_until_ready(process, started + START_TIMEOUT):
                self.start_seconds = time.monotonic() - started
                return
            self._stop_process()
            log = self._log_since(log_start)
            if attempt < _START_ATTEMPTS and "Address already in use" in log:
                continue
            raise DovecotError(f"Dovecot did not start (log follows):\n{log}".rstrip())

    def _wait_until_ready(self, process: subprocess.Popen[bytes], deadline: float) -> bool:
        """Wait until each port answers with its greeting (IMAPS after a verified TLS handshake)."""
        # A greeting, not just an accepted connection: the login and LMTP processes that the probes start have then
        # read their configuration. One still reading it when the master stops would hold the stop up for 6 s.
        probes = [
            (self.imap_port, True, b"* OK"),
            (self.starttls_port, False, b"* OK"),
            (self.lmtp_port, False, b"220"),
        ]
        context = self.tls.client_context()
        while probes and time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            port, implicit_tls, greeting = probes[0]
            if _greets(self.host, port, greeting, context if implicit_tls else None):
                probes.pop(0)
            else:
                time.sleep(0.01)
        return not probes

    def stop(self) -> None:
        """Stop Dovecot (its master process and so all of its children) and remove the temporary directory."""
        self.users.unsubscribe(self._write_users)
        self._stop_process()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def kill(self) -> None:
        """Kill the master and every Dovecot process (connections drop), keeping mail and ports for restart()."""
        self._stop_process()

    def restart(self) -> None:
        """Start again on the same ports after kill(): clients see an outage, then the same server."""
        executable = shutil.which("dovecot") or "/usr/sbin/dovecot"
        self._start(executable, same_ports=True)

    def _stop_process(self) -> None:
        process, self._process = self._process, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if process is not None:
            _terminate(process)

    @property
    def running(self) -> bool:
        """True while the Dovecot master process runs."""
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> Dovecot:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # -- users ----------------------------------------------------------------------------------------------------

    def add_user(self, address: str, password: str) -> None:
        """Add a mail user (or change their password: that takes up to a second, see _write_users)."""
        self.users.add(address, password)

    def _write_users(self, passwords: dict[str, str]) -> None:
        """Bring the passwd-files (one per user) in line with the user table."""
        with self._users_lock:
            replaced = False
            for address, password in passwords.items():
                previous = self._written_users.get(address)
                if previous is not None and previous[0] == password:
                    continue
                # Dovecot re-reads a file whose mtime (whole seconds) or size changed: a new password of the same
                # length must come with a later mtime.
                stamp = max(int(time.time()), previous[1] + 1 if previous else 0)
                self._write_user_file(address, password, stamp)
                self._written_users[address] = (password, stamp)
                replaced = replaced or previous is not None
            for address in set(self._written_users) - set(passwords):
                (self.users_dir / address).unlink(missing_ok=True)
                del self._written_users[address]
                replaced = True
            if replaced:
                # Dovecot looks at each file at most once a second (not configurable): a change to a file it looked
                # at in this second would go unseen until the next one, so wait for that.
                time.sleep(1.01 - time.time() % 1)

    def _write_user_file(self, address: str, password: str, stamp: int) -> None:
        tmp = self.users_dir / f".{address}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.fchown(fd, 0, self._mail_gid)
            os.write(fd, f"{address}:{{PLAIN}}{password}\n".encode())
            os.utime(fd, (stamp, stamp))
        finally:
            os.close(fd)
        tmp.replace(self.users_dir / address)

    def home(self, address: str) -> Path:
        """Return the home directory of a user (it holds ``Maildir``)."""
        # Dovecot lowercases user names (auth_username_format = %Lu) before it expands home=.../%u.
        return self.mail_dir / address.lower()

    # -- mail -----------------------------------------------------------------------------------------------------

    def deliver(self, recipient: str | Sequence[str], raw: bytes, *, mail_from: str = "sender@example.test") -> None:
        """Deliver a message over LMTP, as an MTA would; raises DovecotError if any recipient is refused."""
        recipients = [recipient] if isinstance(recipient, str) else list(recipient)
        try:
            with smtplib.LMTP(self.host, self.lmtp_port, timeout=10) as lmtp:
                refused = lmtp.sendmail(mail_from, recipients, raw)
        except smtplib.SMTPException as exc:
            raise DovecotError(f"LMTP delivery failed: {exc}") from exc
        if refused:
            raise DovecotError(f"LMTP refused recipients: {refused}")

    def imap(self, address: str, *, timeout: float = 10) -> IMAPClient:
        """Return an IMAPClient logged in as ``address`` over implicit TLS (the CA is verified); log out when done."""
        client = IMAPClient(
            self.host, port=self.imap_port, ssl=True, ssl_context=self.tls.client_context(), timeout=timeout
        )
        try:
            client.login(address, self._password(address))
        except BaseException:
            with contextlib.suppress(Exception):
                client.shutdown()
            raise
        return client

    def append(
        self,
        address: str,
        folder: str,
        raw: bytes,
        flags: Iterable[str] = (),
        internal_date: datetime | None = None,
    ) -> int:
        """Append a message to a user's folder over IMAP and return its UID."""
        with self.imap(address) as client:
            response = client.append(folder, raw, flags=tuple(flags), msg_time=internal_date)
        match = re.search(rb"\[APPENDUID \d+ (\d+)\]", response)
        if match is None:
            raise DovecotError(f"APPEND answered without APPENDUID: {response!r}")
        return int(match.group(1))

    def bulk_fill(self, address: str, folder: str, count: int, factory: MessageFactory) -> None:
        """Write ``count`` messages made by ``factory(i)`` straight into a user's Maildir folder.

        Much faster than APPEND for large folders; Dovecot indexes the files when a client next opens the folder.
        ``folder`` is "INBOX" or a folder name as IMAP shows it (hierarchy separator "."); it is created if missing.
        """
        if address not in self.users:
            raise DovecotError("bulk_fill: no such user")
        maildir = self.home(address) / "Maildir"
        for directory in (self.home(address), maildir):
            if not directory.exists():
                directory.mkdir(mode=0o700)
                os.chown(directory, self._mail_uid, self._mail_gid)
        ensure_folder(maildir, self._mail_uid, self._mail_gid, is_inbox=True)
        path = folder_path(maildir, folder)
        ensure_folder(path, self._mail_uid, self._mail_gid, is_inbox=path == maildir)
        write_messages(path, count, factory, self._mail_uid, self._mail_gid)

    # -- internals ------------------------------------------------------------------------------------------------

    def _password(self, address: str) -> str:
        password = self.users.password(address)
        if password is None:
            raise DovecotError("no such user")
        return password

    def _config(self) -> str:
        return _CONFIG.format(
            run_dir=self.run_dir,
            state_dir=self.state_dir,
            log_path=self.log_path,
            instance_name=f"mailbroker-test-{self.directory.name}",
            host=self.host,
            insecure_host=self.insecure_host,
            ssl="yes" if self.allow_plaintext_auth else "required",
            disable_plaintext_auth="no" if self.allow_plaintext_auth else "yes",
            cert_path=self.tls.cert_path,
            key_path=self.tls.key_path,
            users_dir=self.users_dir,
            mail_user="dovecot",
            mail_group="dovecot",
            mail_dir=self.mail_dir,
            special_use_mailboxes="\n".join(
                _MAILBOX.format(name=name, flag=flag) for name, flag in SPECIAL_USE_FOLDERS.items()
            ),
            imap_port=self.imap_port,
            starttls_port=self.starttls_port,
            lmtp_port=self.lmtp_port,
        )

    def _log_since(self, offsets: dict[Path, int]) -> str:
        """Return what Dovecot wrote to its stderr and its log file since they had the sizes in ``offsets``."""
        text = b""
        for path, offset in offsets.items():
            with contextlib.suppress(OSError):
                text += path.read_bytes()[offset:]
        return text.decode(errors="replace")


def _fast_tmp() -> str | None:
    """Return a memory-backed directory for temporary files if there is one (None: the default temp directory)."""
    # Creating a file costs about 200 us on this machine's ext4 and 15 us on tmpfs: 100,000 messages take 20 s
    # rather than 2 s to write.
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None


def _greets(host: str, port: int, greeting: bytes, context: ssl.SSLContext | None) -> bool:
    """Return True if the server on ``port`` answers a new connection with ``greeting`` (over TLS if ``context``)."""
    try:
        with socket.create_connection((host, port), timeout=1) as raw:
            if context is None:
                return raw.recv(256).startswith(greeting)
            with context.wrap_socket(raw, server_hostname=host) as tls:
                return tls.recv(256).startswith(greeting)
    except OSError:
        return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _cleanup(process: subprocess.Popen[bytes], directory: Path | None) -> None:
    """Stop a Dovecot that nobody stopped (its object was collected, or the interpreter is exiting)."""
    _terminate(process)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """Stop a Dovecot master (SIGTERM: it stops its children first) and wait; SIGKILL its group after a timeout."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        # The whole process group: children that outlived a killed master would keep the ports.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
