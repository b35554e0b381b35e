"""The public API contract: `import curate` is light and exports what it documents (import graph: test_app_line)."""

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
    heavy = ('open_clip', 'open_clip_train', 'ray', 'faiss', 'transformers', 'lightning', 'accelerate')
    code = f"import sys, curate; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_everything_in_all_is_importable():
    missing = [name for name in curate.__all__ if not hasattr(curate, name)]
    assert not missing


INTEGRATIONS = [f"integrations.{p.stem}".removesuffix(".__init__") for p in (ROOT / "curate/integrations").glob("*.py")]
MODULES = sorted([p.stem for p in (ROOT / "curate").glob("*.py") if p.stem != "__init__"] + INTEGRATIONS)


@pytest.mark.parametrize("name", ["__init__", *MODULES])
def test_every_module_has_a_sorted_all_of_names_it_defines(name):
    module = curate if name == "__init__" else importlib.import_module(f"curate.{name}")
    assert hasattr(module, "__all__"), f"curate.{name} has no __all__"
    assert list(module.__all__) == sorted(module.__all__), f"curate.{name}.__all__ is not sorted"
    assert len(set(module.__all__)) == len(module.__all__)
    assert not [n for n in module.__all__ if not hasattr(module, n)]
