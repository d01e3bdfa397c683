"""The committed gRPC stubs are current and import without touching the metarec SDK package."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from server import codegen

ROOT = Path(__file__).resolve().parent.parent

# Looked up, not imported: protoc runs in a subprocess (see server.codegen).
needs_protoc = pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools is not installed"
)


@needs_protoc
def test_committed_stubs_match_a_fresh_generation():
    stale = codegen.stale_files()
    assert stale == [], f"stale generated stubs {stale}: run `python -m server.codegen` and commit"


@needs_protoc
def test_generation_writes_every_committed_file(tmp_path):
    written = {str(p) for p in codegen.generate(tmp_path)}
    committed = {
        str(p.relative_to(codegen.GENERATED_ROOT))
        for p in codegen.GENERATED_ROOT.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert committed == written


def test_generated_imports_point_inside_the_server_package():
    grpc_module = (codegen.GENERATED_ROOT / "metarec/v1/recommender_pb2_grpc.py").read_text()
    assert "from server._generated.metarec.v1 import recommender_pb2" in grpc_module
    assert "\nfrom metarec.v1 import" not in grpc_module


def test_stubs_import_without_the_sdk_or_keras():
    # The stubs must not resolve "metarec.v1" against the SDK package (which imports Keras).
    code = (
        "import sys\n"
        "from server._generated.metarec.v1 import recommender_pb2, recommender_pb2_grpc\n"
        "assert 'keras' not in sys.modules and 'metarec' not in sys.modules, sorted(sys.modules)\n"
        "print(recommender_pb2.DESCRIPTOR.services_by_name['RecommenderService'].full_name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "metarec.v1.RecommenderService"


@needs_protoc
def test_check_mode_reports_a_stale_stub(tmp_path):
    # A copy of the committed stubs with one byte changed must be reported as stale.
    import shutil

    copy = tmp_path / "_generated"
    shutil.copytree(codegen.GENERATED_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "metarec/v1/recommender_pb2.py"
    target.write_text(target.read_text() + "\n# edited by hand\n")
    assert codegen.stale_files(copy) == ["metarec/v1/recommender_pb2.py"]
