"""Generate the committed Python gRPC stubs from ``protos/``.

The stubs live in the SDK package, under ``metarec/api/`` (``metarec.api.v1.recommender_pb2``
and ``recommender_pb2_grpc``): they are the API contract that the client and the service both
import, so the SDK never imports the service for them. They are committed rather than built at
install time: installing metarec then needs no protoc, and ``tests/test_server_protos.py``
regenerates them into a temporary folder and compares byte for byte, so a stale stub fails the
test suite.

protoc writes the files under the proto package's path (``metarec/v1/``) with imports that
follow it (``from metarec.v1 import ...``). Generation moves them under ``metarec/api/``
(``protos/metarec/v1/x.proto`` becomes ``metarec/api/v1/x_pb2.py``) and rewrites those imports
to ``metarec.api.v1``; the comparison test applies the same steps. The descriptors keep their
proto file names (``metarec/v1/recommender.proto``), so the wire format and reflection are
unchanged.

Usage: ``python -m metarec_server.codegen`` (needs ``grpcio-tools``).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
GENERATED_ROOT = REPO_ROOT / "metarec" / "api"
PROTO_PACKAGE = "metarec"  # every .proto file lives under protos/metarec/
PACKAGE = "metarec.api"  # ... and its Python module under metarec/api/

# Matches the import lines protoc emits for other generated modules of this repository.
_IMPORT_RE = re.compile(r"^from metarec\.(v\d+) import ", re.MULTILINE)
_MARKER = '"""The gRPC API contract, generated from protos/ by metarec_server.codegen."""\n'


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every ``.proto`` file of the API, relative to ``proto_root``, in a stable order."""
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc, move the modules into ``out_dir`` and rewrite imports; return the files written.

    ``out_dir`` is the folder of the ``metarec.api`` package; the paths returned are relative
    to it (``v1/recommender_pb2.py``, ...).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = proto_files(proto_root)
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root}")
    outside = [str(p) for p in protos if p.parts[0] != PROTO_PACKAGE]
    if outside:
        raise ValueError(f"every .proto file must be under {proto_root / PROTO_PACKAGE}: {outside}")
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp)
        args = [
            f"-I{proto_root}",
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            f"--grpc_python_out={raw}",
            *(str(p) for p in protos),
        ]
        # protoc runs in its own process: in-process it shares the protobuf C++ runtime with
        # whatever else is loaded (TensorFlow bundles one) and can crash the interpreter.
        done = subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"protoc failed ({done.returncode}): {done.stderr.strip()}")
        raw_package = raw / PROTO_PACKAGE
        for path in sorted(raw_package.rglob("*.py*")):
            if path.suffix not in (".py", ".pyi"):
                continue
            rel = path.relative_to(raw_package)
            target = out_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            text = _IMPORT_RE.sub(rf"from {PACKAGE}.\1 import ", path.read_text())
            target.write_text(text)
            written.append(rel)
    # Package markers so the generated modules import as metarec.api.v1.*
    for directory in sorted({out_dir / p.parent for p in written} | {out_dir}):
        while True:
            init = directory / "__init__.py"
            if not init.exists():
                init.write_text(_MARKER)
                written.append(init.relative_to(out_dir))
            if directory == out_dir:
                break
            directory = directory.parent
    return sorted(set(written))


def stale_files(generated_root: Path = GENERATED_ROOT) -> list[str]:
    """Names of committed stubs that differ from a fresh generation (empty when current)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        fresh = generate(fresh_root)
        stale = []
        for rel in fresh:
            committed = generated_root / rel
            if not committed.exists() or committed.read_bytes() != (fresh_root / rel).read_bytes():
                stale.append(str(rel))
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale stubs")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name}")
        return 1 if stale else 0
    for rel in generate(GENERATED_ROOT):
        print(GENERATED_ROOT / rel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
