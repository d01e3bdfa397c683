"""The committed gRPC stubs (``metarec/api/v1/``) are current, import without Keras or the service."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from metarec_server import codegen

ROOT = Path(__file__).resolve().parent.parent

# Looked up, not imported: protoc runs in a subprocess (see metarec_server.codegen).
needs_protoc = pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools is not installed"
)


@needs_protoc
def test_committed_stubs_match_a_fresh_generation():
    stale = codegen.stale_files()
    assert stale == [], (
        f"stale generated stubs {stale}: run `python -m metarec_server.codegen` and commit"
    )


@needs_protoc
def test_generation_writes_every_committed_file(tmp_path):
    written = {str(p) for p in codegen.generate(tmp_path)}
    committed = {
        str(p.relative_to(codegen.GENERATED_ROOT))
        for p in codegen.GENERATED_ROOT.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert committed == written


def test_stubs_live_in_the_sdk_package():
    assert codegen.GENERATED_ROOT == ROOT / "metarec" / "api"
    assert (codegen.GENERATED_ROOT / "v1" / "recommender_pb2.py").is_file()
    assert not (ROOT / "server" / "_generated").exists()


def test_generated_imports_point_at_the_stubs_new_location():
    # protoc writes "from metarec.v1 import ..."; generation rewrites it to metarec.api.v1.
    grpc_module = (codegen.GENERATED_ROOT / "v1/recommender_pb2_grpc.py").read_text()
    assert "\nfrom metarec.api.v1 import recommender_pb2 as " in grpc_module
    assert "\nfrom metarec.v1 import" not in grpc_module
    assert "server" not in "".join(
        line for line in grpc_module.splitlines() if line.startswith(("import ", "from "))
    )


def test_stubs_import_without_keras_or_the_service(tmp_path):
    # The stubs are the API contract: importing them loads neither Keras (the metarec package
    # imports its names lazily) nor the service. Run from outside the checkout, so that only
    # the installed packages are importable.
    code = (
        "import sys\n"
        "from metarec.api.v1 import recommender_pb2, recommender_pb2_grpc\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('keras', 'tensorflow', 'jax', "
        "'metarec_server', 'server')]\n"
        "assert not bad, bad\n"
        "print(recommender_pb2.DESCRIPTOR.services_by_name['RecommenderService'].full_name)\n"
        "print(recommender_pb2.DESCRIPTOR.name)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    # The descriptor keeps the proto's own file name: the wire format and reflection are unchanged.
    assert out.stdout.split() == ["metarec.v1.RecommenderService", "metarec/v1/recommender.proto"]


@needs_protoc
def test_check_mode_reports_a_stale_stub(tmp_path):
    # A copy of the committed stubs with one byte changed must be reported as stale.
    import shutil

    copy = tmp_path / "api"
    shutil.copytree(codegen.GENERATED_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "v1/recommender_pb2.py"
    target.write_text(target.read_text() + "\n# edited by hand\n")
    assert codegen.stale_files(copy) == ["v1/recommender_pb2.py"]
