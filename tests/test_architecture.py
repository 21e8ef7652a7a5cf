"""Layering (docs/design.md): model/ knows nothing of HTTP (neither service/, FastAPI nor prometheus_client); neither
package has an import cycle; the process runner (service/server.py) sits on top, imported only by the command that
starts it; and the runtime packages import only runtime dependencies, nothing of tests/ or benchmarks/."""

import ast
import importlib.metadata
import pathlib
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


@pytest.mark.integration
def test_importing_every_model_module_loads_no_service_module():
    code = (
        "import sys, model, model.train, model.evaluate, model.data;"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}];"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"model pulled in: {result.stdout} {result.stderr}"


# -- the runtime packages import only what `pip install .` installs (the image has no dev extra) ----------------
def _runtime_distributions() -> set[str]:
    """The project's dependencies and, through their metadata, everything they pull in here (markers evaluated)."""
    todo = [Requirement(s) for s in _project()["dependencies"]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        for text in importlib.metadata.requires(name) or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in req.extras or {""}):
                todo.append(sub)
    return seen


def _project() -> dict:
    return tomllib.loads(pathlib.Path(REPO, "pyproject.toml").read_text())["project"]


def _imports(path: pathlib.Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, inside a function) for every absolute import in a file."""
    tree = ast.parse(path.read_text())
    in_function = {
        id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) for n in ast.walk(f)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name.split(".")[0], node.lineno, id(node) in in_function) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module.split(".")[0], node.lineno, id(node) in in_function))
    return out


def test_runtime_packages_import_only_runtime_dependencies():
    """A module-level import of a test or benchmark package would stop the image from starting (issue 10: httpx).

    An optional extra (matplotlib for `evaluate`'s plots) may be imported inside the function that needs it.
    """
    runtime = _runtime_distributions()
    extras = _project()["optional-dependencies"].values()
    optional = {canonicalize_name(Requirement(s).name) for deps in extras for s in deps} - runtime
    providers = importlib.metadata.packages_distributions()
    bad = []
    for package in ("model", "service"):
        for path in sorted(pathlib.Path(REPO, package).rglob("*.py")):
            for module, line, lazy in _imports(path):
                if module in sys.stdlib_module_names or module in ("model", "service", "__future__"):
                    continue
                dists = {canonicalize_name(d) for d in providers.get(module, [])}
                if dists & runtime or (lazy and dists & optional):
                    continue
                where = f"{path.relative_to(REPO)}:{line} imports {module}"
                bad.append(f"{where} ({', '.join(sorted(dists)) or 'not installed'}): not a runtime dependency")
    assert not bad, (
        "add it to [project] dependencies in pyproject.toml, or move the code to tests/ or benchmarks/:\n"
        + "\n".join(bad)
    )


# -- the import graph --------------------------------------------------------------------------------------------
def _module_graph(package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, wherever the import statement is (a function-level import is
    an edge too: hiding one inside a function does not make a cycle go away)."""
    paths = {}
    for path in pathlib.Path(REPO, package).rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for module, path in paths.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        # `from package import x` of a package's __init__ (which imports nothing of its own) is not an edge
        graph[module] = {t for t in targets if t in paths and t not in (module, package)}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycles():
    for package in ("model", "service"):
        graph = _module_graph(package)
        assert len(graph) > 5, graph  # the finder sees the package
        cycles = _cycles(graph)
        assert not cycles, f"{package}: " + "; ".join(" -> ".join(c) for c in cycles)


def test_only_the_command_imports_the_process_runner():
    """service/server.py runs one process (uvicorn, drain) and sits on top of everything: the `puppet-cnn serve`
    command (service/cli.py) hands it to service/supervisor.py, and nothing else depends on it."""
    graph = _module_graph("service")
    importers = sorted(m for m, targets in graph.items() if "service.server" in targets)
    assert importers == ["service.cli"], importers


def test_runtime_packages_import_nothing_of_tests_or_benchmarks():
    test_modules = {p.stem for p in pathlib.Path(REPO, "tests").glob("*.py")} | {"tests", "support", "benchmarks"}
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for package in ("model", "service")
        for path in sorted(pathlib.Path(REPO, package).rglob("*.py"))
        for module, line, _ in _imports(path)
        if module in test_modules
    ]
    assert not bad, bad


def test_no_function_outgrows_a_screen():
    """The long functions were split (train 125 lines, evaluate 95, render_markdown 92, the batcher's _process 63
    on the request path); this keeps the next one from growing back. Generated code is not ours to split."""
    limit, long = 60, []
    for package in ("model", "service"):
        for path in sorted(pathlib.Path(REPO, package).rglob("*.py")):
            if "oip_proto" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > limit:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, f"split these (over {limit} lines): {long}"
