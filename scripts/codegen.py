"""Regenerate the committed stubs from protos/ (or, with --check, fail when they are stale).

    python scripts/codegen.py            # rewrite generated/python
    python scripts/codegen.py --check    # exit 1 and name the stale files when generated/ differs
    python scripts/codegen.py --proto-deps DIR   # copy the google/* protos we import into DIR (for buf)

The googleapis protos (google/api, google/rpc) come from the googleapis-common-protos wheel and the well-known
types from grpcio-tools, so this works offline with the pinned dev dependencies.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import google.api.field_behavior_pb2
import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PYTHON_OUT = ROOT / "generated" / "python"
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


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))


def generate_python(out: Path) -> None:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto into out/mailbroker/v1."""
    (out / PACKAGE).mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{GOOGLEAPIS_ROOT}",
        f"-I{WELL_KNOWN_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out / PACKAGE / "__init__.py").write_text('"""Generated gRPC stubs for mailbroker.v1 (do not edit)."""\n')
    (out / PACKAGE / "py.typed").write_text("")


def generated_files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in (root / PACKAGE).glob("*") if p.is_file()}


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate_python(fresh)
        want, have = generated_files(fresh), generated_files(PYTHON_OUT)
        stale = sorted(str(p) for p in want ^ have)
        stale += sorted(str(p) for p in want & have if not filecmp.cmp(fresh / p, PYTHON_OUT / p, shallow=False))
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
    shutil.rmtree(PYTHON_OUT / PACKAGE, ignore_errors=True)
    generate_python(PYTHON_OUT)
    print(f"wrote {PYTHON_OUT.relative_to(ROOT) / PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
