"""The public API contract: `import curate` is light and exports what it documents."""

import subprocess
import sys

import curate


def test_import_curate_does_not_import_heavy_optional_packages():
    code = "import sys, curate; print(sorted(m for m in ('open_clip', 'ray', 'faiss') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_everything_in_all_is_importable():
    missing = [name for name in curate.__all__ if not hasattr(curate, name)]
    assert not missing
