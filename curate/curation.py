"""Offline curation over embeddings: alignment filtering, semantic dedup (SemDeDup), cluster-balanced sampling.

Each works on `(keys, embeddings)`: one stable `__key__` per row and an (N, d) array of any float dtype
(numpy, a CPU torch tensor, a ScoreCache's embedding column). The result is a key list; `write_keys` stores
it as Parquet for the pipeline to filter on.

Semantic dedup (Abbas et al. 2023, "SemDeDup"): spherical k-means on the L2-normalised embeddings, then
inside each cluster a greedy pass in key order keeps a row unless an already *kept* row of its cluster has
cosine similarity ≥ `threshold` with it. So every removed row names a kept row it duplicates (cos ≥
threshold, checkable), the kept rows of a cluster are pairwise below it, and nothing is removed through a chain
(a ~ b ~ c with a ≁ c keeps a and c). The lowest key of a duplicate group is kept (SemDeDup keeps the one
farthest from the centroid): the choice then depends only on which rows are duplicates, not on float
rounding that differs between CPU and GPU k-means, and keys usually encode source order, so the first-seen
copy survives. Duplicates split across two clusters are missed, as in SemDeDup; more clusters split more.

Memory: never N×N. Besides one float32 copy of the normalised embeddings, each cluster of m rows takes
two m×d copies and similarity blocks of at most `max_block` floats (64 MiB by default), whatever m is.
Time is O(N·k·d) for k-means plus O(Σ_c m_c²·d) inside the clusters, so k ≈ √N balances the two
(benchmarks/dedup.py). faiss runs k-means on the GPU when faiss-gpu sees one, else on CPU.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from .files import atomic_write
from .seeding import derive_seed

__all__ = ["AlignmentResult", "DedupResult", "alignment_filter", "balance", "read_keys", "semantic_dedup",
           "write_keys"]

KEY = "__key__"
# Identical rows have cosine 1 ± a few float32 ulps; the slack lets threshold=1.0 mean "exact duplicates".
_ROUNDING = 1e-5
_CHUNK = 1 << 16  # rows normalised at a time (float64 scratch of 64K × d)


@dataclass(frozen=True)
class AlignmentResult:
    """What `alignment_filter` decided for every input row; the arrays are aligned with `keys`.

    Args:
        keys: the input keys, in input order.
        alignment: cosine similarity of each row's image and text embedding, float32 (N,).
        kept: boolean mask (N,) of the rows kept.
        cutoff: the lowest alignment kept (NaN when nothing is kept).
    """

    keys: list[str]
    alignment: np.ndarray
    kept: np.ndarray
    cutoff: float

    @property
    def kept_keys(self) -> list[str]:
        return [self.keys[i] for i in np.flatnonzero(self.kept)]


def alignment_filter(keys: Sequence[str], image, text, *, share: float) -> AlignmentResult:
    """Keeps the `share` of rows whose image and text embeddings agree best (highest cosine similarity).

    This is the CLIP-score filter of web-scale pretraining sets (DataComp, Gadre et al. 2023), with the reference
    model as the scorer: misaligned captions and junk alt-text score low under any reference that has learnt
    the task. For a sigmoid reference the pair's own loss -log σ(t·cos + b) falls as the cosine rises, so the
    rows kept are those with the lowest reference loss on their own pair: `easy_reference`'s offline form,
    applied once to the dataset instead of to every superbatch. A share rather than a cosine threshold, because
    a threshold depends on the reference (its temperature, how far it trained) and a share does not.

    Args:
        keys: one unique `__key__` per row.
        image, text: (N, d) array-likes of the same shape; normalised here, so any scale works.
        share: the fraction of rows kept, in (0, 1]: round(share·N) of them. Ties at the cutoff keep the
            earlier row, so the result depends only on the inputs.
    """
    if isinstance(share, bool) or not isinstance(share, numbers.Real) or not 0 < share <= 1:
        raise ValueError(f"alignment_filter: share is the fraction of rows kept, in (0, 1], got {share=}")
    keys, u = _normalised("alignment_filter", keys, image)
    _, v = _normalised("alignment_filter", keys, text)
    if u.shape != v.shape:
        raise ValueError(f"alignment_filter: image and text embeddings must have the same shape (one pair per row), "
                         f"got {u.shape} and {v.shape}")
    alignment = np.einsum("ij,ij->i", u, v)
    order = np.argsort(-alignment, kind="stable")
    kept = np.zeros(len(keys), bool)
    kept[order[: round(share * len(keys))]] = True
    cutoff = float(alignment[kept].min()) if kept.any() else float("nan")
    return AlignmentResult(keys, alignment, kept, cutoff)


@dataclass(frozen=True)
class DedupResult:
    """What `semantic_dedup` decided for every input row; the arrays are aligned with `keys`.

    Args:
        keys: the input keys, in input order.
        clusters: k-means cluster id of each row, int64 (N,). `balance(kept_keys, clusters[kept])` reuses it.
        duplicate_of: row index of the most similar earlier kept row of the same cluster with cosine ≥ threshold,
            int64 (N,); -1 for kept rows.
        similarity: cosine similarity to that row, float32 (N,); NaN for kept rows.
    """

    keys: list[str]
    clusters: np.ndarray
    duplicate_of: np.ndarray
    similarity: np.ndarray

    @property
    def kept(self) -> np.ndarray:
        """Boolean mask (N,) of the rows kept."""
        return self.duplicate_of < 0

    @property
    def kept_keys(self) -> list[str]:
        return [self.keys[i] for i in np.flatnonzero(self.kept)]

    def to_frame(self) -> pl.DataFrame:
        """One row per input: `__key__`, `cluster`, `kept`, `duplicate_of` (a kept key, or null), `similarity`."""
        return pl.DataFrame(
            {
                KEY: self.keys,
                "cluster": self.clusters,
                "kept": self.kept,
                "duplicate_of": [self.keys[j] if j >= 0 else None for j in self.duplicate_of.tolist()],
                "similarity": self.similarity,
            },
            schema_overrides={KEY: pl.String, "duplicate_of": pl.String},
        )


def semantic_dedup(
    keys: Sequence[str],
    embeddings,
    *,
    n_clusters: int,
    threshold: float = 0.95,
    seed: int = 0,
    max_block: int = 1 << 24,
) -> DedupResult:
    """Removes semantic near-duplicates: k-means, then a greedy within-cluster pass (see module docstring).

    Args:
        keys: one unique `__key__` per row.
        embeddings: (N, d) array-like; normalised here, so any scale works.
        n_clusters: k-means clusters, 1 ≤ n_clusters ≤ N; √N is a good start.
        threshold: cosine similarity in [0, 1] at or above which two rows are duplicates (1.0: exact only).
        seed: seeds k-means.
        max_block: most floats in one similarity block (4 bytes each); bounds memory for any cluster size.
    """
    keys, x = _normalised("semantic_dedup", keys, embeddings)
    n_clusters = _check_clusters("semantic_dedup", n_clusters, len(x))
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"semantic_dedup: threshold is a cosine similarity in [0, 1], got {threshold=}")
    if max_block < 1:
        raise ValueError(f"semantic_dedup: max_block must be ≥ 1 float, got {max_block=}")
    clusters = _kmeans(x, n_clusters, seed)
    duplicate_of = np.full(len(x), -1, np.int64)
    similarity = np.full(len(x), np.nan, np.float32)
    order = np.lexsort((np.asarray(keys), clusters))  # by cluster, then key: the greedy pass keeps lowest keys
    bounds = np.concatenate([[0], np.cumsum(np.bincount(clusters, minlength=n_clusters))])
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi - lo < 2:
            continue
        rows = order[lo:hi]
        dup, sim = _greedy(x[rows], threshold - _ROUNDING, max_block)
        hit = dup >= 0
        duplicate_of[rows[hit]] = rows[dup[hit]]
        similarity[rows[hit]] = np.minimum(sim[hit], 1.0)  # float32 rounding can give 1 + 1 ulp
    return DedupResult(keys, clusters, duplicate_of, similarity)


def balance(
    keys: Sequence[str],
    embeddings_or_clusters,
    *,
    per_cluster: int,
    n_clusters: int | None = None,
    seed: int = 0,
) -> list[str]:
    """Cluster-balanced sample: at most `per_cluster` keys from each cluster, drawn uniformly (seeded).

    Clusters with fewer members keep them all, so the histogram of the result is min(size, per_cluster).

    Args:
        keys: one unique `__key__` per row.
        embeddings_or_clusters: integer cluster ids (N,), e.g. `DedupResult.clusters[result.kept]`, or
            embeddings (N, d), clustered here with spherical k-means into `n_clusters`.
        per_cluster: most keys kept from one cluster, ≥ 1.
        n_clusters: k-means clusters; required with embeddings, rejected with cluster ids.
        seed: seeds k-means and the draw.

    Returns:
        The kept keys, in input order.
    """
    if isinstance(per_cluster, bool) or not isinstance(per_cluster, int | np.integer) or per_cluster < 1:
        raise ValueError(f"balance: per_cluster must be an int ≥ 1, got {per_cluster=}")
    arr = _array("balance", embeddings_or_clusters)
    if arr.ndim == 1 and np.issubdtype(arr.dtype, np.integer):
        keys = _check_keys("balance", keys, len(arr))
        if n_clusters is not None:
            raise ValueError(f"balance: got cluster ids, so {n_clusters=} is unused; pass embeddings to cluster them")
        if len(arr) and arr.min() < 0:
            raise ValueError(f"balance: cluster ids must be ≥ 0, got min {arr.min()}")
        clusters = arr.astype(np.int64)
    else:
        if n_clusters is None:
            raise ValueError("balance: embeddings need n_clusters (≈ √N), or pass integer cluster ids (N,)")
        keys, x = _normalised("balance", keys, arr)
        clusters = _kmeans(x, _check_clusters("balance", n_clusters, len(x)), seed)
    rng = np.random.default_rng(derive_seed(seed, "balance"))
    order = np.lexsort((rng.random(len(keys)), clusters))  # a random order inside each cluster
    ranked = clusters[order]
    rank = np.arange(len(order)) - np.searchsorted(ranked, ranked)  # position inside its cluster
    return [keys[i] for i in np.sort(order[rank < per_cluster])]


def write_keys(path: str | os.PathLike, keys: Sequence[str], metadata: Mapping[str, object] | None = None) -> Path:
    """Writes a key list as Parquet (one sorted `__key__` column), atomically (`curate.files.atomic_write`).

    Args:
        path: the destination file.
        keys: unique keys, e.g. `DedupResult.kept_keys` or `balance(...)`.
        metadata: provenance stored in the Parquet footer; non-str values are JSON-encoded.
            Read it back with `polars.read_parquet_metadata(path)`.
    """
    keys = _check_keys("write_keys", keys, None)
    path = Path(path)
    meta = {"curate.schema": "keys/1", "curate.count": str(len(keys))}
    meta.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    with atomic_write(path) as stream:
        pl.DataFrame({KEY: sorted(keys)}, schema={KEY: pl.String}).write_parquet(stream, metadata=meta)
    return path


def read_keys(path: str | os.PathLike) -> list[str]:
    """The keys in a Parquet key list written by `write_keys` (sorted)."""
    source = os.fspath(path)  # Polars takes str and Path but reads any other os.PathLike as a file object
    schema = pl.read_parquet_schema(source)
    if KEY not in schema:
        raise ValueError(f"read_keys: {path} has no {KEY!r} column (has {list(schema)}); write it with write_keys")
    keys = pl.read_parquet(source, columns=[KEY])[KEY]
    if keys.null_count():
        raise ValueError(f"read_keys: {path} has {keys.null_count()} null keys; rewrite it with write_keys")
    return keys.to_list()


def _greedy(x: np.ndarray, threshold: float, max_block: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy dedup of one cluster's unit rows `x` (m, d), in row order.

    Returns, per row, the local index of the most similar earlier kept row with cosine ≥ threshold (-1 when
    the row is kept) and that similarity. Rows go in blocks of r with r·m ≤ max_block: each block is compared
    with the rows kept so far (r × kept) and with itself (r × r), then resolved in order.
    """
    m = len(x)
    dup = np.full(m, -1, np.int64)
    sim = np.full(m, np.nan, np.float32)
    kept = np.empty_like(x)  # the kept rows, packed, so a block meets each of them once
    kept_rows = np.empty(m, np.int64)
    n_kept = 0
    step = max(1, min(m, max_block // m))
    for a in range(0, m, step):
        block = x[a : a + step]
        r = len(block)
        best = np.full(r, -np.inf, np.float32)
        arg = np.full(r, -1, np.int64)
        if n_kept:
            s = block @ kept[:n_kept].T
            j = s.argmax(axis=1)
            best, arg = s[np.arange(r), j], kept_rows[j]
        removed = best >= threshold
        s = block @ block.T
        hit = s >= threshold
        np.fill_diagonal(hit, False)
        for i in np.flatnonzero(hit.any(axis=1)):  # in order: only a row still kept removes later ones
            if not removed[i]:
                removed[i + 1 :] |= hit[i, i + 1 :]
        gone = np.flatnonzero(removed)
        if len(gone):  # each removed row's most similar kept row: the best outside the block, or inside it
            s = s[:, gone]
            s[removed[:, None] | (np.arange(r)[:, None] >= gone)] = -np.inf  # only earlier rows that were kept
            inner, inner_arg = s.max(axis=0), s.argmax(axis=0) + a
            better = inner > best[gone]
            dup[a + gone] = np.where(better, inner_arg, arg[gone])
            sim[a + gone] = np.where(better, inner, best[gone])
        keep = np.flatnonzero(~removed)
        kept[n_kept : n_kept + len(keep)], kept_rows[n_kept : n_kept + len(keep)] = block[keep], a + keep
        n_kept += len(keep)
    return dup, sim


def _kmeans(x: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """Cluster ids (N,) of unit rows `x` by spherical k-means; on the GPU when faiss-gpu sees one."""
    if n_clusters == 1:
        return np.zeros(len(x), np.int64)
    faiss = _faiss()
    kmeans = faiss.Kmeans(
        x.shape[1],
        n_clusters,
        niter=20,
        seed=derive_seed(seed, "kmeans") % 2**31,  # faiss takes a C int
        spherical=True,
        gpu=faiss.get_num_gpus() > 0,
        verbose=False,
        max_points_per_centroid=64,  # a training sample of 64·k rows: 4× faster than faiss' 256, same recall
    )
    kmeans.train(x)
    _, ids = kmeans.index.search(x, 1)  # faiss tiles the N × k search itself
    return ids[:, 0].astype(np.int64)


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError('curate.curation needs faiss: pip install "curate[curation]" (that is pip install '
                          "faiss-cpu; on a GPU machine install faiss-gpu-cu12 instead)") from e
    return faiss


def _check_keys(fn: str, keys: Sequence[str], n: int | None) -> list[str]:
    keys = list(keys)
    if n is not None and len(keys) != n:
        raise ValueError(f"{fn}: {len(keys)} keys for {n} rows; pass exactly one key per row")
    if not all(isinstance(k, str) for k in keys):
        bad = [k for k in keys if not isinstance(k, str)][:3]
        raise ValueError(f"{fn}: keys must be str (the samples' __key__), got {bad}")
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        repeats: list[str] = []
        for k in keys:
            if k in seen:
                repeats.append(k)
            else:
                seen.add(k)
        raise ValueError(f"{fn}: keys must be unique, repeated: {repeats[:5]}; dedup identities before curating")
    return keys


def _check_clusters(fn: str, n_clusters: int, n: int) -> int:
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int | np.integer) or not 1 <= n_clusters <= n:
        raise ValueError(f"{fn}: n_clusters must be an int in [1, {n}] (the number of rows), got {n_clusters=}")
    return int(n_clusters)


def _array(fn: str, value) -> np.ndarray:
    try:
        return np.asarray(value)
    except ValueError as e:  # ragged rows
        raise ValueError(f"{fn}: embeddings must be one (N, d) array with the same d for every row; {e}") from e


def _normalised(fn: str, keys: Sequence[str], embeddings) -> tuple[list[str], np.ndarray]:
    """Validated keys and float32 unit rows; names the keys of NaN/inf or all-zero rows."""
    x = _array(fn, embeddings)
    if x.ndim != 2 or 0 in x.shape or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{fn}: embeddings must be a non-empty real (N, d) array, got shape {x.shape} {x.dtype}")
    keys = _check_keys(fn, keys, len(x))
    out = np.empty(x.shape, np.float32)
    bad: list[np.ndarray] = []
    for a in range(0, len(x), _CHUNK):
        chunk = x[a : a + _CHUNK].astype(np.float64)  # float64 so large float32 values do not overflow the norm
        norm = np.sqrt(np.einsum("ij,ij->i", chunk, chunk))
        ok = np.isfinite(norm) & (norm > 0)
        bad.append(a + np.flatnonzero(~ok))
        out[a : a + _CHUNK] = chunk / np.where(ok, norm, 1.0)[:, None]
    bad_rows = np.concatenate(bad)
    if len(bad_rows):
        names = [keys[i] for i in bad_rows[:5]]
        raise ValueError(
            f"{fn}: {len(bad_rows)} embedding rows are NaN/inf or all zero (no direction), keys {names}"
            f"{' ...' if len(bad_rows) > 5 else ''}; recompute or drop them before curating"
        )
    return keys, out
