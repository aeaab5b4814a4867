"""The ``mailbroker`` command: serve, dev-pki, keys init/rotate/status/retire, audit verify.

Operator mistakes (bad config, missing key or certificate, port in use) end with one line on stderr and exit
status 2, never a traceback. A check that finds a problem (``audit verify`` on a broken chain, ``keys retire`` of
a version still in use) exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from server import config as config_module
from server.config import Config
from server.errors import ConfigurationError

if TYPE_CHECKING:
    from server.app import Broker
    from server.policy_watch import PolicyFileWatch
    from server.store.rotation import KekUsage

EXIT_CHECK_FAILED = 1
EXIT_OPERATOR_ERROR = 2
# `audit verify` re-reads when only the anchor disagrees, since an append can land between reading the log and
# reading the anchor; a real break persists.
VERIFY_ATTEMPTS = 3
SYSTEM_ACTOR = "system"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
        return result
    except ConfigurationError as exc:
        print(f"mailbroker: error: {exc}", file=sys.stderr)
    except PermissionError as exc:
        print(f"mailbroker: error: permission denied: {exc.filename}", file=sys.stderr)
    except OSError as exc:
        print(f"mailbroker: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return EXIT_OPERATOR_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailbroker", description="A security-first email broker (gRPC, mTLS).")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the broker")
    serve.add_argument("--config", type=Path, help="TOML config file (default: embedded defaults)")
    serve.add_argument("--data-dir", type=Path, help="where the embedded defaults live (default: ./var)")
    serve.add_argument("--listen", help="HOST:PORT to listen on (default: 127.0.0.1:50051)")
    serve.set_defaults(run=_serve)

    pki = commands.add_parser("dev-pki", help="make (or extend) a development PKI")
    pki.add_argument("--out", type=Path, required=True, help="directory for the CA, server and client files")
    pki.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME",
        help="a client identity to issue (spiffe://mailbroker.dev/NAME); repeatable",
    )
    pki.set_defaults(run=_dev_pki)

    keys = commands.add_parser("keys", help="manage the key-encryption keyring")
    key_commands = keys.add_subparsers(required=True, metavar="ACTION")
    init = key_commands.add_parser("init", help="create a new key file (0600)")
    init.add_argument("--file", type=Path, help="where (default: DATA_DIR/keys.json)")
    init.add_argument("--data-dir", type=Path, help="data directory (default: ./var)")
    init.set_defaults(run=_keys_init)
    rotate = key_commands.add_parser(
        "rotate", help="add a new current KEK version and rewrap every data key with it (online)"
    )
    _store_options(rotate)
    rotate.set_defaults(run=_keys_rotate)
    status = key_commands.add_parser("status", help="show how many data keys and OAuth states each KEK version wraps")
    _store_options(status)
    status.set_defaults(run=_keys_status)
    retire = key_commands.add_parser(
        "retire", help="remove a KEK version from the key file once nothing is wrapped by it"
    )
    retire.add_argument("version", type=int, metavar="VERSION")
    _store_options(retire)
    retire.set_defaults(run=_keys_retire)

    audit = commands.add_parser("audit", help="the tamper-evident audit log")
    audit_commands = audit.add_subparsers(required=True, metavar="ACTION")
    verify = audit_commands.add_parser("verify", help="check the hash chain and its anchor; exit 1 on a broken link")
    _store_options(verify)
    verify.set_defaults(run=_audit_verify)
    return parser


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (default: embedded defaults)")
    parser.add_argument("--data-dir", type=Path, help="where the embedded defaults live (default: ./var)")


def _load(args: argparse.Namespace) -> Config:
    overrides = {"data_dir": getattr(args, "data_dir", None), "server.listen": getattr(args, "listen", None)}
    return config_module.load(getattr(args, "config", None), environ=os.environ, overrides=overrides)


def _ensure_data_dir(config: Config) -> None:
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


def prepare_embedded_defaults(config: Config, environ: dict[str, str] | os._Environ[str]) -> None:
    """Create what the embedded defaults need on first run: the data dir, the dev PKI, the key file.

    A key file is generated only for a brand-new store: if the database exists and its key file does not, the
    keys are lost or misplaced, and starting with a new key would orphan every secret. Fail closed instead.
    """
    from server.crypto.keyring import generate_key_file
    from server.pki import create_dev_pki

    _ensure_data_dir(config)
    if config.uses_dev_pki:
        create_dev_pki(config.dev_pki_dir)
    default_store = not config.store.url
    if config.keys.file is None and "MAILBROKER_KEKS" not in environ and not config.keyring_file.exists():
        database = config.data_dir / "mailbroker.db"
        if default_store and database.exists():
            raise ConfigurationError(
                f"the store {database} exists but its key file {config.keyring_file} is missing; refusing to start"
            )
        generate_key_file(config.keyring_file)


def _serve(args: argparse.Namespace) -> int:
    from server.policy_watch import PolicyFileWatch

    running: list[Broker] = []
    path: Path | None = getattr(args, "config", None)
    # Made before the file is loaded, so the content it starts from is not newer than the one in force.
    watch = PolicyFileWatch(path, lambda: _reload_policy(running, lambda: _load(args))) if path else None
    config = _load(args)
    from server.logging import configure_logging

    configure_logging(config.logging.level, file=config.logging.file)
    prepare_embedded_defaults(config, os.environ)
    if config.policy.watch_interval_seconds <= 0:
        watch = None  # 0 turns the watch off; SIGHUP still reloads
    with asyncio.Runner(loop_factory=event_loop_factory(config.server.event_loop)) as runner:
        runner.run(_run(config, lambda: _load(args), watch=watch, running=running))
    return 0


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the configured event loop (None: asyncio's default)."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ConfigurationError('server.event_loop = "uvloop" needs the uvloop package') from None
        return uvloop.new_event_loop
    return None


async def _run(
    config: Config,
    reload: Callable[[], Config] | None = None,
    *,
    watch: PolicyFileWatch | None = None,
    running: list[Broker] | None = None,
) -> None:
    from server.app import start

    # Handlers first: a SIGTERM that arrives while starting up, or just after the banner, still shuts down cleanly.
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = running if running is not None else []
    # SIGHUP reloads [policy] from the same file, environment and flags; its default action would end the process.
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload_policy(running, reload))
    try:
        broker = await start(config, environ=os.environ)
        running.append(broker)
        if watch is not None:
            # The file watch reloads the same way when the config file changes ([policy] watch_interval_seconds).
            watch.start(config.policy.watch_interval_seconds)
        _print_banner(config, broker.port)
        await stop.wait()
        if watch is not None:
            await watch.stop()
        await broker.stop()
    finally:
        # Handed back while the loop runs (uvloop restores nothing once closed): a second SIGTERM or ^C during the
        # interpreter's exit (threads finishing a blocking call) then ends the process, and a late SIGHUP is ignored.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _reload_policy(running: list[Broker], reload: Callable[[], Config] | None) -> None:
    """Reload the policy; a config that does not load or a policy that does not hold is refused in one log line
    (positions and setting names, never an identity) and the policy in force stays."""
    import logging

    log = logging.getLogger("mailbroker.cli")
    if not running or reload is None:
        log.warning("policy reload ignored: the broker is not serving yet", extra={"event": "policy_reload_ignored"})
        return
    try:
        running[0].reload_policy(reload())
    except ConfigurationError as exc:
        log.error(
            "policy reload refused, the previous policy stays in force: %s",
            exc,
            extra={"event": "policy_reload_refused"},
        )
        return
    log.info("policy reloaded", extra={"event": "policy_reloaded"})


def _print_banner(config: Config, port: int) -> None:
    host = config.server.listen.rpartition(":")[0].strip("[]")
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - only choosing what to print
        host = "127.0.0.1"
    target = f"{host}:{port}"
    lines = [f"mailbroker is serving on {target} (mutual TLS)", f"  data directory: {config.data_dir.resolve()}"]
    if config.uses_dev_pki:
        pki = config.dev_pki_dir.resolve()
        grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
        base = [
            grpcurl,
            "-cacert",
            str(pki / "ca.pem"),
            "-cert",
            str(pki / "client.pem"),
            "-key",
            str(pki / "client-key.pem"),
        ]
        lines += [
            f"  dev client certificate: {pki / 'client.pem'} (key {pki / 'client-key.pem'}, CA {pki / 'ca.pem'})",
            "  try:",
            "    " + shlex.join([*base, target, "list"]),
            "    " + shlex.join([*base, "-d", "{}", target, "mailbroker.v1.AccountService/ListAccounts"]),
        ]
    print("\n".join(lines), flush=True)


def _dev_pki(args: argparse.Namespace) -> int:
    from server.pki import create_dev_pki

    clients = tuple(dict.fromkeys(["client", *args.client]))
    pki = create_dev_pki(args.out, clients)
    print(f"dev PKI in {pki.directory}: CA {pki.ca}, server {pki.server_cert}")
    for name, (cert, key) in pki.clients.items():
        print(f"  client {name}: spiffe://{config_module.DEV_TRUST_DOMAIN}/{name} -> {cert} (key {key})")
    return 0


def _keys_init(args: argparse.Namespace) -> int:
    from server.crypto.keyring import generate_key_file

    path = args.file
    if path is None:
        data_dir = args.data_dir or config_module.DEFAULT_DATA_DIR
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = data_dir / "keys.json"
    generate_key_file(path)
    print(f"wrote a new key file {path} (mode 0600); back it up: without it the store cannot be read")
    return 0


class _StoreAccess:
    """What the offline commands need: the engine, the keyring that follows the key file, and a Store."""

    def __init__(self, config: Config) -> None:
        from server.crypto.keyring import load_keyring
        from server.store.audit_anchor import AuditAnchor
        from server.store.engine import create_engine
        from server.store.repository import Store

        if not config.store.url and not (config.data_dir / "mailbroker.db").exists():
            raise ConfigurationError(f"no store at {config.data_dir / 'mailbroker.db'}")
        self.config = config
        self.keyring = load_keyring(config.keyring_file, os.environ)
        self.engine = create_engine(config.store_url)
        self.anchor = AuditAnchor(config.audit_anchor_file, self.keyring)
        self.store = Store(self.engine, self.keyring, audit_anchor=self.anchor)

    def close(self) -> None:
        self.engine.dispose()


def _key_file_for_rotation(config: Config) -> Path:
    if os.environ.get("MAILBROKER_KEKS", "").strip():
        raise ConfigurationError(
            "the keys come from MAILBROKER_KEKS: add a version there and restart; online rotation needs a key file"
        )
    return config.keyring_file


def _keys_rotate(args: argparse.Namespace) -> int:
    from server.crypto.keyring import KeyFileKeyring, add_key_version
    from server.store.rotation import kek_usage, rewrap_data_keys

    config = _load(args)
    key_file = _key_file_for_rotation(config)
    access = _StoreAccess(config)  # checks the store and the key file before anything changes
    try:
        version = add_key_version(key_file)
        print(f"added key-encryption key version {version} to {key_file}; it is now current")
        # Running brokers look at the key file at most once per check interval: once it has passed, none wraps a
        # new data key with the old version, so the rewrap below leaves none behind.
        time.sleep(KeyFileKeyring.check_interval_seconds + 0.1)
        rewrapped = rewrap_data_keys(access.engine, access.keyring)
        usage = kek_usage(access.engine)
        held = sorted(access.keyring.keys)
        access.store.append_audit_event(
            "key_rotated", "", SYSTEM_ACTOR, "", {"kek_version": version, "rewrapped_data_keys": rewrapped}
        )
    finally:
        access.close()
    print(f"rewrapped {rewrapped} data key(s) with version {version}")
    _print_usage(usage, version, held)
    return 0


def _keys_status(args: argparse.Namespace) -> int:
    from server.store.rotation import kek_usage

    access = _StoreAccess(_load(args))
    try:
        usage = kek_usage(access.engine)
        current, _ = access.keyring.current()
        held = sorted(access.keyring.keys)
    finally:
        access.close()
    print(f"key file versions: {', '.join(map(str, held))} (current {current})")
    _print_usage(usage, current, held)
    unknown = sorted((set(usage.data_keys) | set(usage.oauth_states)) - set(held))
    if unknown:
        print(f"warning: rows wrapped by version(s) the key file does not hold: {', '.join(map(str, unknown))}")
        return EXIT_CHECK_FAILED
    return 0


def _print_usage(usage: KekUsage, current: int, held: Iterable[int]) -> None:
    versions = sorted(set(usage.data_keys) | set(usage.oauth_states) | set(held) | {current})
    print(f"{'version':>7}  {'data keys':>9}  {'oauth states':>12}")
    for version in versions:
        mark = "  (current)" if version == current else ""
        print(f"{version:>7}  {usage.data_keys.get(version, 0):>9}  {usage.oauth_states.get(version, 0):>12}{mark}")


def _keys_retire(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from server.crypto.keyring import remove_key_version
    from server.store.rotation import delete_expired_oauth_states, kek_usage

    config = _load(args)
    key_file = _key_file_for_rotation(config)
    version: int = args.version
    access = _StoreAccess(config)
    try:
        current, _ = access.keyring.current()
        if version == current:
            print(f"mailbroker: refusing: version {version} is the current key; rotate first", file=sys.stderr)
            return EXIT_CHECK_FAILED
        delete_expired_oauth_states(access.engine, version, datetime.now(UTC))
        usage = kek_usage(access.engine)
        if usage.total(version):
            print(
                f"mailbroker: refusing: version {version} still wraps {usage.data_keys.get(version, 0)} data key(s)"
                f" and {usage.oauth_states.get(version, 0)} pending OAuth state(s); run `mailbroker keys rotate`"
                " (OAuth states expire on their own)",
                file=sys.stderr,
            )
            return EXIT_CHECK_FAILED
        remove_key_version(key_file, version)
        access.store.append_audit_event("key_rotated", "", SYSTEM_ACTOR, "", {"retired_kek_version": version})
    finally:
        access.close()
    print(f"retired key-encryption key version {version}: removed from {key_file}; it can no longer decrypt")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from server.store.audit import verify_chain
    from server.store.audit_anchor import AnchorError, check_anchor

    access = _StoreAccess(_load(args))
    try:
        for _attempt in range(VERIFY_ATTEMPTS):
            with access.engine.connect() as connection:  # one read transaction: one consistent snapshot
                head, broken = verify_chain(connection)
                if broken is not None:
                    break
                try:
                    anchored = access.anchor.read()
                except AnchorError as exc:
                    print(f"audit log: NOT VERIFIED: {exc}")
                    return EXIT_CHECK_FAILED
                broken = check_anchor(connection, head, anchored)
            if broken is None:
                break
            time.sleep(0.2)  # let an append in flight finish updating the anchor
    finally:
        access.close()
    if broken is None:
        print(f"audit log: intact, {head.sequence} event(s), head digest {head.digest}")
        return 0
    where = "at the end of the log" if broken.sequence is None else f"at sequence {broken.sequence}"
    event = f" (event {broken.event_id})" if broken.event_id else ""
    print(f"audit log: BROKEN {where}{event}: {broken.problem}")
    return EXIT_CHECK_FAILED


if __name__ == "__main__":
    sys.exit(main())
