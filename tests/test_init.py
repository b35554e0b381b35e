"""The public API contract: `import curate` is light, exports what it documents, and the imports form a DAG."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import curate

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_import_curate_does_not_import_heavy_optional_packages():
    code = "import sys, curate; print(sorted(m for m in ('open_clip', 'ray', 'faiss') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_everything_in_all_is_importable():
    missing = [name for name in curate.__all__ if not hasattr(curate, name)]
    assert not missing


MODULES = sorted(p.stem for p in (ROOT / "curate").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", ["__init__", *MODULES])
def test_every_module_has_a_sorted_all_of_names_it_defines(name):
    module = curate if name == "__init__" else importlib.import_module(f"curate.{name}")
    assert hasattr(module, "__all__"), f"curate.{name} has no __all__"
    assert list(module.__all__) == sorted(module.__all__), f"curate.{name}.__all__ is not sorted"
    assert len(set(module.__all__)) == len(module.__all__)
    assert not [n for n in module.__all__ if not hasattr(module, n)]


def _imports(package: str) -> dict[str, set[str]]:
    """Module → the modules of `curate` / `pipelines` it imports (at any depth of its code)."""
    graph = {}
    for path in sorted((ROOT / package).glob("*.py")):
        name = f"{package}.{path.stem}" if path.stem != "__init__" else package
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from .x import y / from . import x
                    base = package if node.module is None else f"{package}.{node.module}"
                    targets = [f"{base}.{a.name}" for a in node.names] if node.module is None else [base]
                else:
                    targets = [node.module or ""]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t.split(".")[0] in ("curate", "pipelines") and t != name}
        graph[name] = found
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt in graph and nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_import_graph_is_a_dag_and_the_library_never_imports_the_app():
    library = {k: v - {"curate"} for k, v in _imports("curate").items() if k != "curate"}  # __init__ is the API
    assert _cycles(library) == []
    assert not [m for m, deps in library.items() if any(d.startswith("pipelines") for d in deps)]


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
