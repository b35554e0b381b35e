"""The install line: the core install (torch, torchdata, numpy, polars, fsspec) runs `curate.pipeline`, and
each extra's feature, without its package, fails with the pip command that installs it (pipelines/extras.py).

"Not installed" is simulated in a fresh interpreter by an import hook placed first on `sys.meta_path` that
refuses the packages as Python refuses an absent one (ModuleNotFoundError naming the module).
"""

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.extras import APP_MODULES, EXTRAS

ROOT = Path(__file__).resolve().parent.parent

NOT_INSTALLED = '''
import importlib.abc, sys

class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

BLOCKED = set(sys.argv[1].split(","))
sys.meta_path.insert(0, _NotInstalled())
'''


def run_without(blocked, code: str, *args: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (cwd: the repository, so the worktree's packages load) where `blocked` are
    not importable; `args` follow in sys.argv[2:]."""
    return subprocess.run([sys.executable, "-c", NOT_INSTALLED + code, ",".join(blocked), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _cli_without(module: str) -> subprocess.CompletedProcess:
    code = "from pipelines.cli import main\nrc = main(sys.argv[2:])\nprint('torch' in sys.modules)\nsys.exit(rc)"
    return run_without([module], code, "run", "recipes/uniform.yaml")


@pytest.mark.parametrize("module", APP_MODULES)
def test_the_cli_without_an_app_package_says_how_to_install_it(module):
    proc = _cli_without(module)
    extra, package = EXTRAS[module]
    assert proc.returncode == 2, proc.stderr
    assert f'curate run needs {package}, which is not installed: pip install "curate[{extra}]"' in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip() == "False"  # it says so before importing torch or doing any work


def test_the_cli_names_every_missing_app_package_at_once():
    proc = run_without(["yaml", "tqdm", "open_clip"], "from pipelines.cli import main\nsys.exit(main(sys.argv[2:]))",
                       "data", "digits", "out")
    assert proc.returncode == 2
    assert 'curate data needs pyyaml, tqdm, open_clip_torch, which are not installed: pip install "curate[app]"' \
        in proc.stderr
