"""Offline reference scores: a directory or `s3://` prefix of Parquet parts, one row per `__key__`.

A part holds `__key__` and the reference's per-example `ref_loss` and/or its L2-normalised `image_emb` /
`text_emb` (fixed-size float32 arrays). Provenance lives in the Parquet key-value metadata under `curate.*`:
schema version, reference-model hash, scorer, dataset, created-at, and the reference's logit scale / bias.

`ScoreCache.open` loads every part into memory and indexes the keys by a 64-bit hash sorted once, so a
step's lookup is a radix-directory search over sorted integers (a Polars join per step is ~100× slower). The hot
path is numpy on purpose: torch's small multi-threaded ops stall ~10 ms on a busy CPU (OpenMP barriers).
Parts are written by `write_part` (the `curate precompute` job) and can be inspected with Polars directly
through `scan`. Remote paths go through fsspec/s3fs (`storage_options` in s3fs's spelling);
`scan` translates them for Polars' own object store (`polars_storage_options`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from .batch import split_batch, take
from .files import atomic_write, filesystem
from .scorers import Kind, ModelScores, Scorer, score_model

__all__ = ["SCHEMA_VERSION", "ScoreCache", "model_hash", "polars_storage_options", "scan", "write_part"]

SCHEMA_VERSION = 1
KEY = "__key__"
REGENERATE = "`curate precompute RECIPE`"
_COLUMNS = ("ref_loss", "image_emb", "text_emb")
_PART = "__part__"  # load-time column: which file a row came from (for duplicate-key errors)
_REQUIRED = ("reference_hash", "scorer", "dataset")
_RESERVED = ("schema_version", "created_at", "logit_scale", "logit_bias")
_CONSISTENT = ("schema_version", "reference_hash", "scorer", "dataset", "logit_scale", "logit_bias")
_POLARS_RETRY = {"max_retries": 2, "connect_timeout": "5s"}


def model_hash(model: nn.Module) -> str:
    """A stable 16-hex-digit hash of a model's state_dict (names, dtypes, shapes, bytes): the cache's
    `reference_hash`, so a cache is only used with the reference that wrote it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def polars_storage_options(storage_options: dict | None) -> dict:
    """s3fs-style options ({"key", "secret", "token", "anon", "endpoint_url", "client_kwargs": {...}}) in the
    names Polars' object store reads, with bounded retries. Options with no Polars equivalent are dropped."""
    options, client = dict(storage_options or {}), (storage_options or {}).get("client_kwargs", {})
    out: dict = dict(_POLARS_RETRY)
    for ours, theirs in (("key", "aws_access_key_id"), ("secret", "aws_secret_access_key"),
                         ("token", "aws_session_token")):
        if options.get(ours):
            out[theirs] = options[ours]
    endpoint = options.get("endpoint_url") or client.get("endpoint_url")
    if endpoint:
        out["aws_endpoint_url"] = endpoint
        if endpoint.startswith("http://"):
            out["aws_allow_http"] = "true"
    if client.get("region_name"):
        out["aws_region"] = client["region_name"]
    if options.get("anon"):
        out["aws_skip_signature"] = "true"
    return out


def scan(path: str, storage_options: dict | None = None) -> pl.LazyFrame:
    """All parts under `path` as one Polars LazyFrame (read by Polars' object store, not fsspec), with the
    source file in column `file`: for building, merging and inspecting caches without loading them."""
    source = path if path.endswith(".parquet") else path.rstrip("/") + "/*.parquet"
    options = polars_storage_options(storage_options) if "://" in path else None
    return pl.scan_parquet(source, storage_options=options, include_file_paths="file")


