"""The curate CLI end to end on a small digits dataset: every shipped recipe, resume after SIGKILL, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.data import make_digits
from pipelines.recipe import load_recipe
from pipelines.train import load_checkpoint, plan_runs

ROOT = Path(__file__).resolve().parent.parent
# byo_* recipes read shards `curate data` writes: the README's commands and test_own_data run them
RECIPES = sorted(path for path in (ROOT / "recipes").glob("*.yaml") if not path.name.startswith("byo_"))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    make_digits(out, n_train=1200, n_curated=300, n_test=300, shard_size=400)
    return out


@pytest.fixture(scope="module")
def web_world(tmp_path_factory):
    from pipelines.web import make_web

    out = tmp_path_factory.mktemp("web")
    make_web(out, n_train=1200, n_curated=600, n_test=600, shard_size=400)
    return out


def _small(digits: Path, out: Path, steps: int = 4) -> list[str]:
    values = [f"data.root={digits}", f"train.out={out}", f"train.steps={steps}", "train.eval_every=2",
              "train.batch_size=8", "reference.steps=5", "reference.batch_size=32", "selection.shuffle_buffer=32",
              "selection.n_chunks=4", "cache.batch_size=128"]
    return [arg for value in values for arg in ("--set", value)]


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_runs_a_few_steps(recipe, digits, web_world, tmp_path, capsys):
    digits = web_world if "dataset: web" in recipe.read_text() else digits
    extra = ["--set", f"cache.path={tmp_path / 'cache'}"] if "cache:" in recipe.read_text() else []
    assert main(["run", str(recipe), *_small(digits, tmp_path), *extra]) == 0
    printed = capsys.readouterr().out
    assert "final accuracy" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {m["step"] for m in metrics} == {2, 4}
    runs = plan_runs(load_recipe(recipe, [value for value in _small(digits, tmp_path) if value != "--set"]))
    assert set(summary) == set(runs) == {m["run"] for m in metrics}
    for name, options in runs.items():
        history = [m for m in metrics if m["run"] == name]
        assert summary[name]["final_accuracy"] == history[-1]["accuracy"]
        assert 0 <= summary[name]["final_accuracy"] <= summary[name]["best_accuracy"] <= 1
        for record in history:
            assert math.isfinite(record["train_loss"]) and 0 <= record["noisy_kept"] <= 1
            # the pipeline scored whole superbatches and kept each one's batch: kept = seen · (1 − filter_ratio)
            stats = record["pipeline"]
            assert stats["kept"] == record["step"] * 8  # train.batch_size=8: every step trained a full batch
            assert abs(stats["kept"] - stats["seen"] * (1 - options["filter_ratio"])) <= stats["superbatches"] / 2
        state = load_checkpoint(tmp_path / name / "checkpoint.pt")  # weights only: tensors and plain data
        assert state["step"] == 4 and state["history"] == history


def _cli(*args, cwd=ROOT) -> subprocess.Popen:
    # the same torch thread count as this process (conftest: 1), or float reductions differ in the last bits
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_run_killed_then_resumed_equals_an_uninterrupted_run(digits, tmp_path):
    recipe = str(ROOT / "recipes" / "rho_loss.yaml")
    common = [*_small(digits, tmp_path / "a", steps=30), "--set", "train.eval_every=5",
              "--set", f"cache.path={tmp_path / 'cache'}"]
    # the uninterrupted run (also makes the reference and the cache both runs share)
    assert main(["run", recipe, *common]) == 0
    reference = json.loads((tmp_path / "a" / "summary.json").read_text())
    expected = (tmp_path / "a" / "learnability" / "metrics.jsonl").read_text().splitlines()
    # the same run in another directory, killed for real once it has checkpointed step 10 or later
    killed = [arg.replace(str(tmp_path / "a"), str(tmp_path / "b")) for arg in common]
    (tmp_path / "b").mkdir()
    os.symlink(tmp_path / "a" / "reference", tmp_path / "b" / "reference")
    proc = _cli("run", recipe, *killed)
    checkpoint = tmp_path / "b" / "learnability" / "checkpoint.pt"
    deadline = time.time() + 120
    while not (checkpoint.exists() and _steps_logged(checkpoint.parent) >= 2) and proc.poll() is None:
        assert time.time() < deadline, "the run never checkpointed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _steps_logged(checkpoint.parent) < 6, "the run finished before it could be killed"
    assert main(["run", recipe, *killed, "--resume"]) == 0
    _assert_same_metrics(tmp_path / "b" / "learnability" / "metrics.jsonl", expected)
    resumed = json.loads((tmp_path / "b" / "summary.json").read_text())
    for run in reference:
        assert resumed[run]["final_accuracy"] == reference[run]["final_accuracy"]


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _assert_same_metrics(path: Path, expected: list[str]) -> None:
    """Equal except wall-clock seconds and timing counters."""
    def strip(line):
        record = json.loads(line)
        record.pop("seconds")
        record["pipeline"].pop("score_seconds", None)
        return record
    got = [strip(line) for line in path.read_text().splitlines()]
    assert got == [strip(line) for line in expected]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_help_is_answered_before_torch_or_the_recipe_schema_is_imported():
    # `curate --help` took 2.6-3.6 s and 750 MB when the CLI imported the recipe (→ curate → torch) at import time
    code = ("import sys\n"
            "from pipelines.cli import main\n"
            "for argv in (['--help'], ['run', '--help'], ['precompute', '--help']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit as done:\n"
            "        assert done.code == 0, done.code\n"
            "print(sorted(m for m in ('torch', 'curate', 'pydantic', 'yaml', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.count("usage: curate") == 3 and "--resume" in out and "--on-error" in out
    assert out.splitlines()[-1] == "[]"


def test_compare_adds_a_baseline_to_the_recipes_own(digits, tmp_path):
    recipe = str(ROOT / "recipes" / "rho_loss.yaml")  # compare: [uniform]
    cache = ["--set", f"cache.path={tmp_path / 'cache'}"]
    several = ["--compare", "hard_learner,easy_reference", "--compare", "uniform", "--compare", "hard_learner"]
    assert main(["run", recipe, *_small(digits, tmp_path, steps=2), *cache, *several]) == 0
    assert list(json.loads((tmp_path / "summary.json").read_text())) == \
        ["learnability", "uniform", "hard_learner", "easy_reference"]
    assert main(["run", recipe, *_small(digits, tmp_path / "b", steps=2), *cache, "--compare", "uniform"]) == 0
    assert set(json.loads((tmp_path / "b" / "summary.json").read_text())) == {"learnability", "uniform"}


def test_compare_with_an_unknown_rule_lists_the_rules(capsys):
    assert main(["run", str(ROOT / "recipes" / "jest.yaml"), "--compare", "unifrom"]) == 2
    assert "compare: Value error, unknown baseline 'unifrom'" in capsys.readouterr().err


def test_missing_data_says_how_to_make_it(tmp_path, capsys):
    code = main(["run", str(ROOT / "recipes" / "uniform.yaml"), "--set", f"data.root={tmp_path / 'none'}",
                 "--set", "prepare=false"])
    assert code == 2
    assert "curate data digits" in capsys.readouterr().err


def test_missing_cache_says_how_to_make_it(digits, tmp_path, capsys):
    code = main(["run", str(ROOT / "recipes" / "jest.yaml"), *_small(digits, tmp_path), "--set", "prepare=false",
                 "--set", f"cache.path={tmp_path / 'no-cache'}", "--set", f"reference.path={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "curate train-reference" in err or "curate precompute" in err


def test_cuda_requested_without_cuda(digits, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = main(["run", str(ROOT / "recipes" / "uniform.yaml"), *_small(digits, tmp_path),
                 "--set", "train.device=cuda"])
    assert code == 2
    assert "no CUDA device is available" in capsys.readouterr().err


def test_bad_recipe_value_is_reported_with_its_path(capsys):
    code = main(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--set", "selection.n_chunks=x"])
    assert code == 2
    assert "selection.n_chunks: expected an integer, got 'x'" in capsys.readouterr().err


def test_training_on_a_missing_curated_key_list_says_how_to_make_it(digits, tmp_path, capsys):
    code = main(["run", str(ROOT / "recipes" / "uniform.yaml"), *_small(digits, tmp_path),
                 "--set", "curation.train_on_curated=true"])
    assert code == 2
    assert "curate curate-set RECIPE" in capsys.readouterr().err


class _Payload:
    """What a planted checkpoint carries: unpickling it calls os.mkdir(marker), i.e. runs code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_resume_refuses_a_checkpoint_that_would_run_code(digits, tmp_path, capsys):
    marker = tmp_path / "the-payload-ran"
    run_dir = tmp_path / "out" / "uniform"
    run_dir.mkdir(parents=True)
    import torch

    torch.save({"model": _Payload(str(marker)), "optimizer": {}, "step": 0}, run_dir / "checkpoint.pt")
    code = main(["run", str(ROOT / "recipes" / "uniform.yaml"), *_small(digits, tmp_path / "out"), "--resume"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{run_dir / 'checkpoint.pt'} is not a checkpoint curate can load safely" in err
    assert "delete it" in err
    assert not marker.exists(), "loading the checkpoint ran the code it carried"


def test_resume_from_a_damaged_checkpoint_says_what_to_do(digits, tmp_path, capsys):
    recipe = str(ROOT / "recipes" / "uniform.yaml")
    assert main(["run", recipe, *_small(digits, tmp_path)]) == 0
    checkpoint = tmp_path / "uniform" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # cut off, as a full disk would leave it
    assert main(["run", recipe, *_small(digits, tmp_path), "--resume"]) == 2
    assert "is not a checkpoint curate can load safely" in capsys.readouterr().err


def test_flexi_jest_scores_at_low_resolution_and_trains_at_mixed_resolution(digits, tmp_path, capsys):
    recipe = ROOT / "recipes" / "flexi_jest.yaml"
    assert main(["run", str(recipe), *_small(digits, tmp_path), "--set", f"cache.path={tmp_path / 'cache'}"]) == 0
    metrics = lambda run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    last, uniform = metrics("learnability")[-1], metrics("uniform")[-1]
    per_sample = last["pipeline"]["flops_per_sample"]
    # 16×16 images in 4×4 patches scored at 8×8: 4 patches instead of 16; training half the rows at each size
    full = uniform["pipeline"]["flops_per_sample"]["train"]  # uniform trains at full resolution
    assert per_sample["learner"] < per_sample["train"] < 0.95 * full
    assert last["pipeline"]["training_flops"] == 3 * per_sample["train"] * last["pipeline"]["kept"]
    # the key it replaced is refused, naming what took its place
    assert main(["run", str(recipe), *_small(digits, tmp_path), "--set", "selection.score_patch_dropout=0.5"]) == 2
    assert "selection.score_patch_dropout: no longer a key" in capsys.readouterr().err
