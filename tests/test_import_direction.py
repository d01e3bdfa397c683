"""The SDK (``metarec``) never imports the service (``metarec_server``, the ``server/`` folder).

The dependency points one way: the service imports the SDK (models, the API stubs in
``metarec.api.v1``, the interaction log in ``metarec.interaction_log``), and the SDK imports
the service only in ``metarec serve``, lazily, with a clear error when it is not installed.
"""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SDK = ROOT / "metarec"
SERVICE_NAMES = ("metarec_server", "server")
# The one place allowed to import the service: the `metarec serve` command, at run time.
ALLOWED = ("metarec/cli.py", "_serve")


def _is_service(module_name):
    return module_name is not None and module_name.split(".")[0] in SERVICE_NAMES


def _service_imports(path):
    """(line, qualified name of the enclosing function or class or None, module) of every
    import of the service."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = function
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{function}.{child.name}" if function else child.name
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                names = [child.module]
            elif isinstance(child, ast.Call) and child.args:
                func = child.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                first = child.args[0]
                if called in ("import_module", "__import__") and isinstance(first, ast.Constant):
                    names = [first.value] if isinstance(first.value, str) else []
            found.extend((child.lineno, inner, name) for name in names if _is_service(name))
            visit(child, inner)

    visit(tree, None)
    return found


def test_sdk_source_imports_the_service_only_in_the_serve_command():
    allowed, violations = [], []
    for path in sorted(SDK.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for line, function, name in _service_imports(path):
            where = f"{rel}:{line} ({function or 'module level'}) imports {name}"
            if (rel, function) == ALLOWED and name.split(".")[0] == "metarec_server":
                allowed.append(where)
            else:
                violations.append(where)
    assert violations == [], "the SDK must not import the service:\n" + "\n".join(violations)
    # The check above must see the one lazy import it allows, or it checks nothing.
    assert len(allowed) == 1, allowed


def test_importing_every_sdk_module_loads_no_service_module(tmp_path):
    # A fresh interpreter imports every module of metarec/, then lists what got loaded.
    code = (
        "import importlib, pkgutil, sys\n"
        "import metarec\n"
        "failed = []\n"
        "for info in pkgutil.walk_packages(metarec.__path__, 'metarec.', onerror=failed.append):\n"
        "    importlib.import_module(info.name)\n"
        "assert not failed, failed\n"
        "loaded = sorted(m for m in sys.modules if m == 'metarec' or m.startswith('metarec.'))\n"
        f"service = sorted(m for m in sys.modules if m.split('.')[0] in {SERVICE_NAMES!r})\n"
        "print(len(loaded), ' '.join(service))\n"
        "print(' '.join(loaded))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    counts, loaded = out.stdout.splitlines()[-2:]
    assert counts.split()[1:] == [], f"service modules loaded by the SDK: {counts.split()[1:]}"
    loaded = set(loaded.split())
    expected = {
        "metarec." + path.relative_to(SDK).with_suffix("").as_posix().replace("/", ".")
        for path in SDK.rglob("*.py")
        if path.name != "__init__.py"
    }
    assert expected <= loaded, sorted(expected - loaded)
    assert {"metarec.cli", "metarec.client", "metarec.retrain", "metarec.interaction_log"} <= loaded


def _blocked_service_run(args, tmp_path):
    # metarec's command line in a process where the service cannot be imported: None in
    # sys.modules makes every `import metarec_server...` raise ModuleNotFoundError.
    code = (
        "import sys\n"
        "sys.modules['metarec_server'] = None\n"
        "import metarec.cli\n"
        f"sys.exit(metarec.cli.main({list(args)!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )


def test_serve_without_the_service_fails_with_a_clear_message(tmp_path):
    args = ["serve", "--model-dir", str(tmp_path / "models"), "--port", "0"]
    out = _blocked_service_run(args, tmp_path)
    assert out.returncode == 2, (out.returncode, out.stderr)
    message = out.stderr.strip()
    assert message.startswith("metarec: error: `metarec serve` needs the gRPC service"), message
    assert "'metarec_server'" in message  # what is missing
    assert "pip install metarec" in message and "pip install -e ." in message  # how to get it
    assert "Traceback" not in message


def test_sdk_commands_work_without_the_service(tmp_path):
    out = _blocked_service_run(["retrain", "--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "usage: metarec retrain" in out.stdout


def test_packaging_installs_the_service_as_metarec_server():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {"metarec_server": "server"}
    sdk_packages = {
        "metarec" + ("." + ".".join(p.parent.relative_to(SDK).parts) if p.parent != SDK else "")
        for p in SDK.rglob("__init__.py")
    }
    # The explicit list names every package folder (a new one must be added to it) and no
    # generic top-level name.
    assert set(config["packages"]) == sdk_packages | {"metarec_server"}
    assert sorted(p.parent for p in (ROOT / "server").rglob("__init__.py")) == [ROOT / "server"]
    assert "server" not in config["packages"]
