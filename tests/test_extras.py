"""The install line: the core install (torch, torchdata, numpy, polars, fsspec) runs `curate.pipeline`, and
each extra's feature, without its package, fails with the pip command that installs it (pipelines/extras.py).

"Not installed" is simulated in a fresh interpreter by `sys.modules[name] = None` for each package, before
anything is imported: `import name` (and of its submodules) then raises ModuleNotFoundError naming it, and
`importlib.util.find_spec(name)` returns None, exactly as for an absent package. (An import hook that raises
instead is not faithful: torch._dynamo probes optional packages with find_spec and expects None.)
"""

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.extras import APP_MODULES, EXTRAS

ROOT = Path(__file__).resolve().parent.parent

NOT_INSTALLED = '''
import sys

BLOCKED = set(sys.argv[1].split(","))
sys.modules.update(dict.fromkeys(BLOCKED))
'''


def run_without(blocked, code: str, *args: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (cwd: the repository, so the worktree's packages load) where `blocked` are
    not importable; `args` follow in sys.argv[2:]."""
    return subprocess.run([sys.executable, "-c", NOT_INSTALLED + code, ",".join(blocked), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _cli_without(module: str) -> subprocess.CompletedProcess:
    code = "from pipelines.cli import main\nrc = main(sys.argv[2:])\nprint('torch' in sys.modules)\nsys.exit(rc)"
    return run_without([module], code, "run", "recipes/uniform.yaml")


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("module", APP_MODULES)
def test_the_cli_without_an_app_package_says_how_to_install_it(module):
    proc = _cli_without(module)
    extra, package = EXTRAS[module]
    assert proc.returncode == 2, proc.stderr
    assert f'curate run needs {package}, which is not installed: pip install "curate[{extra}]"' in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip() == "False"  # it says so before importing torch or doing any work


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_cli_names_every_missing_app_package_at_once():
    proc = run_without(["yaml", "tqdm", "open_clip"], "from pipelines.cli import main\nsys.exit(main(sys.argv[2:]))",
                       "data", "digits", "out")
    assert proc.returncode == 2
    assert 'curate data needs pyyaml, tqdm, open_clip_torch, which are not installed: pip install "curate[app]"' \
        in proc.stderr


# Everything outside the core install, the app itself included: the library must not need any of it.
NOT_CORE = ["pydantic", "yaml", "faiss", "open_clip", "webdataset", "sklearn", "matplotlib", "tqdm", "safetensors",
            "s3fs", "pyarrow", "torchvision", "ray", "pipelines"]

CORE_PIPELINE = '''
import tempfile

import torch
from torch import nn

import curate

torch.manual_seed(0)
samples = [{"__key__": f"k{i:04d}", "x": torch.randn(8), "y": i % 3} for i in range(256)]
learner, reference = nn.Linear(8, 3), nn.Linear(8, 3)
scorer = curate.ClassificationScorer(input_key="x", target_key="y")
options = dict(learner=learner, scorer=scorer, rule="learnability", method="topk", batch_size=16, filter_ratio=0.75,
               shuffle_buffer=64, seed=0)
batches = curate.pipeline(samples, reference=reference, **options)
online = [batch["__key__"] for batch in batches]
assert [len(keys) for keys in online] == [16] * 4 and len({k for keys in online for k in keys}) == 64, online
assert batches.stats()["seen"] == 256 and batches.stats()["kept"] == 64, batches.stats()
state = batches.state_dict()

# the reference's losses offline: a Parquet score cache and a key list, written and read by polars alone
root = tempfile.mkdtemp()
with torch.no_grad():
    losses = nn.functional.cross_entropy(reference(torch.stack([s["x"] for s in samples])),
                                         torch.tensor([s["y"] for s in samples]), reduction="none")
curate.write_part(f"{root}/cache/part-00000.parquet", [s["__key__"] for s in samples], ref_loss=losses,
                  metadata={"reference_hash": curate.model_hash(reference), "scorer": repr(scorer), "dataset": "list"})
curate.write_keys(f"{root}/keys.parquet", [s["__key__"] for s in samples[:128]])
cached = curate.pipeline(samples, reference=curate.ScoreCache.open(f"{root}/cache"), keep_keys=f"{root}/keys.parquet",
                         **options)
trained = [key for batch in cached for key in batch["__key__"]]
assert len(trained) == 32 and set(trained) <= {s["__key__"] for s in samples[:128]}, trained
print("pipeline, score cache and key list: ok")
'''


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_the_core_install_runs_a_pipeline_without_any_extra():
    proc = run_without(NOT_CORE, CORE_PIPELINE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "pipeline, score cache and key list: ok"


# Each feature behind an extra, run with only that package missing: (package, snippets, what each error says).
FEATURES = {
    "open_clip": [("from pipelines.models import tiny_clip\ntiny_clip()", "tiny_clip"),
                  ("from pipelines.data import tokenize\ntokenize('a')", "tokenizing captions")],
    "webdataset": [("from pipelines.data import load_digits\nload_digits(['x.tar'])", "loading shards"),
                   ("from pipelines.data import make_digits\nmake_digits(OUT)", "make_digits")],
    "sklearn": [("from pipelines.data import make_digits\nmake_digits(OUT)", "make_digits")],
    "pydantic": [("import pipelines.recipe", "curate recipes (pipelines.recipe)")],
    "yaml": [("import pipelines.recipe", "curate recipes (pipelines.recipe)")],
    "matplotlib": [("from pipelines.train import plot\nplot({}, OUT / 'curve.png', 't')", "the learning-curve plot")],
    "safetensors": [("import torch\nfrom pipelines.tasks import save_model\n"
                     "save_model(torch.nn.Linear(1, 1), OUT, {})", "saving a model")],
}
RUN_EACH = '''
import ast, pathlib, tempfile
for code in sys.argv[2:]:
    try:
        exec(code, {"OUT": pathlib.Path(tempfile.mkdtemp())})
        print(repr("no error"))
    except ImportError as error:
        print(repr(str(error)))
'''


def _errors(module: str, snippets: list[str]) -> list[str]:
    import ast

    proc = run_without([module], RUN_EACH, *snippets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [ast.literal_eval(line) for line in proc.stdout.splitlines()]


@pytest.mark.timeout(180)
@pytest.mark.slow
@pytest.mark.parametrize("module", FEATURES)
def test_each_app_feature_without_its_package_names_the_pip_command(module):
    extra, package = EXTRAS[module]
    snippets, features = zip(*FEATURES[module], strict=True)
    expected = [f'{feature} needs {package}, which is not installed: pip install "curate[{extra}]"'
                for feature in features]
    assert _errors(module, list(snippets)) == expected


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_each_library_extra_without_its_package_names_the_pip_command():
    cases = {  # package → a library call that needs it, and the pip command its error must give
        "faiss": ("import numpy, curate\n"
                  "curate.semantic_dedup(list('abcd'), numpy.eye(4, dtype='float32'), n_clusters=2)",
                  'pip install "curate[curation]"'),
        "s3fs": ("import curate\ncurate.ScoreCache.open('s3://bucket/cache')", 'pip install "curate[s3]"'),
        "ray": ("from pipelines.precompute_ray import run_ray\nfrom pipelines.recipe import parse_recipe\n"
                "run_ray(parse_recipe('name: a'), [])", 'pip install "curate[ray]"'),
    }
    for module, (code, command) in cases.items():
        (error,) = _errors(module, [code])
        assert command in error, (module, error)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(("module", "blocked", "extra", "package"), [
    ("hf", "transformers", "hf", "transformers"),
    ("accelerate", "accelerate", "hf", "accelerate"),
    ("lightning", "lightning", "lightning", "lightning"),
    ("open_clip", "open_clip_train", "open_clip", "open_clip_torch[training]"),
])
def test_an_integration_without_its_library_says_which_extra_installs_it(module, blocked, extra, package):
    proc = run_without([blocked], f"import curate\nimport curate.integrations.{module}")
    assert proc.returncode == 1
    assert (f'curate.integrations.{module} needs {package}, which is not installed: pip install "curate[{extra}]"'
            in proc.stderr), proc.stderr[-2000:]
    assert run_without([blocked], "import curate").returncode == 0  # the core never imports an integration
