"""One shard of `curate precompute`: read it, score it with the reference, write its Parquet part whole.

The function both backends run (`pipelines.precompute` in this process, `pipelines.precompute_ray` in Ray
actors), in a module of its own so that neither backend imports the other.
"""

from __future__ import annotations

import os
import socket
import time

import torch

from curate.cache import model_hash, write_part
from curate.scorers import score_model

from . import tasks
from .recipe import Recipe

__all__ = ["DROP", "ShardError", "fail_message", "part_path", "precompute_shard", "provenance", "score_shard"]

DROP = ("caption", "noise")  # sample fields default_collate cannot batch and scoring never reads


class ShardError(RuntimeError):
    """A shard that could not be scored whole: `keys` are the samples read from it before the failure."""

    def __init__(self, url: str, keys: list[str], cause: str):
        super().__init__(f"shard {url} failed after {len(keys)} samples ({cause})")
        self.url, self.keys, self.cause = url, keys, cause


def part_path(recipe: Recipe, index: int) -> str:
    return f"{recipe.cache.path.rstrip('/')}/part-{index:05d}.parquet"


def provenance(recipe: Recipe) -> dict:
    """What every part of this recipe's cache records, and so what `curate precompute` and `curate run` check
    a part against: reference, dataset, scorer kind (losses, softmax or sigmoid embeddings) and scorer."""
    scorer = tasks.scorer_for(recipe, recipe.reference_model)
    return {"reference_hash": tasks.reference_hash(recipe), "dataset": tasks.dataset_identity(recipe),
            "kind": scorer.kind,
            "scorer": repr(scorer)}


def precompute_shard(recipe: Recipe, index: int, url: str, model: torch.nn.Module, *,
                     expected: int | None = None) -> int:
    """Score one shard with the reference in batches of `cache.batch_size` and write its part; returns the
    number of rows. Raises `ShardError` when the shard cannot be read and scored whole (`expected`: the
    sample count the manifest lists for it); write errors (storage) propagate as they are."""
    from torch.utils.data import default_collate

    task = tasks.task_of(recipe)
    scorer = tasks.scorer_for(recipe, recipe.reference_model)
    keys: list[str] = []  # every key read, scored or still in `chunk`: what a failure reports
    losses, images, texts, chunk = [], [], [], []
    try:
        samples = iter(task.load([url], storage_options=recipe.data.storage_options))
        while True:
            sample = next(samples, None)
            if sample is not None:
                keys.append(sample["__key__"])
                chunk.append({k: v for k, v in sample.items() if k not in DROP})
            if chunk and (sample is None or len(chunk) == recipe.cache.batch_size):
                scores = score_model(model, default_collate(chunk), scorer, recipe.cache.batch_size).to("cpu")
                if scores.contrastive:
                    images.append(scores.image_emb)
                    texts.append(scores.text_emb)
                else:
                    losses.append(scores.loss)
                chunk = []
            if sample is None:
                break
    except Exception as error:  # anything a damaged shard can raise: tar, decode, collate, forward
        raise ShardError(url, keys, f"{type(error).__name__}: {error}") from error
    if expected is not None and len(keys) != expected:  # the manifest's count (the embedded data's)
        raise ShardError(url, keys, f"read {len(keys)} samples, the manifest lists {expected}")
    if not keys:
        raise ShardError(url, keys, "no samples")
    # writer and written_at: who wrote the part and when (--overwrite redoes parts written before it started)
    metadata = {"reference_hash": model_hash(model), "scorer": repr(scorer), "recipe": recipe.name,
                "dataset": tasks.dataset_identity(recipe), "data_root": recipe.data.root, "shard": url,
                "writer": f"{socket.gethostname()}:{os.getpid()}", "written_at": repr(time.time())}
    if images:
        bias = getattr(model, "logit_bias", None)
        write_part(part_path(recipe, index), keys, image_emb=torch.cat(images), text_emb=torch.cat(texts),
                   logit_scale=model.logit_scale.item(), logit_bias=None if bias is None else bias.item(),
                   metadata=metadata, kind=scorer.kind, storage_options=recipe.data.storage_options)
    else:
        write_part(part_path(recipe, index), keys, ref_loss=torch.cat(losses), metadata=metadata, kind=scorer.kind,
                   storage_options=recipe.data.storage_options)
    return len(keys)


def score_shard(recipe: Recipe, model: torch.nn.Module, index: int, url: str, expected: int | None) -> dict:
    """`precompute_shard` as the record both backends collect: {index, url, rows, error, keys_read,
    corrupt_skipped} (the last: the keys of samples that did not decode, skipped under data.on_corrupt: skip)."""
    reader = getattr(tasks.task_of(recipe), "reader", None)  # your own shards' SampleReader
    before = len(reader.skipped) if reader is not None else 0
    try:
        rows, error, keys = precompute_shard(recipe, index, url, model, expected=expected), "", []
    except ShardError as failure:
        rows, error, keys = 0, failure.cause, failure.keys
    skipped = [key for shard, key, _ in reader.skipped[before:] if shard == url] if reader is not None else []
    return {"index": index, "url": url, "rows": rows, "error": error, "keys_read": keys, "corrupt_skipped": skipped}


def fail_message(record: dict) -> str:
    return (f"precompute: shard {record['url']} cannot be read whole ({record['error']}; "
            f"{len(record['keys_read'])} samples read before it); fix or regenerate it, or rerun with "
            "--on-error skip to record it in the report and score the other shards")
