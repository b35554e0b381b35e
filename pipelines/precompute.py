"""`curate precompute RECIPE`: the reference model over the train shards → a Parquet score cache.

One part per input shard (`part-NNNNN.parquet`, N = the shard's index in the manifest), so the job is
sharded by `--rank/--world-size` (shard i belongs to rank i % world_size) and resumable: a part is only ever
written whole (`curate.cache.write_part` writes a temporary file and renames it; on S3 a part is one PUT), so
a part that exists and records this recipe's provenance (`score_shard.provenance`: reference hash, dataset
identity, scorer kind and scorer) is finished and skipped; a part of another reference, dataset or scorer is
stale and rescored, and `overwrite=True` (`--overwrite`) rescores every part. Concurrent runs on one cache
split the work through claims (`pipelines.claims`): each shard is scored by one of them. A shard that cannot
be read whole (a corrupt or truncated tar, a sample that does not decode, fewer samples than the manifest
lists) fails the job by default; `on_error="skip"` writes no part for it and records it, with the keys
that could be read before the damage, in `precompute_report.json` under the run directory.
`backend="ray"` runs the same per-shard function under Ray Data (`pipelines.precompute_ray`) for clusters.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from pathlib import Path

from curate.cache import SCHEMA_VERSION, CorruptPartError, ScoreCache, part_metadata
from curate.files import filesystem, stale_temps, write_json

from . import tasks
from .claims import Claims
from .extras import needs_extra
from .progress import progress as show_progress
from .recipe import Recipe
from .score_shard import ShardError, fail_message, part_path, precompute_shard, provenance, score_shard

__all__ = ["precompute", "precompute_shard", "score_shard", "ShardError", "inspect_cache", "part_path",
           "report_path", "fail_message"]


def report_path(recipe: Recipe, rank: int = 0, world_size: int = 1) -> Path:
    """Where a rank's summary goes: one file per rank, so concurrent ranks never overwrite each other."""
    name = "precompute_report.json" if world_size == 1 else f"precompute_report-{rank:05d}-of-{world_size:05d}.json"
    return recipe.out / name


def precompute(recipe: Recipe, *, rank: int = 0, world_size: int = 1, backend: str = "local",
               on_error: str = "fail", actors: int | None = None, cpus_per_actor: float | None = None,
               overwrite: bool = False, claim_timeout_s: float = 600.0, log=print) -> dict:
    """Write this rank's missing parts and `report_path(recipe, rank, world_size)`; returns that summary.

    Args:
        rank, world_size: this process scores shards i with i % world_size == rank.
        backend: "local" (this process, GPU when the recipe's device resolves to one) or "ray" (Ray Data actors).
        on_error: "fail" raises on the first shard that cannot be read whole, naming it; "skip" writes no
            part for it, records it and the keys read from it in the report, and goes on.
        actors, cpus_per_actor: the Ray actor pool (see `pipelines.precompute_ray.run_ray`); ignored locally.
        overwrite: rescore every part of this rank, also those that are current (written before this run started).
        claim_timeout_s: a claim on a shard that its owner has not refreshed for this long is taken over (its
            owner hung or died on another host; a dead owner on this host is noticed at once).
    """
    if not recipe.cache.path:
        raise ValueError("cache.path: precompute needs a cache path in the recipe, e.g. cache: {path: runs/x/cache}")
    if not 0 <= rank < world_size:
        raise ValueError(f"precompute: need 0 <= rank < world_size, got {rank=} {world_size=}")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"precompute: on_error must be 'fail' or 'skip', got {on_error=}")
    if backend not in ("local", "ray"):
        raise ValueError(f"precompute: backend must be 'local' or 'ray', got {backend=}")
    counts = tasks.shard_counts(recipe)
    urls = tasks.shard_urls(recipe, "train")
    mine = [(i, url, counts[i]) for i, url in enumerate(urls) if i % world_size == rank]
    if backend == "ray":
        from .precompute_ray import require_ray

        require_ray()
    fs, root = filesystem(recipe.cache.path, recipe.data.storage_options)
    fs.invalidate_cache(root)  # s3fs caches listings; parts another process wrote must show up
    listed = _names(fs, root)  # one listing (on S3 a request) gives the parts and the claims killed writers left
    done = {name for name in listed if name.startswith("part-") and name.endswith(".parquet")}
    check = _Check(recipe, provenance(recipe), time.time() if overwrite else None)
    states = {index: check(part_path(recipe, index)) if posixpath.basename(part_path(recipe, index)) in done
              else "missing" for index, _, _ in mine}
    todo = [shard for shard in mine if states[shard[0]] != "current"]
    stale = sorted(index for index, state in states.items() if state not in ("current", "missing"))
    if stale:
        log(f"precompute: rescoring {len(stale)} parts that are not current (part {stale[0]}: {states[stale[0]]})")
    start = time.perf_counter()
    bar = show_progress(None if None in counts else sum(count or 0 for _, _, count in todo), "precompute", "sample")
    with Claims(fs, claim_timeout_s, log) as claims:
        # a writer killed between writing its part and releasing the claim leaves the claim of a whole part, which
        # no later run would claim again: clear it unless its owner is still live
        left = {name for name in listed if name.startswith(".part-") and name.endswith(".parquet.claim")}
        for index, state in states.items():
            part = part_path(recipe, index)
            if state == "current" and posixpath.basename(Claims.path(part)) in left and claims.acquire(part):
                claims.release(part)
        try:
            if backend == "ray":
                from .precompute_ray import run_ray

                claimed, elsewhere, finished = _claim_all(recipe, todo, claims, check, log)
                records = run_ray(recipe, claimed, on_error=on_error, actors=actors, cpus_per_actor=cpus_per_actor,
                                  progress=bar.update)
            else:
                records, elsewhere, finished = _run_local(recipe, todo, on_error, claims, check, bar.update, log)
        finally:
            bar.close()
    seconds = time.perf_counter() - start
    rows = sum(record["rows"] for record in records)
    failed = sorted((r for r in records if r["error"]), key=lambda r: r["index"])
    written = sorted(r["index"] for r in records if not r["error"])
    summary = {"cache": recipe.cache.path, "backend": backend, "rank": rank, "world_size": world_size,
               "shards": len(mine), "parts_written": len(written),
               "parts_existing": len(mine) - len(todo) + finished, "parts_rescored": len(set(stale) & set(written)),
               "parts_claimed_elsewhere": len(elsewhere), "shards_skipped": len(failed), "rows": rows,
               "seconds": round(seconds, 2), "samples_per_s": round(rows / seconds, 1) if seconds else None,
               "written": written, "claimed_elsewhere": elsewhere,
               "skipped": [{"shard": r["url"], "index": r["index"], "error": r["error"],
                            "keys_read": r["keys_read"]} for r in failed],
               "corrupt_samples_skipped": {r["url"]: r["corrupt_skipped"] for r in records if r.get("corrupt_skipped")}}
    write_json(report_path(recipe, rank, world_size), summary, parents=True)
    log(f"precompute: {summary['parts_written']} parts written ({summary['parts_rescored']} of them rescored), "
        f"{summary['parts_existing']} already there, {len(elsewhere)} being written by another run, "
        f"{len(failed)} shards skipped, {sum(map(len, summary['corrupt_samples_skipped'].values()))} corrupt samples "
        f"skipped; {rows} rows in {seconds:.1f}s ({summary['samples_per_s']} samples/s) "
        f"→ {recipe.cache.path}" + (f"; skipped shards are listed in {report_path(recipe, rank, world_size)}"
                                    if failed else ""))
    return summary


