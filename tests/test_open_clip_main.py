"""`python -m curate.integrations.open_clip`: open_clip_train's own, unmodified `main` on curated webdataset shards,
with a tiny ViT from a custom config (open_clip's local-dir: schema, no weights), resumed by open_clip's own
--resume at an epoch boundary to the same training as an uninterrupted run."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("curate.integrations.open_clip")

from pipelines.data import make_digits  # noqa: E402

from .test_readme import readme_command, readme_snippet  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("open_clip_main")
    model = root / "model"
    model.mkdir()
    config = json.loads((ROOT / "recipes" / "models" / "tiny-vit.json").read_text())
    (model / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    torch.manual_seed(7)
    reference = open_clip.create_model(f"local-dir:{model}")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(root / "reference.safetensors"))
    make_digits(root / "data", n_train=640, n_curated=64, n_test=64, shard_size=160, format="webdataset")
    return root


def _main(world: Path, name: str, epochs: int, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "curate.integrations.open_clip",
               "--curate-reference", str(world / "reference.safetensors"), "--curate-filter-ratio", "0.5",
               "--curate-n-chunks", "2", "--curate-shuffle-buffer", "64",
               "--model", f"local-dir:{world / 'model'}",
               "--train-data", str(world / "data/pairs/train-{000000..000003}.tar"),
               "--train-num-samples", "640", "--dataset-type", "webdataset", "--batch-size", "16",
               "--epochs", str(epochs), "--workers", "0", "--lr", "1e-3", "--warmup", "2", "--precision", "fp32",
               "--lr-scheduler", "const",  # a schedule that does not depend on --epochs: 1 epoch + 1 resumed = 2
               "--aug-cfg", "scale=(1.0,1.0)", "ratio=(1.0,1.0)",  # no random crop: epochs replay exactly
               "--logs", str(world / "logs"), "--name", name, "--save-frequency", "1", "--log-every-n-steps", "5",
               "--report-to", "", *extra]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _losses(world: Path, name: str, epoch: int) -> list[str]:
    log = (world / "logs" / name / "out.log").read_text()
    return re.findall(rf"Train Epoch: {epoch} \[.*?\] .* Loss: (\d+\.\d+) ", log)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_open_clip_train_main_trains_on_curated_shards_and_resumes_at_an_epoch(world):
    _main(world, "full", 2)
    log = (world / "logs" / "full" / "out.log").read_text()
    assert "curate: training on 16 of every 32 samples (joint), 20 batches per epoch" in log
    assert (world / "logs" / "full" / "checkpoints" / "epoch_2.pt").exists()
    first, second = _losses(world, "full", 0), _losses(world, "full", 1)
    assert len(first) == len(second) == 5
    assert float(second[-1]) < float(first[0]) - 0.3  # the loss falls (to chance, log 16, this early)

    _main(world, "part", 1)
    _main(world, "part", 2, "--resume", "latest")
    assert _losses(world, "part", 0) == first
    assert _losses(world, "part", 1) == second  # the resumed epoch: the same batches, the same losses


def test_the_launcher_says_what_it_needs():
    proc = subprocess.run([sys.executable, "-m", "curate.integrations.open_clip", "--curate-help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--curate-reference" in proc.stdout and "open_clip_train's" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_readmes_open_clip_lines_run(world, monkeypatch):
    import argparse

    from .test_open_clip_train import _args

    monkeypatch.chdir(world)  # the README's relative paths: data/, model/, reference.safetensors, logs/
    command = readme_command("python -m curate.integrations.open_clip")
    proc = subprocess.run([sys.executable, *command[1:], "--name", "readme", "--report-to", ""], cwd=world,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "curate: training on 16 of every 32 samples (joint)" in (world / "logs/readme/out.log").read_text()

    model, preprocess_train, _ = open_clip.create_model_and_transforms(f"local-dir:{world / 'model'}",
                                                                       output_dict=True)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape) if m.training else None)
    namespace = {"curate": __import__("curate"), "model": model, "preprocess_train": preprocess_train,
                 "tokenizer": open_clip.get_tokenizer(f"local-dir:{world / 'model'}"),
                 "reference_model": open_clip.create_model(f"local-dir:{world / 'model'}", output_dict=True).eval(),
                 "loss": open_clip.ClipLoss(), "epoch": 0,
                 "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3), "args": _args(16)}
    assert isinstance(namespace["args"], argparse.Namespace)
    exec(compile(readme_snippet("curated_open_clip.get_data"), "README.md", "exec"), namespace)
    assert seen == [torch.Size([16, 3, 32, 32])] * 8  # 640 pairs in superbatches of 80 (filter_ratio 0.8)
