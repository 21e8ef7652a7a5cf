"""model/ knows nothing of HTTP: it imports neither service/, FastAPI nor prometheus_client."""

import ast
import pathlib
import subprocess
import sys

from conftest import REPO

FORBIDDEN = ("service", "fastapi", "starlette", "prometheus_client", "uvicorn")


def test_model_sources_import_nothing_of_the_service():
    for path in pathlib.Path(REPO, "model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_importing_every_model_module_loads_no_service_module():
    code = (
        "import sys, model, model.train, model.evaluate, model.data;"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}];"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"model pulled in: {result.stdout} {result.stderr}"
