"""Regenerate the committed stubs from protos/ (or, with --check, fail when they are stale).

    python scripts/codegen.py            # rewrite generated/python, generated/ts and generated/go
    python scripts/codegen.py --check    # exit 1 and name the stale files when generated/ differs
    python scripts/codegen.py --proto-deps DIR   # copy the google/* protos we import into DIR (for buf)

Everything runs offline with tools our scripts install: protoc is grpcio-tools' (a pinned dev dependency), the
googleapis protos (google/api, google/rpc) come from the googleapis-common-protos wheel and the well-known types
from grpcio-tools; the TypeScript/JavaScript plugin is npm's @bufbuild/protoc-gen-es (package.json, installed by
`npm ci`); the Go plugins are Debian's protoc-gen-go and protoc-gen-go-grpc (scripts/install-system-deps).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import google.api.field_behavior_pb2
import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
GENERATED = ROOT / "generated"
PACKAGE = Path("mailbroker") / "v1"
GOOGLEAPIS_ROOT = Path(google.api.field_behavior_pb2.__file__).resolve().parents[2]
WELL_KNOWN_ROOT = Path(grpc_tools.__file__).resolve().parent / "_proto"
GOOGLE_DEPS = (
    "google/api/field_behavior.proto",
    "google/api/resource.proto",
    "google/api/launch_stage.proto",
    "google/api/client.proto",
    "google/api/http.proto",
)
# The google/api protos our protos import, generated alongside ours for JavaScript (Python and Go consumers get
# them from googleapis-common-protos and genproto).
TS_GOOGLE_DEPS = ("google/api/field_behavior.proto", "google/api/resource.proto")
PROTOC_GEN_ES = ROOT / "node_modules" / ".bin" / "protoc-gen-es"
GO_PLUGINS = {"go": Path("/usr/bin/protoc-gen-go"), "go-grpc": Path("/usr/bin/protoc-gen-go-grpc")}
GO_MODULE = "mailbroker.dev/generated/go"
PROTOBUF_ES_VERSION = "2.17.0"  # keep equal to @bufbuild/protobuf and @bufbuild/protoc-gen-es in package.json


def proto_files() -> list[str]:
    return [str(p.relative_to(PROTO_ROOT)) for p in sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))]


def _protoc(*args: str) -> None:
    command = ["protoc", f"-I{PROTO_ROOT}", f"-I{GOOGLEAPIS_ROOT}", f"-I{WELL_KNOWN_ROOT}", *args]
    if protoc.main(command) != 0:
        raise SystemExit(f"protoc failed: {' '.join(command)}")


def _need(plugin: Path, installed_by: str) -> None:
    if not plugin.is_file():
        raise SystemExit(f"codegen: {plugin} is missing; {installed_by} installs it")


def generate_python(out: Path) -> None:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto into out/mailbroker/v1."""
    (out / PACKAGE).mkdir(parents=True, exist_ok=True)
    _protoc(f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *proto_files())
    (out / PACKAGE / "__init__.py").write_text('"""Generated gRPC stubs for mailbroker.v1 (do not edit)."""\n')
    (out / PACKAGE / "py.typed").write_text("")


def generate_ts(out: Path) -> None:
    """Write ES modules with TypeScript declarations (*_pb.js, *_pb.d.ts): message schemas and service descriptors
    for @bufbuild/protobuf v2, plus a package.json so Node loads them as ES modules."""
    _need(PROTOC_GEN_ES, "`npm ci` (package.json)")
    out.mkdir(parents=True, exist_ok=True)
    _protoc(
        f"--plugin=protoc-gen-es={PROTOC_GEN_ES}",
        f"--es_out={out}",
        "--es_opt=target=js+dts,import_extension=js",
        *proto_files(),
        *TS_GOOGLE_DEPS,
    )
    package = {
        "name": "@mailbroker/api",
        "version": "0.1.0",
        "description": "Generated stubs for the mailbroker.v1 API (do not edit; scripts/codegen.py writes them)",
        "license": "Apache-2.0",
        "type": "module",
        "exports": {"./*": "./*"},
        "peerDependencies": {"@bufbuild/protobuf": PROTOBUF_ES_VERSION},
    }
    (out / "package.json").write_text(json.dumps(package, indent=2) + "\n")


def generate_go(out: Path) -> None:
    """Write *.pb.go and *_grpc.pb.go into out/mailbroker/v1 (package mailbrokerv1) and a go.mod naming the module."""
    for name, plugin in GO_PLUGINS.items():
        _need(plugin, f"scripts/install-system-deps (Debian's protoc-gen-{name})")
    out.mkdir(parents=True, exist_ok=True)
    _protoc(
        *(f"--plugin=protoc-gen-{name}={plugin}" for name, plugin in GO_PLUGINS.items()),
        f"--go_out={out}",
        "--go_opt=paths=source_relative",
        f"--go-grpc_out={out}",
        "--go-grpc_opt=paths=source_relative",
        *proto_files(),
    )
    (out / "go.mod").write_text(f"module {GO_MODULE}\n\ngo 1.19\n")


# Each language: its output directory, the generator, and the paths inside it that codegen owns (other files
# there, like generated/python's pyproject.toml, are written by hand).
LANGUAGES: dict[str, tuple[Path, Callable[[Path], None], tuple[Path, ...]]] = {
    "python": (GENERATED / "python", generate_python, (PACKAGE,)),
    "ts": (GENERATED / "ts", generate_ts, (Path("mailbroker"), Path("google"), Path("package.json"))),
    "go": (GENERATED / "go", generate_go, (Path("mailbroker"), Path("go.mod"))),
}


def owned_files(root: Path, owned: tuple[Path, ...]) -> set[Path]:
    files: set[Path] = set()
    for path in owned:
        if (root / path).is_file():
            files.add(path)
        elif (root / path).is_dir():
            files |= {p.relative_to(root) for p in (root / path).rglob("*") if p.is_file()}
    return files


def check() -> int:
    stale: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for language, (out, generate, owned) in LANGUAGES.items():
            fresh = Path(tmp) / language
            generate(fresh)
            want, have = owned_files(fresh, owned), owned_files(out, owned)
            differ = want ^ have
            differ |= {p for p in want & have if not filecmp.cmp(fresh / p, out / p, shallow=False)}
            stale += sorted(str((out / p).relative_to(ROOT)) for p in differ)
    if stale:
        print("generated stubs are stale; run `python scripts/codegen.py`:", *stale, sep="\n  ", file=sys.stderr)
        return 1
    print("generated stubs are up to date")
    return 0


def export_proto_deps(dest: Path) -> None:
    """Copy the google/* protos our protos import, so buf can build without a registry."""
    for rel in GOOGLE_DEPS:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(GOOGLEAPIS_ROOT / rel, target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when generated/ is stale")
    parser.add_argument("--proto-deps", type=Path, help="copy imported google/* protos into this directory")
    args = parser.parse_args()
    if args.proto_deps:
        export_proto_deps(args.proto_deps)
        return 0
    if args.check:
        return check()
    for out, generate, owned in LANGUAGES.values():
        for path in owned:
            if (out / path).is_dir():
                shutil.rmtree(out / path)
            else:
                (out / path).unlink(missing_ok=True)
        generate(out)
        print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
