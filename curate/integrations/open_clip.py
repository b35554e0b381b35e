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

open_clip_train's own `main`, unmodified, with curated training data: the same command line through this module,
plus a reference model and the selection's options (`--curate-*`, see `main`):

    python -m curate.integrations.open_clip --curate-reference ref.safetensors --curate-filter-ratio 0.8 \
        --train-data 'shards/{000000..000099}.tar' --train-num-samples 1000000 --dataset-type webdataset \
        --model ViT-B-32 --batch-size 256 ...   (any open_clip_train option)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .. import lengths
from ..distributed import Lockstep
from ..joint_select import METHODS
from ..pipeline import Pipeline, pipeline
from ..scorers import ContrastiveScorer
from . import require

require("open_clip_train", "open_clip", "open_clip_torch[training]", "curate.integrations.open_clip")
import webdataset as wds  # noqa: E402  (installed with open_clip_torch[training])
from open_clip_train.data import DataInfo  # noqa: E402

__all__ = ["CuratedDataInfo", "OpenClipLoader", "data_info", "get_data", "main", "webdataset_pairs"]

log = logging.getLogger("curate.integrations.open_clip")


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
    if pipe.batches_per_epoch is None:  # split by node: each rank reads num_samples / world_size of them
        pipe.batches_per_epoch = lengths.batches_per_epoch(
            num_samples // pipe.world_size, pipe.config["superbatch_size"], drop_last=pipe.config["drop_last"],
            lockstep=any(isinstance(node, Lockstep) for node in pipe.chain))
    return data_info(pipe)


def _curate_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m curate.integrations.open_clip", add_help=False,
                                     description="open_clip_train's main on curated batches; every other option is "
                                                 "open_clip_train's (python -m open_clip_train.main --help)")
    parser.add_argument("--curate-reference", required=True,
                        help="the reference model's weights: a .safetensors or torch state dict file (loaded "
                             "weights-only) of --curate-reference-model")
    parser.add_argument("--curate-reference-model", default=None,
                        help="the reference's open_clip model name or local-dir:PATH (default: --model)")
    parser.add_argument("--curate-method", default="joint", choices=list(METHODS))
    parser.add_argument("--curate-filter-ratio", type=float, default=0.8)
    parser.add_argument("--curate-n-chunks", type=int, default=16)
    parser.add_argument("--curate-shuffle-buffer", type=int, default=1024)
    parser.add_argument("--curate-help", action="help", help="show these options and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run open_clip_train's `main(argv)` with its training data curated: its `get_data` builds the validation data
    as usual, and `data["train"]` is `get_data(args.train_data, ...)` above, scored by the model `main` trains (the
    learner) and the `--curate-reference` model, selected by `--curate-method` at `--curate-filter-ratio`. Needs
    webdataset shards (`--train-data`) and `--train-num-samples`. Nothing of open_clip_train is changed; its
    `get_data` and `create_model_and_transforms` are wrapped while `main` runs, to capture the learner."""
    ours, rest = _curate_options().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    import open_clip
    import open_clip_train.main as train_main

    made: list = []
    create, build_data = train_main.create_model_and_transforms, train_main.get_data

    def create_and_capture(*args, **kwargs):
        out = create(*args, **kwargs)
        made.append(out[0])  # the first model main creates is the one it trains (a distillation teacher follows)
        return out

    def curated_data(args, preprocess_fns, epoch=0, tokenizer=None):
        if not args.train_data or not args.train_num_samples:
            raise SystemExit("curate.integrations.open_clip: give --train-data (webdataset shards) and "
                             "--train-num-samples (samples per epoch, all ranks): curate curates the training data")
        data = build_data(argparse.Namespace(**{**vars(args), "train_data": None}),  # the validation data, as usual
                          preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        reference = open_clip.create_model(ours.curate_reference_model or args.model, precision=args.precision,
                                           device=args.device, output_dict=True)
        open_clip.load_checkpoint(reference, ours.curate_reference, weights_only=True)
        data["train"] = get_data(
            args.train_data, preprocess_fns[0], tokenizer, num_samples=args.train_num_samples,
            batch_size=args.batch_size, learner=made[0], reference=reference.eval(),
            scorer=ContrastiveScorer(loss="sigmoid" if args.siglip else "softmax"), method=ours.curate_method,
            filter_ratio=ours.curate_filter_ratio, n_chunks=ours.curate_n_chunks,
            shuffle_buffer=ours.curate_shuffle_buffer, seed=args.seed)
        log.info("curate: training on %s of every %s samples (%s), %d batches per epoch",
                 args.batch_size, data["train"].dataloader.pipe.config["superbatch_size"], ours.curate_method,
                 data["train"].dataloader.num_batches)
        return data

    train_main.create_model_and_transforms, train_main.get_data = create_and_capture, curated_data
    try:
        train_main.main(rest)
    finally:
        train_main.create_model_and_transforms, train_main.get_data = create, build_data


if __name__ == "__main__":
    main()
