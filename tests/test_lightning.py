"""curate.integrations.lightning against the real Lightning: `Trainer.fit` with 2 CPU processes (torchrun, DDP,
gloo) on curated batches, stopped after a checkpoint and resumed: every rank resumes its own stream exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import curate

pl = pytest.importorskip("lightning.pytorch")
from curate.integrations.lightning import CuratedDataModule  # noqa: E402

from .conftest import linear_models, make_samples  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "lightning_worker.py"
RELOAD_WORKER = ROOT / "tests" / "lightning_reload_worker.py"


def _torchrun(worker: Path, *args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _fit(run: str, out: Path, sized: str, ckpt: Path | None = None) -> list[dict]:
    _torchrun(WORKER, run, str(out), sized, *([str(ckpt)] if ckpt else []))
    return [json.loads((out / f"{run}-{rank}.json").read_text()) for rank in range(2)]


# "sized": the pipeline has a length, Lightning fetches no batch ahead; "unsized": it fetches one ahead, so a
# checkpoint after step k is taken with batch k + 1 already out of the pipeline (resumed from 5: mid-epoch 1, from
# 15: mid-epoch 2; 12 steps per epoch)
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("sized", "resume_at", "lag"), [("sized", 15, 0), ("unsized", 5, 1)])
def test_lightning_ddp_fit_resumed_from_a_checkpoint_trains_every_rank_on_its_own_stream(sized, resume_at, lag,
                                                                                       tmp_path):
    full = _fit("full", tmp_path, sized)
    for rank in full:
        assert len(rank["seen"]) == 16
        assert rank["score_lag_steps"] == lag  # with read-ahead, each batch was selected a step before it trained
        assert rank["rank_split"] == "pipeline: every world_size-th sample"
    keys = [set(k for batch in rank["seen"][:12] for k in batch) for rank in full]
    assert not keys[0] & keys[1]  # the ranks train on different data
    checkpoints = {int(p.stem.split("step=")[1]): p for p in (tmp_path / "ckpt").glob("*.ckpt")}
    assert sorted(checkpoints) == [5, 10, 15]
    resumed = _fit("resumed", tmp_path, sized, checkpoints[resume_at])
    for rank in range(2):
        assert resumed[rank]["seen"] == full[rank]["seen"][resume_at:], f"rank {rank}"
    if sized == "unsized":
        return

    # the checkpoint holds both ranks' states; rank 1's loaded into rank 0's pipeline is refused
    saved = torch.load(checkpoints[resume_at], map_location="cpu", weights_only=True)["CuratedDataModule"]
    assert saved["world_size"] == 2 and len(saved["ranks"]) == 2
    learner, reference = linear_models(0)
    with pytest.warns(UserWarning, match="without an initialised torch.distributed"):
        pipe = curate.pipeline(make_samples(400), learner=learner, reference=reference,
                               scorer=curate.ClassificationScorer(), batch_size=8, filter_ratio=0.5, method="sample",
                               shuffle_buffer=64, seed=2, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"the state is rank 1 of 2's, this pipeline is rank 0 of 2"):
        pipe.load_state_dict(saved["ranks"][1]["state"])
    single = CuratedDataModule(lambda m: pipe)
    with pytest.raises(ValueError, match=r"holds the pipeline states of 2 ranks, this job runs 1"):
        single.load_state_dict(saved)


def test_the_readmes_lightning_lines_fit_and_checkpoint(tmp_path, monkeypatch):
    from torch.utils.data import DataLoader

    from .lightning_worker import Classifier
    from .test_readme import readme_snippet

    monkeypatch.chdir(tmp_path)
    module = Classifier()
    namespace = {"curate": curate, "lightning": __import__("lightning"), "module": module,
                 "ModelCheckpoint": pl.callbacks.ModelCheckpoint,
                 "loader": DataLoader(make_samples(700), batch_size=32), "reference_model": linear_models(1)[1],
                 "scorer": curate.ClassificationScorer()}
    exec(compile(readme_snippet("CuratedDataModule("), "README.md", "exec"), namespace)
    assert len(module.seen) == 10 and all(len(keys) == 64 for keys in module.seen[:2])
    (last,) = [p for p in tmp_path.rglob("*.ckpt") if "step=10" in p.name]
    saved = torch.load(last, map_location="cpu", weights_only=True)["CuratedDataModule"]
    assert saved["world_size"] == 1 and saved["ranks"][0]["trained"] == 10 % 3  # 3 batches an epoch (700 / 320)


def test_a_pipeline_built_again_closes_the_one_it_replaces(tmp_path):
    from .lightning_worker import Classifier

    built = []

    def build(module):
        built.append(curate.pipeline(make_samples(64), learner=module.net, scorer=curate.ClassificationScorer(),
                                     rule="hard_learner", batch_size=8, superbatch_size=32, shuffle_buffer=0))
        return built[-1]

    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, reload_dataloaders_every_n_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(Classifier(), datamodule=CuratedDataModule(build))
    assert len(built) == 3
    for old in built[:-1]:
        with pytest.raises(RuntimeError, match="after close"):
            iter(old)
    assert next(iter(built[-1]))["input"].shape[0] == 8  # the one in use stays open


def test_a_rebuild_that_raises_leaves_the_pipeline_it_would_replace_open(tmp_path):
    from .lightning_worker import Classifier

    built = []

    def build(module):
        if built:
            raise OSError("the shards are gone")
        built.append(curate.pipeline(make_samples(64), learner=module.net, scorer=curate.ClassificationScorer(),
                                     rule="hard_learner", batch_size=8, superbatch_size=32, shuffle_buffer=0))
        return built[-1]

    dm = CuratedDataModule(build)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, reload_dataloaders_every_n_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(OSError, match="shards are gone"):
        trainer.fit(Classifier(), datamodule=dm)
    assert dm.pipe is built[0]
    assert dm.state_dict()["ranks"][0]["state"]  # the state of the batches trained, still there to checkpoint
    assert next(iter(dm.pipe))["input"].shape[0] == 8  # not closed by the rebuild that never came


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_rebuilt_every_epoch_with_prefetch_checkpoints_and_keeps_open_files_flat(tmp_path):
    # the ranks' states are gathered on the pipeline's group while its prefetch thread may be in a collective on
    # it (without waiting for that, both ranks timed out in the gather); every epoch closes the old pipeline
    _torchrun(RELOAD_WORKER, str(tmp_path))
    for rank in range(2):
        out = json.loads((tmp_path / f"reload-{rank}.json").read_text())
        assert out["steps"] == 6 * 12  # 200 samples per rank, superbatch 16 (filter 0.5): 12 batches an epoch
        assert len(out["open_files"]) == 6 and len(set(out["open_files"])) == 1  # before the release: +5 an epoch
    assert len(list((tmp_path / "ckpt").glob("*.ckpt"))) == 14  # every 5 steps of 72