def write_part(path: str, keys: Sequence[str], *, ref_loss=None, image_emb=None, text_emb=None,
               logit_scale: float | None = None, logit_bias: float | None = None, metadata: dict,
               storage_options: dict | None = None) -> str:
    """Writes one cache part (a `.parquet` file) atomically and returns its path.

    Args:
        path: the part's file, local or `s3://bucket/prefix/part-00000.parquet`.
        keys: the samples' `__key__`s, unique within the part (and across the cache's parts).
        ref_loss: per-example reference losses (n,). image_emb, text_emb: L2-normalised embeddings (n, d).
        logit_scale: the reference's `logit_scale` parameter (log of the scale, `model.logit_scale.item()`),
            required with embeddings.
        logit_bias: the reference's sigmoid logit bias (None for a softmax-only reference).
        metadata: provenance; needs "reference_hash" (`model_hash(reference)`), "scorer", "dataset"; other
            entries (e.g. "recipe") are kept. Non-string values are stored as JSON.
        storage_options: fsspec/s3fs options for remote paths.

    Written with `curate.files.atomic_write`: a failed write never leaves a partial part.
    """
    if not str(path).endswith(".parquet"):
        raise ValueError(f"write_part: path must end in .parquet (ScoreCache.open reads *.parquet), got {path=}")
    frame = _part_frame(keys, ref_loss, image_emb, text_emb)
    has_emb = "image_emb" in frame.columns
    if has_emb and logit_scale is None:
        raise ValueError("write_part: embeddings need the reference's logit_scale; pass model.logit_scale.item()")
    missing = [name for name in _REQUIRED if not metadata.get(name)]
    reserved = [name for name in _RESERVED if name in metadata]
    if missing or reserved:
        raise ValueError(f"write_part: metadata needs {list(_REQUIRED)} and must not set {list(_RESERVED)}; "
                         f"got {sorted(metadata)} (missing {missing}, reserved {reserved})")
    meta = {name: value if isinstance(value, str) else json.dumps(value) for name, value in metadata.items()}
    meta |= {"schema_version": str(SCHEMA_VERSION), "created_at": datetime.now(timezone.utc).isoformat("T", "seconds"),
             "logit_scale": _float_text(logit_scale, "logit_scale"),
             "logit_bias": _float_text(logit_bias, "logit_bias")}
    meta = {f"curate.{name}": value for name, value in meta.items()}
    with atomic_write(str(path), parents=True, storage_options=storage_options) as stream:
        frame.write_parquet(stream, metadata=meta)
    return str(path)


def _float_text(value: float | None, name: str) -> str:
    if value is None:
        return ""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"write_part: {name} must be finite, got {value}")
    return repr(value)  # repr round-trips a float exactly: cached and online scales are bitwise equal


def _part_frame(keys: Sequence[str], ref_loss, image_emb, text_emb) -> pl.DataFrame:
    key_column = pl.Series(KEY, keys if isinstance(keys, pl.Series) else list(keys), dtype=pl.String)
    n = len(key_column)
    if n == 0 or key_column.null_count() or (key_column.str.len_bytes() == 0).any():
        raise ValueError(f"write_part: keys must be non-empty strings, one per sample; got {n} keys with "
                         f"{key_column.null_count()} None")
    if key_column.is_duplicated().any():
        duplicated = key_column.filter(key_column.is_duplicated()).unique().head(5).to_list()
        raise ValueError(f"write_part: duplicate keys {duplicated}")
    if (image_emb is None) != (text_emb is None) or (ref_loss is None and image_emb is None):
        raise ValueError("write_part: pass ref_loss, or both image_emb and text_emb, or all three")
    columns = [key_column]
    for name, value, ndim in (("ref_loss", ref_loss, 1), ("image_emb", image_emb, 2), ("text_emb", text_emb, 2)):
        if value is None:
            continue
        array = value.detach().cpu().float().numpy() if isinstance(value, Tensor) else np.asarray(value, np.float32)
        if array.ndim != ndim or array.shape[0] != n:
            raise ValueError(f"write_part: {name} must have shape ({n}{', d' if ndim == 2 else ''}) for {n} keys, "
                             f"got {array.shape}")
        bad = ~np.isfinite(array.reshape(n, -1)).all(1)
        if bad.any():
            raise ValueError(f"write_part: {name} is NaN/inf for keys "
                             f"{key_column.filter(pl.Series(bad)).head(5).to_list()}")
        columns.append(pl.Series(name, array.astype(np.float32, copy=False)))
    if image_emb is not None and columns[-1].dtype != columns[-2].dtype:
        raise ValueError(f"write_part: image_emb and text_emb must have the same width, got "
                         f"{columns[-2].dtype} and {columns[-1].dtype}")
    return pl.DataFrame(columns)


