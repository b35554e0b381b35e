"""One rank of a `torchrun --nproc_per_node=2` job fitting a LightningModule on curated batches through
`curate.integrations.lightning.CuratedDataModule` (DDP, gloo, CPU), for tests/test_lightning.py.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/lightning_worker.py RUN OUT SIZED [CKPT]

SIZED "sized": the source is a list (the pipeline has a length); "unsized": an IterableDataset without one, for
which Lightning's fit loop fetches a batch ahead.

Each rank writes the keys of every batch its training_step saw, and its pipeline's stats, to OUT/RUN-RANK.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import curate  # noqa: E402
from curate.integrations.lightning import CuratedDataModule  # noqa: E402
from tests.conftest import linear_models, make_samples  # noqa: E402

torch.set_num_threads(1)
STEPS, EVERY = 16, 5  # an epoch is 12 steps per rank (200 samples / superbatch 16): 16 steps cross into epoch 2


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = linear_models(0)[0]
        self.seen: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(list(batch["__key__"]))
        return F.cross_entropy(self.net(batch["input"]), batch["target"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Unsized(IterableDataset):
    def __init__(self, samples):
        self.samples = samples

    def __iter__(self):
        return iter(self.samples)


def main(run: str, out: Path, sized: str, ckpt: str | None) -> None:
    module, reference = Classifier(), linear_models(1)[1]
    data = make_samples(400) if sized == "sized" else Unsized(make_samples(400))
    datamodule = CuratedDataModule(lambda m: curate.pipeline(
        data, learner=m.net, reference=reference, scorer=curate.ClassificationScorer(), batch_size=8,
        filter_ratio=0.5, method="sample", shuffle_buffer=64, seed=2))
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=EVERY, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=STEPS, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoints])
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    assert datamodule.pipe is not None
    stats = datamodule.pipe.stats()
    (out / f"{run}-{trainer.global_rank}.json").write_text(json.dumps(
        {"seen": module.seen, "score_lag_steps": stats["score_lag_steps"], "rank_split": stats["rank_split"]}))
    # a clean gloo teardown (as accelerate_worker's): Lightning's fit leaves the process group up, and once a rank
    # exited while the other's gloo threads still ran and aborted with "terminate called without an active exception"
    trainer.strategy.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
