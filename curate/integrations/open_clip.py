"""open_clip_train: curated batches in the shape its training loop reads (`pip install "curate[open_clip]"`).

open_clip_train's `train_one_epoch(model, data, ...)` reads `data["train"]`, a `DataInfo` whose dataloader has
`num_batches` and `num_samples` and yields `(images, texts)`; it calls `data["train"].set_epoch(epoch)` before each
epoch, also when it resumes. `data_info(pipe)` is that for any curate pipeline of image-text batches, and
`get_data(...)` builds one from a webdataset URL pattern, the model's preprocess and tokenizer, and a selection:

    data = {"train": curate.integrations.open_clip.get_data(
        "shards/{000000..000099}.tar", preprocess_train, tokenizer, num_samples=1_000_000, batch_size=256,
        learner=model, reference=reference, scorer=curate.ContrastiveScorer(loss="softmax"))}
    train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, None, args)

Its state is the pipeline's (`data["train"].dataloader.state_dict()`, or `curate.save_state(dir, pipe)` per rank).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ..pipeline import Pipeline, pipeline
from . import require

require("open_clip_train", "open_clip", "open_clip_torch[training]", "curate.integrations.open_clip")
import webdataset as wds  # noqa: E402  (installed with open_clip_torch[training])
from open_clip_train.data import DataInfo  # noqa: E402

__all__ = ["CuratedDataInfo", "OpenClipLoader", "data_info", "get_data", "webdataset_pairs"]


class OpenClipLoader:
    """A pipeline as open_clip_train's dataloader: `(images, texts)` batches, `num_batches` (this rank's batches per
    epoch) and `num_samples` (samples trained per epoch over all ranks, as open_clip counts them)."""

    def __init__(self, pipe: Pipeline, image: str = "image", text: str = "text"):
        try:
            self.num_batches = len(pipe)
        except TypeError:
            raise ValueError("curate.integrations.open_clip: open_clip_train needs the number of batches per epoch, "
                             "and the pipeline's source does not know its length; give num_samples= to get_data or "
                             "batches_per_epoch= to curate.pipeline") from None
        self.pipe, self.image, self.text = pipe, image, text
        self.num_samples = self.num_batches * pipe.config["batch_size"] * pipe.world_size

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple]:
        for batch in self.pipe:
            if isinstance(batch, tuple):  # the pipeline already gives (images, texts)
                yield batch
            else:
                yield batch[self.image], batch[self.text]

    def state_dict(self) -> dict:
        return self.pipe.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.pipe.load_state_dict(state)


@dataclass
class CuratedDataInfo(DataInfo):
    """open_clip_train's DataInfo whose `set_epoch` reaches the pipeline (its shuffle and selection draw that
    epoch's randomness; after `load_state_dict`, the loaded epoch continues)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataloader.pipe.set_epoch(epoch)


def data_info(pipe: Pipeline, *, image: str = "image", text: str = "text") -> CuratedDataInfo:
    """What `open_clip_train.data.get_data(...)["train"]` is, for `pipe`'s batches (fields `image` and `text`)."""
    if not isinstance(pipe, Pipeline):
        raise TypeError(f"data_info: pipe must be a curate.Pipeline (what curate.pipeline returns), got "
                        f"{type(pipe).__name__}")
    return CuratedDataInfo(OpenClipLoader(pipe, image, text))


def webdataset_pairs(urls: str | Sequence[str], preprocess: Callable, tokenizer: Callable, *,
                     image_key: str = "jpg;png;jpeg;webp", text_key: str = "txt", split_by_node: bool = True):
    """A webdataset pipeline of `{"__key__", "image", "text"}` samples from tar shards, decoded as open_clip_train
    decodes them: `preprocess(PIL RGB image)` and `tokenizer([caption])[0]`. With `split_by_node` each rank reads
    its own shards (curate sees the split and does not split again)."""
    def sample(row: dict) -> dict:
        return {"__key__": row["__key__"], "image": preprocess(row["image"]), "text": tokenizer([row["text"]])[0]}

    split = [wds.split_by_node] if split_by_node else []  # stages both webdataset lines (0.2.86, 1.x) share
    return wds.DataPipeline(wds.SimpleShardList(urls), *split, wds.tarfile_to_samples(), wds.decode("pilrgb"),
                            wds.rename(image=image_key, text=text_key), wds.map(sample))


def get_data(urls: str | Sequence[str], preprocess: Callable, tokenizer: Callable, *, num_samples: int,
             batch_size: int, image_key: str = "jpg;png;jpeg;webp", text_key: str = "txt",
             **options) -> CuratedDataInfo:
    """open_clip_train's `data["train"]`, curated: `webdataset_pairs(urls, ...)` through `curate.pipeline(...,
    batch_size=batch_size, **options)` (learner=, reference=, scorer=, method=, filter_ratio=, ...).

    Args:
        num_samples: samples in one epoch of the shards, all ranks together (open_clip's --train-num-samples):
            each rank reads num_samples / world_size of them, so it trains on that / superbatch size batches.
    """
    pipe = pipeline(webdataset_pairs(urls, preprocess, tokenizer, image_key=image_key, text_key=text_key),
                    batch_size=batch_size, **options)
    if pipe.batches_per_epoch is None:
        per_rank = num_samples // pipe.world_size
        pipe.batches_per_epoch = max(1, math.floor(per_rank / pipe.config["superbatch_size"]))
    return data_info(pipe)
