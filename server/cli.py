"""The ``mailbroker`` command: serve, dev-pki, keys init.

Operator mistakes (bad config, missing key or certificate, port in use) end with one line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from server import config as config_module
from server.config import Config
from server.errors import ConfigurationError

EXIT_OPERATOR_ERROR = 2


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
    return parser


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
    config = _load(args)
    from server.logging import configure_logging

    configure_logging(config.logging.level, file=config.logging.file)
    prepare_embedded_defaults(config, os.environ)
    asyncio.run(_run(config))
    return 0


async def _run(config: Config) -> None:
    from server.app import start

    # Handlers first: a SIGTERM that arrives while starting up, or just after the banner, still shuts down cleanly.
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    broker = await start(config, environ=os.environ)
    _print_banner(config, broker.port)
    await stop.wait()
    await broker.stop()


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


if __name__ == "__main__":
    sys.exit(main())
