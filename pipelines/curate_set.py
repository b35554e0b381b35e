"""`curate curate-set RECIPE`: reference embeddings → alignment filter → semantic dedup → cluster balance → a
curated key list.

Reads the recipe's score cache (`cache.path`, written by `curate precompute` with a contrastive reference,
so it holds L2-normalised image and text embeddings), optionally keeps only the `aligned_share` of samples
whose image and text the reference finds most alike (`curate.curation.alignment_filter`: misaligned captions
and junk alt-text go first), removes semantic near-duplicates among the rest (`curate.curation.semantic_dedup`),
optionally caps every k-means cluster at `per_cluster` samples (`curate.curation.balance`, on the same
clusters), and writes under the run directory:

- `curated_keys.parquet`: the kept keys (`curate.curation.write_keys`), for
  `curate.pipeline(..., keep_keys=PATH)`; the settings and counts are in its Parquet metadata.
- `curate_set_decisions.parquet`: one row per input key: its `alignment` (image-text cosine), cluster (null
  for a misaligned sample, which is never clustered), kept, `reason` (kept | misaligned | duplicate |
  balance), and for duplicates the kept key it duplicates and their cosine similarity.
- `curate_set_report.json`: how many were removed and why, the alignment cutoff, cluster-size statistics,
  the paths.
- `cluster_sizes.png`: histograms of cluster sizes of the samples clustered (the aligned ones), after dedup
  and after balancing.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import polars as pl

from curate.cache import ScoreCache
from curate.curation import alignment_filter, balance, semantic_dedup, write_keys
from curate.files import atomic_write, write_json

from .extras import needs_extra
from .recipe import Recipe

__all__ = ["curate_set", "EMBEDDINGS"]

EMBEDDINGS = ("image", "text", "both")


def curate_set(recipe: Recipe, *, aligned_share: float | None = None, embedding: str | None = None,
               n_clusters: int | None = None, threshold: float | None = None, per_cluster: int | None = None,
               seed: int | None = None, out: Path | None = None, log=print) -> dict:
    """Curate the cached samples; writes the files in the module docstring and returns the report.

    Args:
        aligned_share: keep only this share of the samples, those whose reference image and text embeddings
            have the highest cosine similarity, before dedup; None keeps them all.
        embedding: which reference embedding is compared: "image" (SemDeDup's choice: captions of web
            duplicates vary), "text", or "both" (the two unit vectors concatenated: cosine is their mean).
        n_clusters: k-means clusters; default round(√N) of the N samples clustered (those aligned), which
            balances k-means against the within-cluster comparisons (see `curate.curation`).
        threshold: cosine similarity at or above which two samples are duplicates.
        per_cluster: keep at most this many samples of each cluster after dedup; None keeps them all.
        seed: seeds k-means and the balancing draw; default the recipe's train.seed.
        out: directory for the outputs; default the recipe's run directory (`train.out`, runs/<name>).

    Unset arguments come from the recipe's `curation:` section.
    """
    cfg = recipe.curation
    aligned_share = cfg.aligned_share if aligned_share is None else aligned_share
    embedding = cfg.embedding if embedding is None else embedding
    n_clusters = cfg.n_clusters if n_clusters is None else n_clusters
    threshold = cfg.threshold if threshold is None else threshold
    per_cluster = cfg.per_cluster if per_cluster is None else per_cluster
    if embedding not in EMBEDDINGS:
        raise ValueError(f"curate-set: embedding must be one of {list(EMBEDDINGS)}, got {embedding=}")
    if not recipe.cache.path:
        raise ValueError("cache.path: curate-set reads the reference embeddings from the score cache; set "
                         "cache: {path: ...} and write it with `curate precompute RECIPE`")
    start = time.perf_counter()
    cache = ScoreCache.open(recipe.cache.path, recipe.data.storage_options)
    if cache.image_emb is None:
        raise ValueError(f"curate-set: {recipe.cache.path} holds per-example losses, not embeddings; dedup needs a "
                         f"contrastive reference (data.dataset: pairs, a tiny_clip model) and its cache")
    keys = cache.keys.to_list()
    alignment = alignment_filter(keys, cache.image_emb, cache.text_emb, share=aligned_share or 1.0)
    aligned = np.flatnonzero(alignment.kept)
    if not len(aligned):
        raise ValueError(f"curation.aligned_share: {aligned_share} of {len(keys)} samples keeps none; raise it")
    vectors = {"image": cache.image_emb, "text": cache.text_emb}.get(embedding)
    if vectors is None:
        vectors = np.concatenate([cache.image_emb, cache.text_emb], axis=1)
    n = len(aligned)  # the samples clustered
    n_clusters = min(n, max(1, round(math.sqrt(n)))) if n_clusters is None else n_clusters
    seed = recipe.train.seed if seed is None else seed
    dedup = semantic_dedup(alignment.kept_keys, vectors[aligned], n_clusters=n_clusters, threshold=threshold,
                           seed=seed)
    kept = dedup.kept
    if per_cluster is None:
        curated = dedup.kept_keys
    else:
        curated = balance(dedup.kept_keys, dedup.clusters[kept], per_cluster=per_cluster, seed=seed)
    clustered = dedup.to_frame().drop("kept")
    decisions = (pl.DataFrame({"__key__": keys, "alignment": alignment.alignment}, schema_overrides={
                     "__key__": pl.String}).join(clustered, on="__key__", how="left", maintain_order="left")
                 .with_columns(kept=pl.col("__key__").is_in(pl.Series(curated).implode()))
                 .with_columns(reason=pl.when("kept").then(pl.lit("kept"))
                               .when(pl.col("cluster").is_null()).then(pl.lit("misaligned"))
                               .when(pl.col("duplicate_of").is_null()).then(pl.lit("balance"))
                               .otherwise(pl.lit("duplicate"))))
    in_curated = decisions["kept"].to_numpy()

    out = Path(out) if out is not None else recipe.out
    out.mkdir(parents=True, exist_ok=True)
    paths = {"keys": out / "curated_keys.parquet", "decisions": out / "curate_set_decisions.parquet",
             "report": out / "curate_set_report.json", "histogram": out / "cluster_sizes.png"}
    sizes = {stage: np.bincount(dedup.clusters[mask], minlength=n_clusters)
             for stage, mask in (("input", np.ones(n, bool)), ("deduplicated", kept),
                                 ("curated", in_curated[aligned]))}
    reason = decisions["reason"]
    report = {
        "cache": recipe.cache.path, "reference_hash": cache.metadata.get("reference_hash"),
        "aligned_share": aligned_share, "alignment_cutoff": alignment.cutoff if aligned_share else None,
        "embedding": embedding, "n_clusters": n_clusters, "threshold": threshold, "per_cluster": per_cluster,
        "seed": seed, "input": len(keys), "kept": len(curated),
        "removed": {why: int((reason == why).sum()) for why in ("misaligned", "duplicate", "balance")},
        "cluster_sizes": {stage: _quantiles(size) for stage, size in sizes.items()},
        "seconds": None, **{name: str(path) for name, path in paths.items()},
    }
    settings = {k: report[k] for k in ("cache", "reference_hash", "aligned_share", "alignment_cutoff", "embedding",
                                       "n_clusters", "threshold", "per_cluster", "seed", "input", "removed")}
    write_keys(paths["keys"], curated, metadata={"curate.curate_set": settings})
    with atomic_write(paths["decisions"]) as stream:
        decisions.write_parquet(stream)
    _histogram(sizes, paths["histogram"], f"{n} samples clustered, {n_clusters} clusters, threshold {threshold}")
    report["seconds"] = round(time.perf_counter() - start, 2)
    write_json(paths["report"], report)
    misaligned = (f"{report['removed']['misaligned']} least aligned (image-text cosine < {alignment.cutoff:.3f}), "
                  if aligned_share else "")
    log(f"curate-set: kept {len(curated)} of {len(keys)} ({misaligned}{report['removed']['duplicate']} near-duplicates "
        f"at cosine ≥ {threshold}, {report['removed']['balance']} over {per_cluster} per cluster) → {paths['keys']}")
    return report


def _quantiles(sizes: np.ndarray) -> dict:
    return {"clusters": int(len(sizes)), "empty": int((sizes == 0).sum()), "min": int(sizes.min()),
            "median": float(np.median(sizes)), "max": int(sizes.max())}


def _histogram(sizes: dict[str, np.ndarray], path: Path, title: str) -> None:
    with needs_extra("curate curate-set's histogram"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, max(int(size.max()) for size in sizes.values()) + 1, 40)
    for stage, size in sizes.items():
        ax.hist(size, bins=bins, histtype="step", linewidth=1.5, label=f"{stage} ({int(size.sum())} samples)")
    ax.set(xlabel="samples in the cluster", ylabel="clusters", title=title)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as stream:
        fig.savefig(stream, format="png", dpi=110)
    plt.close(fig)