class ScoreCache:
    """Reference scores looked up by `__key__`; pass it as `reference=` to `curate.Score` / `curate.pipeline`.

    Made by `ScoreCache.open(path)`; the constructor takes an in-memory frame (tests, benchmarks).

    Args:
        frame: columns `__key__` and `ref_loss` and/or `image_emb`, `text_emb` (as written by `write_part`).
        metadata: the provenance (`curate.` prefix removed): reference_hash, scorer, dataset, logit_scale, ...
        parts: the files the frame came from; a `__part__` column indexes them (named in errors).
        path: where the cache lives, for messages.
        missing: what a lookup of an absent key does. "error" (default) raises naming the first missing
            keys and the command that regenerates them; "online" scores the missing samples with `fallback`
            (the same reference model, checked by hash) and counts them in `stats()["online"]`. There is no
            "drop": Score must return a score for every sample, so dropping happens upstream, counted:
            `curate.pipeline(cache.filter(samples), reference=cache, ...)`.
        fallback: the reference nn.Module, for missing="online".
    """

    def __init__(self, frame: pl.DataFrame, metadata: dict, *, parts: Sequence[str] = (), path: str = "<memory>",
                 missing: str = "error", fallback: nn.Module | None = None):
        if missing not in ("error", "online"):
            hint = (" (samples cannot be dropped inside Score; filter them before it with cache.filter(samples), "
                    "which counts them in stats()['dropped'])") if missing == "drop" else ""
            raise ValueError(f"ScoreCache: missing must be 'error' or 'online', got {missing=}{hint}")
        if missing == "online":
            if not isinstance(fallback, nn.Module):
                raise ValueError("ScoreCache: missing='online' needs fallback=<the reference nn.Module>")
            if model_hash(fallback) != metadata.get("reference_hash"):
                raise ValueError(f"ScoreCache: fallback model hash {model_hash(fallback)} differs from the cache's "
                                 f"reference_hash {metadata.get('reference_hash')!r}; pass the reference that wrote "
                                 f"{path} or regenerate it with {REGENERATE}")
        self.path, self.parts, self.metadata = path, list(parts), dict(metadata)
        self.missing, self.fallback = missing, fallback
        if KEY not in frame.columns or frame.height == 0:
            raise ValueError(f"ScoreCache: needs rows with a {KEY!r} column, got {frame.height} rows, {frame.columns}")
        self.keys: pl.Series = frame[KEY].rechunk()  # gathers on one chunk are ~5× faster than on many
        self.ref_loss, self.image_emb, self.text_emb = (_column(frame, name) for name in _COLUMNS)
        self.logit_scale = float(metadata["logit_scale"]) if metadata.get("logit_scale") else None
        self.logit_bias = float(metadata["logit_bias"]) if metadata.get("logit_bias") else None
        self._seed, self._sorted, self._order = self._index(frame)
        # A radix directory over the sorted hashes: bucket b (the top `bits` bits) spans
        # _sorted[_directory[b]:_directory[b + 1]], ~3 keys, so a lookup reads one directory entry and one
        # short window (~3 cache misses) where a binary search over millions of hashes takes ~23; measured
        # 1.6× faster than np.searchsorted (with sorted queries) at 5M keys.
        bits = max(1, int(np.ceil(np.log2(len(self._sorted)))) - 2)
        self._shift = np.uint64(64 - bits)
        counts = np.bincount((self._sorted >> self._shift).astype(np.intp), minlength=2**bits)
        self._directory = np.concatenate([[0], np.cumsum(counts)])
        self._span = np.arange(counts.max())
        self.counts = {"looked_up": 0, "online": 0, "dropped": 0}

    @classmethod
    def open(cls, path: str, storage_options: dict | None = None, *, expect_reference_hash: str | None = None,
             expect_schema_version: int = SCHEMA_VERSION, missing: str = "error",
             fallback: nn.Module | None = None) -> ScoreCache:
        """Loads every `*.parquet` part under `path` (a directory, an `s3://` prefix, or one file).

        Args:
            storage_options: fsspec/s3fs options, e.g. {"key", "secret", "client_kwargs": {"endpoint_url"}}.
            expect_reference_hash: raise unless the parts were written by this reference (`model_hash(ref)`).
            expect_schema_version: raise unless the parts have this schema version.
            missing, fallback: see the class.
        """
        fs, root = filesystem(str(path), storage_options)
        try:
            fs.invalidate_cache(root)  # s3fs caches listings: parts written by other processes must show up
            files = [root] if root.endswith(".parquet") else sorted(fs.glob(root.rstrip("/") + "/*.parquet"))
        except Exception as err:  # botocore/aiohttp errors share no base class; say which path and why
            raise OSError(f"ScoreCache: cannot list {path} ({type(err).__name__}: {err}); check the path and "
                          "storage_options (endpoint_url, credentials)") from err
        if not files:
            raise FileNotFoundError(f"ScoreCache: no *.parquet parts at {path!r}; write them with {REGENERATE}")
        frames: list[pl.DataFrame] = []
        metas: list[dict] = []
        local = "file" in fs.protocol
        for start in range(0, len(files), 16):  # remote parts are fetched 16 at a time, concurrently by s3fs
            batch = files[start:start + 16]
            blobs = dict.fromkeys(batch) if local else fs.cat(batch, on_error="return")
            for file in batch:
                meta, frame = _read_part(file, blobs[file], path)
                frames.append(frame.with_columns(pl.lit(len(frames), pl.UInt32).alias(_PART)))
                metas.append(meta)
        first = metas[0]
        for file, meta, frame in zip(files, metas, frames, strict=True):
            _check_part(file, meta, frame, files[0], first, frames[0].schema, expect_schema_version)
        if expect_reference_hash is not None and first["reference_hash"] != expect_reference_hash:
            raise ValueError(f"ScoreCache: {path} was written by reference {first['reference_hash']}, expected "
                             f"{expect_reference_hash}; regenerate it with {REGENERATE}")
        created = sorted(meta["created_at"] for meta in metas)
        first = {**first, "created_at": created[0] if created[0] == created[-1] else f"{created[0]} .. {created[-1]}"}
        return cls(pl.concat(frames), first, parts=files, path=str(path), missing=missing, fallback=fallback)

    def _index(self, frame: pl.DataFrame) -> tuple[int, np.ndarray, np.ndarray]:
        """Sorted 64-bit key hashes and the row of each. Reseeds on a hash collision between distinct keys."""
        for seed in range(8):
            hashes = self.keys.hash(seed).to_numpy()
            order = np.argsort(hashes)
            ordered = hashes[order]
            same = np.flatnonzero(ordered[1:] == ordered[:-1])
            if len(same) == 0:
                return seed, ordered, order
            first, second = self.keys.gather(order[same]), self.keys.gather(order[same + 1])
            duplicated = first.filter(first == second).unique().sort()
            if len(duplicated):
                raise ValueError(f"ScoreCache: {len(duplicated)} keys appear more than once in {self.path}: "
                                 f"{self._where(frame, duplicated.head(5))}; each sample must be in one part")
        raise AssertionError("8 hash seeds all collided")

    def _where(self, frame: pl.DataFrame, keys: pl.Series) -> dict:
        if _PART not in frame.columns or not self.parts:
            return {key: [] for key in keys}
        rows = frame.select(KEY, _PART).filter(pl.col(KEY).is_in(keys.implode()))
        return {key: sorted({self.parts[i] for i in group[_PART]}) for (key,), group in rows.group_by(KEY)}

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"ScoreCache({self.path!r}, rows={len(self)}, parts={len(self.parts)})"

    def lookup(self, keys: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(rows, found): each key's row in the cache's arrays (-1 when absent) and whether it is there."""
        rows, found = self._lookup(keys)
        return torch.from_numpy(rows), torch.from_numpy(found)

    def _lookup(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        query = pl.Series(KEY, keys if isinstance(keys, pl.Series) else list(keys), dtype=pl.String)
        hashes = query.hash(self._seed).to_numpy()
        bucket = (hashes >> self._shift).astype(np.intp)
        start, count = self._directory[bucket], self._directory[bucket + 1] - self._directory[bucket]
        window = self._sorted[np.minimum(start[:, None] + self._span, len(self._sorted) - 1)]
        hit = (window == hashes[:, None]) & (self._span < count[:, None])  # hashes are unique: ≤ 1 hit per row
        found = hit.any(1)
        rows = self._order[np.minimum(start + hit.argmax(1), len(self._sorted) - 1)]  # empty last buckets
        # a hash match is confirmed on the key itself, so an absent key can never alias a cached one
        found &= (self.keys.gather(rows) == query).to_numpy()
        rows[~found] = -1
        self.counts["looked_up"] += len(query)
        return rows, found

    def scores(self, batch: dict, scorer: Scorer, micro_batch_size: int = 1024) -> ModelScores:
        """The reference's `ModelScores` for a superbatch, from the cache (the ScoreProvider protocol).
        `micro_batch_size` bounds the fallback's forward passes (missing="online"); `Score` passes its own."""
        keys = batch[KEY]
        rows, found = self._lookup(keys)
        kind = scorer.kind
        cached = self._gather(np.maximum(rows, 0), kind)
        if found.all():
            return cached
        absent = torch.from_numpy(np.flatnonzero(~found))
        if self.missing == "error":
            names = [keys[i] for i in absent[:5].tolist()]
            raise ValueError(f"ScoreCache: {len(absent)} of {len(keys)} keys are not in {self.path}, e.g. {names}; "
                             f"regenerate the cache for this dataset with {REGENERATE}, or open it with "
                             "missing='online', fallback=reference")
        assert self.fallback is not None, "ScoreCache: __init__ requires a fallback with missing='online'"
        online = score_model(self.fallback, take(batch, absent), scorer, micro_batch_size).to("cpu")
        self.counts["online"] += len(absent)
        if kind == "example":
            loss = cached.loss.clone()
            loss[absent] = online.loss
            return ModelScores.of_losses(loss)
        assert cached.image_emb is not None and cached.text_emb is not None  # _gather's contrastive scores
        assert online.image_emb is not None and online.text_emb is not None, f"a {kind} scorer returns embeddings"
        image, text = cached.image_emb.clone(), cached.text_emb.clone()
        image[absent], text[absent] = online.image_emb, online.text_emb
        return ModelScores(kind, image, text, cached.scale, cached.bias)

    def _gather(self, rows: np.ndarray, kind: Kind) -> ModelScores:
        if kind == "example":
            if self.ref_loss is None:
                raise ValueError(f"ScoreCache: {self.path} holds embeddings, not per-example losses; use a "
                                 f"ContrastiveScorer or regenerate with losses via {REGENERATE}")
            return ModelScores.of_losses(torch.from_numpy(self.ref_loss[rows]))
        if self.image_emb is None:
            raise ValueError(f"ScoreCache: a contrastive scorer needs reference embeddings but {self.path} holds "
                             f"only per-example losses (they depend on the superbatch); regenerate with {REGENERATE}")
        bias = self.logit_bias if kind == "sigmoid" else 0.0
        if bias is None:
            raise ValueError(f"ScoreCache: loss='sigmoid' needs the reference's logit_bias, which {self.path} "
                             "does not record; use loss='softmax' or regenerate with a SigLIP reference")
        # exp in float32 like ContrastiveScorer's model.logit_scale.exp(), so cached and online scales match bitwise
        scale = float(torch.tensor(self.logit_scale, dtype=torch.float32).exp())
        assert self.text_emb is not None, "ScoreCache: a frame with image_emb has text_emb (write_part writes both)"
        image, text = torch.from_numpy(self.image_emb[rows]), torch.from_numpy(self.text_emb[rows])
        return ModelScores(kind, image, text, scale, bias)

    def filter(self, samples: Iterable[dict], chunk: int = 256) -> Iterable[dict]:
        """Only the samples (or samples of collated batches) whose keys are cached, in order; what it drops
        is counted in `stats()["dropped"]`. Re-iterable: each `iter()` re-iterates `samples`."""
        return _Cached(self, samples, chunk)

    def stats(self) -> dict:
        """Keys looked up, samples scored online (missing="online"), samples dropped by `filter`."""
        return dict(self.counts)

    def describe(self) -> dict:
        """Rows, parts, columns, provenance and ref_loss quantiles."""
        columns = {KEY: "str"}
        for name in ("ref_loss", "image_emb", "text_emb"):
            value = getattr(self, name)
            if value is not None:
                columns[name] = f"float32{list(value.shape[1:])}"
        out = {"path": self.path, "rows": len(self), "parts": len(self.parts), "columns": columns,
               "metadata": dict(self.metadata)}
        if self.ref_loss is not None:
            losses = pl.Series(self.ref_loss)
            out["ref_loss_quantiles"] = {q: losses.quantile(q) for q in (0.0, 0.1, 0.5, 0.9, 1.0)}
        return out


class _Cached:
    """`ScoreCache.filter`: drops uncached samples, looking keys up `chunk` at a time (one lookup per sample
    would cost more than the data loading)."""

    def __init__(self, cache: ScoreCache, samples: Iterable[dict], chunk: int):
        self.cache, self.samples, self.chunk = cache, samples, chunk

    def __iter__(self):
        pending: list[dict] = []
        for item in self.samples:
            pending.extend(split_batch(item) if isinstance(item[KEY], list | tuple) else [item])
            if len(pending) >= self.chunk:
                yield from self._keep(pending)
                pending = []
        yield from self._keep(pending)

    def _keep(self, samples: list[dict]) -> list[dict]:
        found = self.cache._lookup([s[KEY] for s in samples])[1].tolist()
        self.cache.counts["dropped"] += found.count(False)
        return [sample for sample, ok in zip(samples, found, strict=True) if ok]


def _column(frame: pl.DataFrame, name: str) -> np.ndarray | None:
    return frame[name].to_numpy().astype(np.float32, copy=False) if name in frame.columns else None


def _read_part(file: str, blob: bytes | Exception | None, path: str) -> tuple[dict, pl.DataFrame]:
    """A part's curate.* metadata and rows, from its bytes (remote) or its local path (blob None)."""
    if isinstance(blob, Exception):
        raise OSError(f"ScoreCache: cannot read part {file} of {path} ({type(blob).__name__}: {blob})") from blob
    source = file if blob is None else io.BytesIO(blob)
    try:
        raw = pl.read_parquet_metadata(source)
        frame = pl.read_parquet(source)
    except Exception as err:
        raise ValueError(f"ScoreCache: part {file} is not a readable Parquet file ({type(err).__name__}: {err}); "
                         f"delete it and regenerate it with {REGENERATE}") from err
    meta = {name.removeprefix("curate."): value for name, value in raw.items() if name.startswith("curate.")}
    return meta, frame


def _check_part(file: str, meta: dict, frame: pl.DataFrame, first_file: str, first: dict, schema,
                expect_schema_version: int) -> None:
    if "schema_version" not in meta:
        raise ValueError(f"ScoreCache: part {file} has no curate.* metadata (not written by curate.write_part); "
                         f"regenerate it with {REGENERATE}")
    if meta["schema_version"] != str(expect_schema_version):
        raise ValueError(f"ScoreCache: part {file} has schema version {meta['schema_version']}, expected "
                         f"{expect_schema_version}; regenerate the cache with {REGENERATE}")
    for name in _CONSISTENT:
        if meta.get(name) != first.get(name):
            raise ValueError(f"ScoreCache: parts disagree on {name}: {first.get(name)!r} in {first_file}, "
                             f"{meta.get(name)!r} in {file}; a cache holds one reference's scores, regenerate "
                             f"the odd parts with {REGENERATE}")
    if frame.schema != schema:
        raise ValueError(f"ScoreCache: part {file} has columns {dict(frame.schema)}, but {first_file} has "
                         f"{dict(schema)}; regenerate the odd parts with {REGENERATE}")
    if KEY not in frame.columns or frame[KEY].dtype != pl.String or frame[KEY].null_count():
        raise ValueError(f"ScoreCache: part {file} needs a non-null string column {KEY!r}; regenerate it with "
                         f"{REGENERATE}")