def _names(fs, root: str) -> set[str]:
    """The names directly under `root`; none where it does not exist yet (a first run)."""
    try:
        return {posixpath.basename(path.rstrip("/")) for path in fs.ls(root, detail=False)}
    except FileNotFoundError:
        return set()


class _Check:
    """Whether an existing part is current: "current", or why it is not (another reference, dataset, scorer,
    schema, an unreadable footer, or written before an --overwrite run started)."""

    def __init__(self, recipe: Recipe, expected: dict, written_after: float | None):
        self.storage_options = recipe.data.storage_options
        self.expected = {name: value for name, value in expected.items() if value is not None}
        self.expected["schema_version"] = str(SCHEMA_VERSION)
        self.written_after = written_after

    def __call__(self, part: str) -> str:
        try:
            meta = part_metadata(part, self.storage_options)
        except FileNotFoundError:
            return "missing"
        except CorruptPartError:
            return "its footer is unreadable"
        for name, value in self.expected.items():
            if meta.get(name) != value:
                return f"{name} {meta.get(name)!r}, now {value!r}"
        if self.written_after is not None and float(meta.get("written_at") or 0) < self.written_after:
            return "written before this --overwrite run"
        return "current"


def _claim(recipe: Recipe, index: int, claims: Claims, check: _Check, log) -> str:
    """Claims shard `index`'s part: "mine" (to score; what killed writers left of it removed), "elsewhere" (a
    live claim of another run) or "finished" (another run wrote it since this one looked)."""
    part = part_path(recipe, index)
    if not claims.acquire(part):
        return "elsewhere"
    if check(part) == "current":
        claims.release(part)
        return "finished"
    if claims.local:  # the temps of a part we hold the claim on are what dead or stale writers left
        stale = stale_temps(part)
        for temp in stale:
            os.remove(temp)
        if stale:
            log(f"precompute: removed {len(stale)} temp files an interrupted run left for {posixpath.basename(part)}")
    return "mine"


def _claim_all(recipe: Recipe, todo: list[tuple[int, str, int]], claims: Claims, check: _Check,
               log) -> tuple[list[tuple[int, str, int]], list[int], int]:
    """The Ray backend claims its shards up front (the driver holds them while the actors score)."""
    states = {index: _claim(recipe, index, claims, check, log) for index, _, _ in todo}
    return ([shard for shard in todo if states[shard[0]] == "mine"],
            [index for index, state in states.items() if state == "elsewhere"],
            sum(state == "finished" for state in states.values()))


def _run_local(recipe: Recipe, todo: list[tuple[int, str, int]], on_error: str, claims: Claims, check: _Check,
               progress, log) -> tuple[list[dict], list[int], int]:
    """Scores the shards one at a time, each under its claim; the reference is loaded at the first one claimed."""
    model = None
    records, elsewhere, finished = [], [], 0
    for index, url, expected in todo:
        state = _claim(recipe, index, claims, check, log)
        if state != "mine":
            elsewhere += [index] if state == "elsewhere" else []
            finished += state == "finished"
            progress(expected or 0)
            continue
        if model is None:
            model, _ = tasks.load_reference(recipe)
            model.to(tasks.resolve_device(recipe.train.device))
        record = score_shard(recipe, model, index, url, expected)
        claims.release(part_path(recipe, index))
        if record["error"] and on_error == "fail":
            raise RuntimeError(fail_message(record))
        records.append(record)
        progress(record["rows"] or expected or 0)
    return records, elsewhere, finished


def inspect_cache(path: str, *, png: Path | None = None, storage_options: dict | None = None, log=print) -> dict:
    """Print `describe()` and write a histogram of the reference scores (losses, or positive-pair cosine)."""
    with needs_extra("curate inspect"):
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
