"""`curate precompute RECIPE --backend ray`: the per-shard job of `pipelines.precompute` under Ray Data.

The shards to do become a Ray Dataset of (index, url, expected count) rows; `map_batches` hands them one
at a time to a pool of actors, each holding the reference model once, which run the very function the local
backend runs (`score_shard`: read, score in batches, write the part atomically) and return one record per
shard. So both backends write byte-for-byte the same rows; only where the work runs differs.

The reference's weights travel with the actors (safetensors bytes), so workers need the shards and the cache
location but not the driver's disk. Ray is an optional extra: `pip install "curate[ray]"`. `ray.init()` is
called only when Ray is not initialised yet: it joins the cluster in RAY_ADDRESS, else starts a local one.
"""

from __future__ import annotations

import math

from . import tasks
from .extras import needs_extra
from .recipe import Recipe
from .score_shard import fail_message, score_shard

__all__ = ["require_ray", "run_ray"]


class _ShardScorer:
    """A Ray Data actor: builds the reference once, then scores the shards of each batch it is given.

    Args:
        recipe_json: the recipe (`Recipe.model_dump_json()`): plain text crosses process boundaries safely.
        weights: the reference's state_dict as safetensors bytes.
        reference_hash: the driver's `model_hash`, checked after loading.
    """

    def __init__(self, recipe_json: str, weights: bytes, reference_hash: str):
        from safetensors.torch import load

        from curate.cache import model_hash

        self.recipe = Recipe.model_validate_json(recipe_json)
        model = tasks.build_model(self.recipe.reference_model, self.recipe, seed=0)
        model.load_state_dict(load(weights))
        if model_hash(model) != reference_hash:
            raise RuntimeError(f"precompute (ray): the reference rebuilt in an actor has hash {model_hash(model)}, "
                               f"the driver's has {reference_hash}; are driver and workers on the same code?")
        # Ray sets CUDA_VISIBLE_DEVICES for actors given num_gpus, so "auto" picks the actor's own GPU.
        self.model = model.eval().to(tasks.resolve_device(self.recipe.train.device))

    def __call__(self, batch: dict) -> dict:
        records = [score_shard(self.recipe, self.model, int(index), str(url), None if expected < 0 else int(expected))
                   for index, url, expected in zip(batch["index"], batch["url"], batch["expected"], strict=True)]
        return {name: [record[name] for record in records] for name in ("index", "url", "rows", "error")} | {
            "keys_read": [list(record["keys_read"]) for record in records]}


def require_ray() -> None:
    """Raises ImportError naming the pip command when Ray Data is not installed (before any work is claimed)."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as error:
        raise ImportError('precompute: backend="ray" needs Ray Data: pip install "curate[ray]" '
                          '(or pip install "ray[data]>=2.9")') from error


def run_ray(recipe: Recipe, todo: list[tuple[int, str, int]], *, on_error: str = "fail", actors: int | None = None,
            cpus_per_actor: float | None = None, progress=lambda n: None) -> list[dict]:
    """Score `todo` ((shard index, url, expected samples) triples) on a Ray actor pool; one record per shard.

    Args:
        on_error: "fail" raises on the first failed shard (parts already written stay: they are whole);
            "skip" returns the failed shards' records for the report.
        actors: pool size. Default: one per GPU when the cluster has GPUs, else as many as fit in the
            cluster's CPUs with one CPU left for Ray Data's own tasks; never more than there are shards.
        cpus_per_actor: CPUs each actor reserves (fractions allowed: on a 2-core machine two 1-CPU actors
            leave Ray Data none and the job never starts). Default 1.
        progress: called with the samples of each finished shard (the job's progress bar).
    """
    require_ray()
    import ray
    import ray.data

    if not todo:
        return []
    if cpus_per_actor is not None and not cpus_per_actor > 0:
        raise ValueError(f"precompute: cpus_per_actor must be > 0, got {cpus_per_actor=}")
    if actors is not None and actors < 1:
        raise ValueError(f"precompute: actors must be >= 1, got {actors=}")
    with needs_extra("precompute (ray)"):
        from safetensors.torch import save

    from curate.cache import model_hash

    model, _ = tasks.load_reference(recipe)
    weights = save({name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()})
    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = 1.0 if cpus_per_actor is None else float(cpus_per_actor)
    if actors is None:
        actors = gpus or max(1, math.floor((resources.get("CPU", 1) - 1) / cpus))
    actors = min(actors, len(todo))
    # -1: a count not known ahead (your own shards; Arrow columns hold no None among ints)
    shards = ray.data.from_items([{"index": i, "url": url, "expected": -1 if n is None else n} for i, url, n in todo],
                                 override_num_blocks=len(todo))
    scored = shards.map_batches(
        _ShardScorer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_args=(recipe.model_dump_json(), weights, model_hash(model)),
        num_cpus=cpus, num_gpus=1 if gpus else None, batch_format="numpy", zero_copy_batch=False)
    records = []
    for row in scored.iter_rows():  # streams: records arrive as shards finish, in any order
        record = {"index": int(row["index"]), "url": str(row["url"]), "rows": int(row["rows"]),
                  "error": str(row["error"]), "keys_read": [str(key) for key in row["keys_read"]]}
        if record["error"] and on_error == "fail":
            raise RuntimeError(fail_message(record))
        records.append(record)
        progress(record["rows"] or next(n or 0 for i, _, n in todo if i == record["index"]))
    return records
