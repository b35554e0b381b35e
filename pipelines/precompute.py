"""`curate precompute RECIPE`: the reference model over the train shards → a Parquet score cache.

One part per input shard (`part-NNNNN.parquet`, N = the shard's index), so the job is sharded by
`--rank/--world-size` (shard i belongs to rank i % world_size) and resumable: a part that exists is
skipped, and a part is only ever written whole (`curate.cache.write_part` is atomic). A corrupt shard
fails the job by default; `on_error="skip"` records it in `precompute_report.json` and goes on.
`backend="ray"` runs the same per-shard function under Ray Data for clusters.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from curate.cache import ScoreCache, filesystem, model_hash, write_part
from curate.recipe import Recipe
from curate.score import score_model

from . import tasks

__all__ = ["precompute", "precompute_shard", "inspect_cache", "part_path"]


def part_path(recipe: Recipe, index: int) -> str:
    return f"{recipe.cache.path.rstrip('/')}/part-{index:05d}.parquet"


def precompute_shard(recipe: Recipe, index: int, url: str, model: torch.nn.Module, device: torch.device) -> int:
    """Score one shard with the reference and write its part; returns the number of rows."""
    from torch.utils.data import default_collate

    from . import data

    scorer = tasks.scorer_for(recipe, recipe.reference_model)
    load = data.load_pairs if recipe.data.dataset == "pairs" else data.load_digits
    keys, losses, images, texts = [], [], [], []
    chunk: list[dict] = []
    samples = iter(load([url], storage_options=recipe.data.storage_options))
    while True:
        sample = next(samples, None)
        if sample is not None:
            chunk.append({k: v for k, v in sample.items() if k not in ("caption", "noise")})
        if chunk and (sample is None or len(chunk) == recipe.cache.batch_size):
            batch = default_collate(chunk)
            scores = score_model(model, batch, scorer, recipe.cache.batch_size).to("cpu")
            keys += batch["__key__"]
            if scores.contrastive:
                images.append(scores.image_emb)
                texts.append(scores.text_emb)
            else:
                losses.append(scores.loss)
            chunk = []
        if sample is None:
            break
    metadata = {"reference_hash": model_hash(model), "scorer": repr(scorer), "recipe": recipe.name,
                "dataset": f"{recipe.data.root}/{recipe.data.dataset}/train", "shard": url}
    if images:
        bias = getattr(model, "logit_bias", None)
        write_part(part_path(recipe, index), keys, image_emb=torch.cat(images).numpy(),
                   text_emb=torch.cat(texts).numpy(), logit_scale=model.logit_scale.item(),
                   logit_bias=None if bias is None else bias.item(), metadata=metadata,
                   storage_options=recipe.data.storage_options)
    else:
        write_part(part_path(recipe, index), keys, ref_loss=torch.cat(losses).numpy(), metadata=metadata,
                   storage_options=recipe.data.storage_options)
    return len(keys)


def precompute(recipe: Recipe, *, rank: int = 0, world_size: int = 1, backend: str = "local",
               on_error: str = "fail", log=print) -> dict:
    """Write this rank's missing parts; returns a summary (parts written / skipped / failed, samples/s)."""
    if not recipe.cache.path:
        raise ValueError("cache.path: precompute needs a cache path in the recipe, e.g. cache: {path: runs/x/cache}")
    if not 0 <= rank < world_size:
        raise ValueError(f"precompute: need 0 <= rank < world_size, got {rank=} {world_size=}")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"precompute: on_error must be 'fail' or 'skip', got {on_error=}")
    urls = tasks.shard_urls(recipe, "train")
    fs, _ = filesystem(recipe.cache.path, recipe.data.storage_options)
    mine = [(i, url) for i, url in enumerate(urls) if i % world_size == rank]
    todo = [(i, url) for i, url in mine if not fs.exists(part_path(recipe, i))]
    if backend == "ray":
        from .precompute_ray import run_ray

        return run_ray(recipe, todo, log=log)
    if backend != "local":
        raise ValueError(f"precompute: backend must be 'local' or 'ray', got {backend=}")
    device = tasks.resolve_device(recipe.train.device)
    model, _ = tasks.load_model(recipe.reference_path, recipe, recipe.reference_model)
    model.to(device)
    start, rows, failed = time.perf_counter(), 0, {}
    bar = tqdm(total=len(todo), desc="precompute", unit="shard", disable=not sys.stderr.isatty(), file=sys.stderr)
    for index, url in todo:
        try:
            rows += precompute_shard(recipe, index, url, model, device)
        except Exception as error:  # a corrupt or unreadable shard
            if on_error == "fail":
                raise RuntimeError(f"precompute: shard {url} failed ({type(error).__name__}: {error}); "
                                   "fix or remove it, or rerun with on_error='skip' to record and skip it") from error
            failed[url] = f"{type(error).__name__}: {error}"
        bar.update(1)
        bar.set_postfix(samples_per_s=f"{rows / (time.perf_counter() - start):.0f}")
    bar.close()
    seconds = time.perf_counter() - start
    summary = {"rank": rank, "world_size": world_size, "parts_written": len(todo) - len(failed),
               "parts_skipped_existing": len(mine) - len(todo), "failed_shards": failed, "rows": rows,
               "seconds": round(seconds, 2), "samples_per_s": round(rows / seconds, 1) if seconds else None}
    if failed:
        report = Path(recipe.out) / "precompute_report.json"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(summary, indent=2))
    log(f"precompute: {summary['parts_written']} parts written, {summary['parts_skipped_existing']} already there, "
        f"{len(failed)} failed; {rows} rows in {seconds:.1f}s → {recipe.cache.path}")
    return summary


def inspect_cache(path: str, *, png: Path | None = None, storage_options: dict | None = None, log=print) -> dict:
    """Print `describe()` and write a histogram of the reference scores (losses, or positive-pair cosine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cache = ScoreCache.open(path, storage_options)
    description = cache.describe()
    log(json.dumps(description, indent=2, default=str))
    if cache.ref_loss is not None:
        values, label = cache.ref_loss, "reference loss"
    else:
        values, label = (cache.image_emb * cache.text_emb).sum(1), "reference cosine(image, text)"
    png = Path(png or "scores.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=60)
    ax.set(xlabel=label, ylabel="samples", title=f"{path} ({len(cache)} rows)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    log(f"wrote {png}")
    return description
