"""The README's commands and code, run as written (recipe runs shortened with --set, which they accept)."""

import importlib.util
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipelines.cli import main

from .conftest import make_pairs, make_samples, tiny_clip

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SHORT = ["--set", "train.steps=4", "--set", "train.eval_every=2", "--set", "train.batch_size=8",
         "--set", "reference.steps=5", "--set", "selection.shuffle_buffer=32", "--set", "selection.n_chunks=4"]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def _commands(program: str) -> list[list[str]]:
    lines = [line.split("#")[0].strip() for block in _blocks("bash") for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith(f"{program} ")]


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    ci = (ROOT / ".ci" / "run").read_text()
    install = [line.split("#")[0].strip() for line in _blocks("bash")[0].splitlines() if "pip install" in line]
    assert install and all(line in ci for line in install)
    (test,) = [block.strip() for block in _blocks("bash") if "pytest" in block]
    assert test in ci


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_curate_command_in_the_readme_runs(tmp_path, monkeypatch, capsys):
    commands = _commands("curate")
    assert len(commands) >= 6 and ["curate", "run", "recipes/quickstart.yaml"] in commands
    os.symlink(ROOT / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)  # the README's paths are relative: data/, runs/, recipes/
    for command in commands:
        args = command[1:]
        if args[0] in ("train-reference", "precompute", "run", "curate-set"):
            args += SHORT  # the same command, a few steps long
        assert main(args) == 0, f"README command failed: {shlex.join(command)}\n{capsys.readouterr().err[-2000:]}"
    assert (tmp_path / "runs" / "quickstart" / "summary.json").is_file()
    assert (tmp_path / "runs" / "jest" / "cache").is_dir() and (tmp_path / "scores.png").is_file()
    for name in ("byo_clip", "byo_classifier"):  # your own data's shapes, end to end
        summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
        assert set(summary) == {"learnability", "uniform"}, name


def test_the_readmes_own_data_recipe_is_a_valid_recipe():
    from pipelines.recipe import parse_recipe

    (block,) = [block for block in _blocks("yaml") if "format: webdataset" in block]
    recipe = parse_recipe("name: mine\n" + block)
    assert recipe.data.format == "webdataset" and recipe.model.kind == "open_clip"
    assert recipe.reference.checkpoint and recipe.eval.classnames == ["cat", "dog"]


def _snippets() -> list[str]:
    return [block for block in _blocks("python") if "curate." in block]


def readme_snippet(marker: str) -> str:
    """The README's one python block containing `marker` (the integrations' tests run theirs)."""
    (code,) = [block for block in _blocks("python") if marker in block]
    return code


def readme_command(prefix: str) -> list[str]:
    """The README's one bash command starting with `prefix`."""
    (command,) = [c for c in _commands(prefix.split()[0]) if shlex.join(c).startswith(prefix)]
    return command


def test_the_readme_wraps_a_dataloader_as_it_shows():
    (code,) = [s for s in _snippets() if "curate.pipeline(" in s and "save_state" not in s and "integrations" not in s]
    torch.manual_seed(0)
    samples = [{"__key__": s["__key__"], "image": s["input"], "label": s["target"]} for s in make_samples(700)]
    model, reference_model = nn.Linear(8, 3), nn.Linear(8, 3)
    trained = []
    namespace = {"loader": DataLoader(samples, batch_size=32), "model": model, "reference_model": reference_model,
                 "train_step": lambda model, batch: trained.append(len(batch["__key__"]))}
    exec(compile(code, "README.md", "exec"), namespace)
    assert trained == [64, 64, 12]  # superbatches of 320, 320 and the last 60 (keeping the same fifth)
    assert namespace["batches"].stats()["seen"] == 700


def test_the_readmes_loop_lines_give_tuples_a_length_and_per_rank_state(tmp_path, monkeypatch):
    (code,) = [s for s in _snippets() if "curate.save_state(" in s]
    monkeypatch.chdir(tmp_path)
    samples = [{"__key__": s["__key__"], "image": s["input"], "label": s["target"]} for s in make_samples(700)]
    trained = []
    namespace = {"curate": __import__("curate"), "loader": DataLoader(samples, batch_size=32),
                 "model": nn.Linear(8, 3), "reference_model": nn.Linear(8, 3),
                 "scorer": __import__("curate").ClassificationScorer(input_key="image", target_key="label"),
                 "train_step": lambda images, labels: trained.append((images.shape, labels.shape))}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["steps_per_epoch"] == len(trained) == 3  # superbatches of 320, 320, 60
    assert trained[0] == (torch.Size([64, 8]), torch.Size([64]))
    assert (tmp_path / "checkpoints" / "latest" / "pipeline-rank00000-of-00001.pt").is_file()


def test_the_readme_builds_a_chain_with_a_stage_of_its_own():
    (code,) = [s for s in _snippets() if "class DropEmpty" in s]
    pairs = make_pairs(700)
    for pair in pairs[::7]:
        pair["text"] = torch.zeros_like(pair["text"])  # 100 empty captions
    namespace = {"curate": __import__("curate"), "loader": pairs, "model": tiny_clip(),
                 "reference_model": tiny_clip(seed=1)}
    exec(compile(code, "README.md", "exec"), namespace)
    batches = namespace["batches"]
    kept = [k for batch in batches for k in batch["__key__"]]
    assert len(kept) == 64 + 56 and batches.stats()["dropped_empty"] == 100  # 600 left: superbatches of 320, 280
    assert not {p["__key__"] for p in pairs[::7]} & set(kept)


def test_the_reliability_table_lists_every_row_of_its_script_and_real_tests():
    spec = importlib.util.spec_from_file_location("reliability", ROOT / "benchmarks" / "reliability.py")
    reliability = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reliability)
    for node in reliability.node_ids():  # every test a row names exists (a renamed test would leave a FAIL row)
        path, name = node.rstrip("*").split("::")
        assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), f"no test {node}"
    block = README.split(reliability.START)[1].split(reliability.END)[0]
    rows = [line.split(" | ") for line in block.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row[0][2:] for row in rows] == [tried for tried, _, _ in reliability.ROWS], "rerun the script"
    assert all(row[2].startswith("pass") for row in rows), "the README's table shows a failing row"
