"""One rank of a `torchrun --nproc_per_node=2` Lightning DDP fit for tests/test_lightning.py: the curated pipeline
rebuilt every epoch (`reload_dataloaders_every_n_epochs=1`), scored in a prefetch thread under a global selection
scope, and checkpointed every 5 steps (CuratedDataModule.state_dict gathers the ranks' states on the pipeline's
group while the prefetch thread may be in a collective on it). Writes OUT/reload-RANK.json: open files per epoch."""

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import curate  # noqa: E402
from curate.integrations.lightning import CuratedDataModule  # noqa: E402
from tests.conftest import linear_models, make_samples  # noqa: E402
from tests.lightning_worker import Classifier  # noqa: E402

torch.set_num_threads(1)


class OpenFiles(pl.Callback):
    def __init__(self):
        self.counts: list[int] = []

    def on_train_epoch_start(self, trainer, module):
        self.counts.append(len(os.listdir("/proc/self/fd")))


def main(out: Path) -> None:
    module, reference, data = Classifier(), linear_models(1)[1], make_samples(400)
    datamodule = CuratedDataModule(lambda m: curate.pipeline(
        data, learner=m.net, reference=reference, scorer=curate.ClassificationScorer(), batch_size=8,
        filter_ratio=0.5, method="sample", shuffle_buffer=64, seed=2, prefetch=1, selection_scope="global",
        timeout=30))
    files = OpenFiles()
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=5, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=6,
                         reload_dataloaders_every_n_epochs=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[checkpoints, files])
    trainer.fit(module, datamodule=datamodule)
    (out / f"reload-{trainer.global_rank}.json").write_text(json.dumps({"open_files": files.counts,
                                                                        "steps": trainer.global_step}))
    trainer.strategy.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
