"""Lightning: a `LightningDataModule` whose training batches are curated and whose checkpoints hold every rank's
pipeline state (`pip install "curate[lightning]"`).

    datamodule = curate.integrations.lightning.CuratedDataModule(
        lambda module: curate.pipeline(loader, learner=module.net, reference=reference, scorer=..., batch_size=64))
    trainer.fit(module, datamodule=datamodule)              # and trainer.fit(..., ckpt_path=...) resumes

Lightning writes checkpoints from rank 0 only, and a loader's own state would be rank 0's: after a DDP resume every
rank would replay rank 0's stream. The data module's `state_dict()` (called on every rank when Lightning dumps a
checkpoint) gathers all ranks' states into it; `load_state_dict` gives each rank its own, and refuses a checkpoint of
another world size.

When the pipeline has no length, Lightning's fit loop fetches one batch ahead (to know which batch is the last), so
when it saves after step k the pipeline has already made batch k + 1, selected with the weights before step k. The
checkpoint then holds that batch too (one training batch per rank), and a resume trains it next: the same batch,
not a re-selection with newer weights. The read-ahead shows in `stats()["score_lag_steps"]` (`Pipeline.read_ahead`).
With a length (`len(pipe)`, e.g. a list or a DataLoader source) Lightning fetches nothing ahead.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence

from ..distributed import resolve_world
from ..pipeline import Pipeline
from . import require

require("lightning", "lightning", "lightning", "curate.integrations.lightning")
import lightning.pytorch as pl  # noqa: E402

__all__ = ["CuratedDataModule"]

_READ_AHEAD = 1  # batches Lightning's fit loop fetches ahead when the loader has no length (_PrefetchDataFetcher)


class _CountingLoader:
    """The pipeline as Lightning's train loader, counting the batches of the epoch it hands out and keeping the
    last few, so that a state can be taken after any batch Lightning has trained: the pipeline's own state plus the
    batches handed out after it that Lightning had fetched ahead but not trained (handed out again on resume)."""

    def __init__(self, pipe: Pipeline, done: int = 0, pending: Sequence = ()):
        self.pipe = pipe
        self.done = done  # batches of this epoch handed to Lightning
        self.produced = done + len(pending)  # batches of this epoch the pipeline has made (its state is after them)
        self.queue = list(pending)  # made before a resume but never trained: handed out first
        self.recent: deque[tuple[int, object]] = deque(maxlen=_READ_AHEAD + 1)
        self._first = True

    def __len__(self) -> int:
        return len(self.pipe)

    def __iter__(self) -> Iterator:
        it = iter(self.pipe)
        if self._first:  # continues the epoch of a resumed state (or starts the first one)
            self._first = False
        else:
            self.done = self.produced = 0
            self.queue, self.recent = [], deque(maxlen=_READ_AHEAD + 1)
        while self.queue:
            yield self._hand_out(self.queue.pop(0))
        for batch in it:
            self.produced += 1
            yield self._hand_out(batch)

    def _hand_out(self, batch):
        self.done += 1
        self.recent.append((self.done, batch))
        return batch

    def state_after(self, trained: int) -> dict:
        """The state to resume after `trained` batches of the current epoch."""
        ahead = [batch for i, batch in self.recent if trained < i] + self.queue
        if len(ahead) != self.produced - trained:
            raise RuntimeError(f"CuratedDataModule: Lightning trained {trained} batches of this epoch but the pipeline "
                               f"made {self.produced}: more read-ahead than Lightning's fit loop has ({_READ_AHEAD}); "
                               "a custom data fetcher is not supported")
        return {"state": self.pipe.state_dict(), "trained": trained, "pending": ahead}


class CuratedDataModule(pl.LightningDataModule):
    """A data module whose `train_dataloader()` is `build(lightning_module)`, a curate pipeline (built once the
    module, and so the learner, is on its device), checkpointed for every rank (see the module doc).

    Args:
        build: the LightningModule → its `curate.pipeline(...)` (learner= the module or the network it trains).
        val_dataloader, test_dataloader: optional functions returning those loaders (not curated).
    """

    def __init__(self, build: Callable[[pl.LightningModule], Pipeline], *,
                 val_dataloader: Callable | None = None, test_dataloader: Callable | None = None):
        super().__init__()
        self.build = build
        self.pipe: Pipeline | None = None
        self._loader: _CountingLoader | None = None
        self._pending: dict | None = None  # a loaded state, for the pipeline train_dataloader() builds
        if val_dataloader is not None:
            self.val_dataloader = val_dataloader  # type: ignore[method-assign]
        if test_dataloader is not None:
            self.test_dataloader = test_dataloader  # type: ignore[method-assign]

    def train_dataloader(self) -> _CountingLoader:
        pipe = self.build(self.trainer.lightning_module)  # type: ignore[union-attr]
        if not isinstance(pipe, Pipeline):
            raise TypeError(f"CuratedDataModule: build must return a curate.Pipeline (what curate.pipeline returns), "
                            f"got {type(pipe).__name__}")
        # called again (`reload_dataloaders_every_n_epochs`, a second fit): the new pipeline replaces the old one,
        # whose thread, workers and process group end now. Closed only once the new one is built, so that a build
        # that raises leaves the old pipeline and its state as they were
        if self.pipe is not None:
            self.pipe.close()
        pipe.read_ahead = 0 if pipe.batches_per_epoch is not None else _READ_AHEAD
        self.pipe, self._loader = pipe, _CountingLoader(pipe)
        if self._pending is not None:
            self._resume(self._pending)
            self._pending = None
        return self._loader

    def _resume(self, mine: dict) -> None:
        assert self.pipe is not None
        self.pipe.load_state_dict(mine["state"])  # refuses another rank's or configuration's state
        self._loader = _CountingLoader(self.pipe, mine["trained"], mine["pending"])

    def state_dict(self) -> dict:
        """Every rank's pipeline state after the batches Lightning trained (a collective under DDP: Lightning calls
        it on every rank as it dumps a checkpoint)."""
        if self._loader is None:
            return {}
        trained = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed  # type: ignore[union-attr]
        mine = self._loader.state_after(trained)
        assert self.pipe is not None
        self.pipe.wait_background()  # a prefetch thread's collective on the same group would pair up wrongly
        states = self.pipe.comm.gather_object(mine)  # the pipeline's own group and timeout; [mine] in one process
        return {"world_size": len(states), "ranks": states}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        rank, world = resolve_world()
        saved = state_dict["world_size"]
        if saved != world:
            raise ValueError(f"CuratedDataModule: the checkpoint holds the pipeline states of {saved} ranks, this job "
                             f"runs {world}; resume with the number of processes it was saved with")
        mine = state_dict["ranks"][rank]
        if self.pipe is None:
            self._pending = mine
        else:
            self._resume(mine)
