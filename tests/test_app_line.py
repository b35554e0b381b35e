"""The line between the library (`curate/`) and the application (`pipelines/`), read from the source.

The library imports only the core dependencies (and faiss, lazily, for offline curation), never the app; the
app's modules do not import each other in a cycle (module-level and function-level imports both count: a lazy
import hides a cycle from Python, not from the design).
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = {"torch", "torchdata", "numpy", "polars", "fsspec"}
LIBRARY_OPTIONAL = {"faiss"}  # curate.curation, imported when dedup runs: the curation extra
# curate.integrations.X may import its own loop's library (its extra), and nothing else beyond the core
INTEGRATION_LIBRARIES = {"hf": {"transformers"}, "lightning": {"lightning"}, "accelerate": {"accelerate"},
                         "open_clip": {"open_clip", "open_clip_train", "webdataset"}}


def _imports(path: Path) -> list[str]:
    """Absolute names of every module `path` imports, at any depth (relative imports resolved)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    package = list(parts[:-1]) if parts[-1] != "__init__" else list(parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            anchor = package[:len(package) - node.level + 1] if node.level else []
            base = ".".join([*anchor, *([node.module] if node.module else [])])
            # `from . import tasks` imports the module tasks; `from .tasks import x` imports tasks
            names += [f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base for alias in node.names]
    return names


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _modules(package: str) -> dict[str, list[str]]:
    """Module → the modules of the same package it imports."""
    graph = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = sorted({n for n in _imports(path) if n.split(".")[0] == package and _is_module(n)}
                             - {name})
    return graph


def _cycle(graph: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for child in graph.get(node, []):
            if state.get(child) == 1:
                return [*path[path.index(child):], child]
            if child not in state and (found := visit(child, [*path, child])):
                return found
        state[node] = 2
        return None

    for start in graph:
        if start not in state and (found := visit(start, [start])):
            return found
    return None


@pytest.mark.parametrize("package", ["curate", "pipelines"])
def test_the_import_graph_is_a_dag(package):
    graph = _modules(package)
    graph.pop("curate", None)  # the library's __init__ is its API: it imports every module, none imports it
    assert len(graph) > 5  # the scan found the package's modules
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]
    assert _cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None


def test_the_library_imports_only_the_core_and_never_the_app():
    allowed = CORE | LIBRARY_OPTIONAL | set(sys.stdlib_module_names) | {"curate"}
    outside = {}
    for path in sorted((ROOT / "curate").rglob("*.py")):
        own = INTEGRATION_LIBRARIES.get(path.stem, set()) if path.parent.name == "integrations" else set()
        roots = {name.split(".")[0] for name in _imports(path)} - allowed - own
        if roots:
            outside[str(path.relative_to(ROOT))] = sorted(roots)
    assert outside == {}, "curate/ imports beyond its core dependencies (move the code to pipelines/ or make it " \
                          f"an extra): {outside}"
