"""Offline reference scores: a directory or `s3://` prefix of Parquet parts, one row per `__key__`.

A part holds `__key__` and the reference's per-example `ref_loss` and/or its L2-normalised `image_emb` /
`text_emb` (fixed-size float32 arrays, or float16 with `write_part(..., emb_dtype="float16")`: half the bytes).
Provenance lives in the Parquet key-value metadata under `curate.*`: schema version, reference-model hash,
scorer, score kind ("example", "softmax", "sigmoid"), dataset, created-at, the reference's logit scale / bias, and
a sha256 checksum of the part's decoded contents (keys, score columns, schema and the other `curate.*` entries),
verified on open: a damaged part raises `CorruptPartError` instead of loading different numbers.
`ScoreCache.open(expect={...})` refuses a cache of another reference, dataset or scorer (`ProvenanceError`), and
`scores` refuses a scorer of another kind than the cache was written for (a SigLIP cache for a softmax scorer).

`ScoreCache.open` loads the parts into memory (all of them, or one rank's share: `parts=` / `keys=`) and
indexes the keys by a 64-bit hash sorted once, so a step's lookup is a radix-directory search over sorted
integers (a Polars join per step is ~100× slower). The hot path is numpy on purpose: torch's small
multi-threaded ops stall ~10 ms on a busy CPU (OpenMP barriers).
Parts are written by `write_part` (the `curate precompute` job) and can be inspected with Polars directly
through `scan`. Remote paths go through fsspec/s3fs (`storage_options` in s3fs's spelling);
`scan` translates them for Polars' own object store (`polars_storage_options`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from .batch import is_batch, split_batch, take
from .files import atomic_write, filesystem
from .scorers import Kind, ModelScores, Scorer, score_model

__all__ = ["CorruptPartError", "DuplicateKeysError", "KeyTypeError", "MissingKeysError", "ProvenanceError",
           "SCHEMA_VERSION", "ScoreCache", "model_hash", "part_metadata", "polars_storage_options", "scan",
           "write_part"]

SCHEMA_VERSION = 2  # 2: curate.kind and curate.checksum (version 1 parts have neither)
KEY = "__key__"
REGENERATE = "`curate precompute RECIPE`"
_COLUMNS = ("ref_loss", "image_emb", "text_emb")
_EMB_DTYPES = {"float32": np.float32, "float16": np.float16}
_PART_NAME = re.compile(r"part-(\d+)\.parquet")  # how `curate precompute` names shard i's part
_CHECK_SEED = 8  # the second hash's seed offset: outside the seeds _index tries for the search hash
_REQUIRED = ("reference_hash", "scorer", "dataset")
_RESERVED = ("schema_version", "created_at", "logit_scale", "logit_bias", "kind", "checksum")
_CONSISTENT = ("schema_version", "reference_hash", "scorer", "kind", "dataset", "logit_scale", "logit_bias")
_KINDS = ("example", "softmax", "sigmoid")
_FOOTER_GUESS = 1 << 16  # bytes of a remote part's tail fetched to read its footer: most footers fit in one request
# Polars' object store, bounded like curate.files' S3 (5 s connect, 20 s per request, retries within 30 s):
# with only connect_timeout a scan of a stopped endpoint hung for over 6.5 minutes (measured against moto)
_POLARS_RETRY = {"max_retries": 2, "retry_timeout": "30s", "connect_timeout": "5s", "timeout": "20s"}


class MissingKeysError(ValueError):
    """`ScoreCache.scores` was asked for keys the cache did not load (missing="error"). `keys` are the first
    missing ones (at most 5), `count` how many there were. A ValueError, as this error was before it had a name."""

    def __init__(self, message: str, keys: list[str], count: int):
        super().__init__(message)
        self.keys, self.count = keys, count


class CorruptPartError(ValueError):
    """A cache part that cannot be trusted: unreadable, or its contents do not match the checksum written with
    it (a flipped bit, a truncated copy). `part` is the file."""

    def __init__(self, part: str, why: str):
        super().__init__(f"ScoreCache: part {part} is damaged ({why}); delete it and rerun {REGENERATE} (which "
                         "scores only the missing parts), or rerun it with --overwrite to rescore every part")
        self.part = part


class ProvenanceError(ValueError):
    """A cache written for another reference, dataset or scorer than the caller expects (`ScoreCache.open(
    expect=...)`). `field` is the provenance entry, `found` the cache's value, `expected` the caller's."""

    def __init__(self, message: str, field: str, found, expected):
        super().__init__(message)
        self.field, self.found, self.expected = field, found, expected


class DuplicateKeysError(ValueError):
    """A superbatch holds one `__key__` more than once, so its samples would share one cached score. `keys` are
    the first duplicated keys (at most 5)."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = keys


class KeyTypeError(TypeError):
    """`__key__` values that are not strings (ints, tensors, None): the cache is keyed by strings."""


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
               kind: str | None = None, emb_dtype: str = "float32", storage_options: dict | None = None) -> str:
    """Writes one cache part (a `.parquet` file) atomically and returns its path.

    Args:
        path: the part's file, local or `s3://bucket/prefix/part-00000.parquet`.
        keys: the samples' `__key__`s, unique within the part (and across the cache's parts).
        ref_loss: per-example reference losses (n,). image_emb, text_emb: L2-normalised embeddings (n, d).
        logit_scale: the reference's `logit_scale` parameter (log of the scale, `model.logit_scale.item()`),
            required with embeddings.
        logit_bias: the reference's sigmoid logit bias (None for a softmax-only reference).
        metadata: provenance; needs "reference_hash" (`model_hash(reference)`), "scorer", "dataset" (best an
            identity of the data, e.g. a hash of its shard list, so that a cache of other data is told apart);
            other entries (e.g. "recipe") are kept. Non-string values are stored as JSON.
        kind: the scorer kind the scores are for, `Scorer.kind`: "example" (losses only), "softmax" or "sigmoid"
            (the embeddings' loss). Default: "example" for losses only, else "sigmoid" with a logit_bias, "softmax"
            without. `ScoreCache.scores` refuses a contrastive scorer of another kind.
        emb_dtype: "float32" or "float16", how the embeddings are stored. float16 halves their bytes (on disk and
            in a loaded cache) and rounds each coordinate to ~3 significant digits; `ScoreCache` hands the
            sampler float32 either way. ref_loss is always float32.
        storage_options: fsspec/s3fs options for remote paths.

    Written with `curate.files.atomic_write`: a failed write never leaves a partial part. The part carries a
    sha256 of its decoded contents (`curate.checksum`), which `ScoreCache.open` verifies.
    """
    if not str(path).endswith(".parquet"):
        raise ValueError(f"write_part: path must end in .parquet (ScoreCache.open reads *.parquet), got {path=}")
    if emb_dtype not in _EMB_DTYPES:
        raise ValueError(f"write_part: emb_dtype must be one of {list(_EMB_DTYPES)}, got {emb_dtype=}")
    frame = _part_frame(keys, ref_loss, image_emb, text_emb, _EMB_DTYPES[emb_dtype])
    has_emb = "image_emb" in frame.columns
    if has_emb and logit_scale is None:
        raise ValueError("write_part: embeddings need the reference's logit_scale; pass model.logit_scale.item()")
    missing = [name for name in _REQUIRED if not metadata.get(name)]
    reserved = [name for name in _RESERVED if name in metadata]
    if missing or reserved:
        raise ValueError(f"write_part: metadata needs {list(_REQUIRED)} and must not set {list(_RESERVED)}; "
                         f"got {sorted(metadata)} (missing {missing}, reserved {reserved})")
    kind = _part_kind(kind, has_emb, "ref_loss" in frame.columns, logit_bias)
    meta = {name: value if isinstance(value, str) else json.dumps(value) for name, value in metadata.items()}
    meta |= {"schema_version": str(SCHEMA_VERSION), "created_at": datetime.now(timezone.utc).isoformat("T", "seconds"),
             "logit_scale": _float_text(logit_scale, "logit_scale"),
             "logit_bias": _float_text(logit_bias, "logit_bias"), "kind": kind}
    meta["checksum"] = _checksum(frame, meta)
    meta = {f"curate.{name}": value for name, value in meta.items()}
    with atomic_write(str(path), parents=True, storage_options=storage_options) as stream:
        frame.write_parquet(stream, metadata=meta)
    return str(path)


def _part_kind(kind: str | None, has_emb: bool, has_loss: bool, logit_bias: float | None) -> str:
    if kind is None:
        return ("sigmoid" if logit_bias is not None else "softmax") if has_emb else "example"
    usable = {"example": has_loss and not has_emb, "softmax": has_emb, "sigmoid": has_emb and logit_bias is not None}
    if kind not in _KINDS or not usable[kind]:
        raise ValueError(f"write_part: kind must be one of {list(_KINDS)} and match the columns (example: ref_loss; "
                         f"softmax: embeddings; sigmoid: embeddings and logit_bias), got {kind=}")
    return kind


def _checksum(frame: pl.DataFrame, meta: dict) -> str:
    """sha256 over what a reader gets from a part: schema, the other curate.* entries, key bytes and lengths, and
    the score columns' bytes. Of decoded values, not file bytes, so a flip anywhere in the file (data pages,
    page headers, footer, schema) that changes what is read changes the digest; one that changes nothing read
    (e.g. unused statistics) does not matter. hashlib releases the GIL and runs at ~1.4 GB/s."""
    digest = hashlib.sha256()
    header = {"schema": {name: str(dtype) for name, dtype in frame.schema.items()},
              "metadata": sorted((name, value) for name, value in meta.items() if name != "checksum")}
    digest.update(json.dumps(header).encode())
    keys = frame[KEY]
    digest.update(keys.str.len_bytes().to_numpy().astype("<u4").tobytes())
    digest.update(keys.str.join("").cast(pl.Binary).item())  # one buffer: ~30 ns a key, not a Python loop
    for name in _COLUMNS:
        if name in frame.columns:
            digest.update(np.ascontiguousarray(frame[name].to_numpy()).reshape(-1).view(np.uint8).data)
    return f"sha256:{digest.hexdigest()}"


def _float_text(value: float | None, name: str) -> str:
    if value is None:
        return ""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"write_part: {name} must be finite, got {value}")
    return repr(value)  # repr round-trips a float exactly: cached and online scales are bitwise equal


def _part_frame(keys: Sequence[str], ref_loss, image_emb, text_emb, emb_dtype: type) -> pl.DataFrame:
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
        with np.errstate(over="ignore"):  # checked after the cast: beyond float16's range (65504) it becomes inf
            array = array.astype(np.float32 if ndim == 1 else emb_dtype, copy=False)
        bad = ~np.isfinite(array.reshape(n, -1)).all(1)
        if bad.any():
            raise ValueError(f"write_part: {name} is NaN/inf{'' if array.dtype == np.float32 else ' in float16'} "
                             f"for keys {key_column.filter(pl.Series(bad)).head(5).to_list()}")
        columns.append(pl.Series(name, array))
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
        parts: the files the frame came from, named in errors.
        part_rows: how many of the frame's rows came from each part, in order (default: all from one).
        path: where the cache lives, for messages.
        selection: what `open` loaded when it was not the whole cache (e.g. "parts=[0, 4]"), for messages.
        missing: what a lookup of an absent key does. "error" (default) raises `MissingKeysError` naming the
            first missing keys and the command that regenerates them; "online" scores the missing samples with
            `fallback` (the same reference model, checked by hash) and counts them in `stats()["online"]`.
            There is no "drop": Score must return a score for every sample, so dropping happens upstream,
            counted: `curate.pipeline(cache.filter(samples), reference=cache, ...)`.
        fallback: the reference nn.Module, for missing="online".

    `keys` (a Polars Series), `ref_loss` (n,) and `image_emb` / `text_emb` (n, d) are the loaded rows; the
    embeddings keep the dtype they were stored in (float16 or float32), `scores` returns float32.
    """

    def __init__(self, frame: pl.DataFrame, metadata: dict, *, parts: Sequence[str] = (),
                 part_rows: Sequence[int] | None = None, path: str = "<memory>", selection: str = "",
                 missing: str = "error", fallback: nn.Module | None = None):
        if KEY not in frame.columns or frame.height == 0:
            raise ValueError(f"ScoreCache: needs rows with a {KEY!r} column, got {frame.height} rows, {frame.columns}")
        columns = {name: _column(frame, name) for name in _COLUMNS}
        self._setup(frame[KEY], columns, metadata, parts, part_rows, path, selection, missing, fallback)

    def _setup(self, keys: pl.Series, columns: dict, metadata: dict, parts: Sequence[str],
               part_rows: Sequence[int] | None, path: str, selection: str, missing: str,
               fallback: nn.Module | None) -> None:
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
        self.path, self.parts, self.metadata, self.selection = path, list(parts), dict(metadata), selection
        self.missing, self.fallback = missing, fallback
        self.keys: pl.Series = keys.rechunk()  # gathers on one chunk are ~5× faster than on many
        self.ref_loss, self.image_emb, self.text_emb = (columns[name] for name in _COLUMNS)
        # the first row of each part, for naming the files of duplicated keys
        self._part_starts = np.cumsum([0, *(part_rows if part_rows is not None else [len(keys)])])[:-1]
        self.logit_scale = float(metadata["logit_scale"]) if metadata.get("logit_scale") else None
        self.logit_bias = float(metadata["logit_bias"]) if metadata.get("logit_bias") else None
        self.kind = metadata.get("kind") or None  # None: an in-memory cache that does not say
        self._index()
        self.counts = {"looked_up": 0, "online": 0, "dropped": 0}

    @classmethod
    def open(cls, path: str, storage_options: dict | None = None, *,
             parts: Iterable[int] | Callable[[str], bool] | None = None, keys: Iterable[str] | None = None,
             expect: dict | None = None,
             expect_schema_version: int = SCHEMA_VERSION, missing: str = "error",
             fallback: nn.Module | None = None) -> ScoreCache:
        """Loads the `*.parquet` parts under `path` (a directory, an `s3://` prefix, or one file): all of them,
        or the share one rank looks up.

        Args:
            storage_options: fsspec/s3fs options, e.g. {"key", "secret", "client_kwargs": {"endpoint_url"}}.
            parts: which part files to read. Part indices: `curate precompute` writes shard i of the manifest
                to `part-0000i.parquet`, so rank r of W (which `curate.Shards` gives shards i % W == r) loads
                `parts=range(r, n_shards, W)`; an index with no part is an error. Or a predicate over a part's
                file name, e.g. `lambda name: name.startswith("part-001")`. Default: every part.
            keys: keep only the rows of these keys (e.g. the rank's key list); parts are still read whole, one
                at a time. Keys that are in no part are not an error here: looking them up is.
            expect: provenance the parts must have, e.g. {"reference_hash": model_hash(reference), "dataset":
                ..., "kind": scorer.kind, "scorer": repr(scorer)} (any of reference_hash, dataset, kind, scorer;
                None values are not checked); a part with another value raises `ProvenanceError` naming both.
            expect_schema_version: raise unless the parts have this schema version.
            missing, fallback: see the class.

        A cache opened with `parts=` or `keys=` holds only those rows: `scores` for any other key raises
        `MissingKeysError` (missing="error"), saying what was loaded. Provenance is checked on the parts read, and
        each part's checksum is verified (`CorruptPartError` names a damaged one).
        """
        expected = _expectations(expect)
        fs, root = filesystem(str(path), storage_options)
        try:
            fs.invalidate_cache(root)  # s3fs caches listings: parts written by other processes must show up
            files = [root] if root.endswith(".parquet") else sorted(fs.glob(root.rstrip("/") + "/*.parquet"))
        except Exception as err:  # botocore/aiohttp errors share no base class; say which path and why
            raise OSError(f"ScoreCache: cannot list {path} ({type(err).__name__}: {err}); check the path and "
                          "storage_options (endpoint_url, credentials)") from err
        if not files:
            raise FileNotFoundError(f"ScoreCache: no *.parquet parts at {path!r}; write them with {REGENERATE}")
        files, selection = _select_parts(files, parts, path)
        wanted = None if keys is None else _key_series(keys)
        if wanted is not None:
            selection = (f"{selection}, " if selection else "") + f"keys= ({len(wanted)} keys)"
        key_parts: list[pl.Series] = []
        column_parts: dict[str, list[np.ndarray | None]] = {name: [] for name in _COLUMNS}
        metas: list[dict] = []
        schema = None
        local = "file" in fs.protocol
        for start in range(0, len(files), 16):  # remote parts are fetched 16 at a time, concurrently by s3fs
            batch = files[start:start + 16]
            blobs = dict.fromkeys(batch) if local else fs.cat(batch, on_error="return")
            for file in batch:
                meta, frame = _read_part(file, blobs.pop(file), path)  # pop: each blob is freed once decoded
                schema = schema or frame.schema
                _check_part(file, meta, frame, files[0], metas[0] if metas else meta, schema, expect_schema_version)
                _check_provenance(file, meta, expected, path)
                if wanted is not None:
                    frame = frame.filter(pl.col(KEY).is_in(wanted.implode()))
                metas.append(meta)
                key_parts.append(frame[KEY])
                for name in _COLUMNS:
                    column_parts[name].append(_column(frame, name))  # views of the part's Arrow buffers
                del frame
        first = metas[0]
        part_rows = [len(k) for k in key_parts]
        if sum(part_rows) == 0:
            raise ValueError(f"ScoreCache: none of the {len(wanted) if wanted is not None else 0} keys= are in the "
                             f"{len(files)} parts read from {path}; pass the keys this cache was written for")
        created = sorted(meta["created_at"] for meta in metas)
        first = {**first, "created_at": created[0] if created[0] == created[-1] else f"{created[0]} .. {created[-1]}"}
        self = cls.__new__(cls)
        self._setup(pl.concat(key_parts, rechunk=True), {name: _concat(column_parts[name]) for name in _COLUMNS},
                    first, files, part_rows, str(path), selection, missing, fallback)
        return self

    def _index(self) -> None:
        """Sorts the keys' 64-bit hashes once (reseeding on a collision between distinct keys) and builds the
        search structures `_lookup` reads."""
        for seed in range(_CHECK_SEED):
            hashes = self.keys.hash(seed).to_numpy()
            order = np.argsort(hashes)
            ordered = hashes[order]
            same = np.flatnonzero(ordered[1:] == ordered[:-1])
            if len(same) == 0:
                break
            first, second = self.keys.gather(order[same]), self.keys.gather(order[same + 1])
            duplicated = first.filter(first == second).unique().sort()
            if len(duplicated):
                raise ValueError(f"ScoreCache: {len(duplicated)} keys appear more than once in {self.path}: "
                                 f"{self._where(duplicated.head(5))}; each sample must be in one part")
        else:
            raise AssertionError(f"{_CHECK_SEED} hash seeds all collided")
        n = len(ordered)
        self._seed = seed
        # A radix directory over the sorted hashes: bucket b (the top `bits` bits) starts at _directory[b] and
        # holds ~3 hashes, so a lookup reads one directory entry and then lifts its position through the bucket
        # by halving steps (`_steps`, summing to at least the fullest bucket): ~3 cache misses where a binary
        # search over millions of hashes takes ~23. Every hash past a bucket is larger than those in it, so the
        # steps need no bound; the padding (the largest uint64) keeps the last bucket's steps inside the array.
        bits = max(1, int(np.ceil(np.log2(n))) - 2)
        self._shift = np.uint64(64 - bits)
        counts = np.bincount((ordered >> self._shift).astype(np.intp), minlength=2**bits)
        self._directory = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._steps = [1 << k for k in reversed(range(int(counts.max()).bit_length()))]
        self._sorted = np.concatenate([ordered, np.full(max(sum(self._steps), 1), np.iinfo(np.uint64).max)])
        self._probes = [self._sorted[step - 1:] for step in self._steps]  # views: no `position + step - 1` per step
        # Each sorted hash's (row, second hash) side by side, gathered as one 16-byte item. A key is found when
        # both 64-bit hashes match: comparing the key strings themselves costs more than the whole search
        # (0.44 of 1.3 ms for 4096 keys), and an absent key matching both hashes of a cached one has odds of
        # ~n / 2**128 (1e-32 per key at 5M rows).
        check = self.keys.hash(seed + _CHECK_SEED).to_numpy()[order]
        self._rows = np.stack([order.astype(np.uint64), check], 1).view(np.complex128).reshape(n)

    def _where(self, keys: pl.Series) -> dict:
        rows = np.flatnonzero(self.keys.is_in(keys.implode()).to_numpy())
        if not self.parts:
            return {key: [] for key in keys}
        part = np.searchsorted(self._part_starts, rows, side="right") - 1
        found = pl.DataFrame({KEY: self.keys.gather(rows), "part": part})
        return {key: sorted({self.parts[i] for i in group["part"]}) for (key,), group in found.group_by(KEY)}

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        loaded = f", {self.selection}" if self.selection else ""
        return f"ScoreCache({self.path!r}, rows={len(self)}, parts={len(self.parts)}{loaded})"

    def lookup(self, keys: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(rows, found): each key's row in the cache's arrays (-1 when absent) and whether it is there."""
        rows, found = self._lookup(keys)
        return torch.from_numpy(rows), torch.from_numpy(found)

    def _lookup(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        query = _key_series(keys)
        hashes = query.hash(self._seed).to_numpy()
        position = self._directory[hashes >> self._shift]
        for step, probe in zip(self._steps, self._probes, strict=True):
            np.add(position, step, out=position, where=probe[position] < hashes)
        n = len(self._rows)
        found = (self._sorted[position] == hashes) & (position < n)  # position n: the padding
        row_check = self._rows[np.minimum(position, n - 1)].view(np.uint64).reshape(-1, 2)
        found &= row_check[:, 1] == query.hash(self._seed + _CHECK_SEED).to_numpy()
        rows = row_check[:, 0].astype(np.int64)
        rows[~found] = -1
        self.counts["looked_up"] += len(query)
        return rows, found

    def scores(self, batch: dict, scorer: Scorer, micro_batch_size: int = 1024) -> ModelScores:
        """The reference's `ModelScores` for a superbatch, from the cache (the ScoreProvider protocol).
        `micro_batch_size` bounds the fallback's forward passes (missing="online"); `Score` passes its own."""
        keys = batch[KEY]
        rows, found = self._lookup(keys)
        self._check_unique(rows[found], len(keys))
        kind = scorer.kind
        cached = self._gather(np.maximum(rows, 0), kind)
        if found.all():
            return cached
        absent = torch.from_numpy(np.flatnonzero(~found))
        if self.missing == "error":
            names = [keys[i] for i in absent[:5].tolist()]
            if self.selection:  # most likely a key of another rank's share
                raise MissingKeysError(
                    f"ScoreCache: {len(absent)} of {len(keys)} keys are not in the rows loaded from {self.path} "
                    f"(opened with {self.selection}), e.g. {names}; open it with the parts/keys this rank reads, "
                    "e.g. parts=range(rank, n_shards, world_size) for curate.Shards, or without parts=/keys= for "
                    "the whole cache", names, len(absent))
            raise MissingKeysError(f"ScoreCache: {len(absent)} of {len(keys)} keys are not in {self.path}, e.g. "
                                   f"{names}; regenerate the cache for this dataset with {REGENERATE}, or open it "
                                   "with missing='online', fallback=reference", names, len(absent))
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

    def _check_unique(self, rows: np.ndarray, n: int) -> None:
        """Two samples with one key would both get that key's score (one of them another sample's)."""
        ordered = np.sort(rows)  # ~30 us for 4096 rows, next to ~1 ms for the lookup
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if len(repeated):
            names = self.keys.gather(np.unique(repeated)[:5]).to_list()
            raise DuplicateKeysError(
                f"ScoreCache: the superbatch holds {KEY} {names} more than once ({len(repeated)} repeats in {n} keys); "
                f"a cached score belongs to one sample, so every sample needs its own {KEY} (e.g. shard name + "
                "index), or drop the repeated samples before Score", names)

    def _check_kind(self, kind: Kind) -> None:
        if self.kind is not None and kind != self.kind:
            names = {"example": "per-example losses", "softmax": "softmax (CLIP) embeddings",
                     "sigmoid": "sigmoid (SigLIP) embeddings"}
            raise ProvenanceError(
                f"ScoreCache: {self.path} holds {names.get(self.kind, self.kind)} (kind {self.kind!r}), but the "
                f"scorer is {kind!r}: the selection would not be the one the scorer's loss defines. Use a scorer with "
                f"loss={self.kind!r}, or rerun {REGENERATE} with this scorer (it rescores parts of another scorer)",
                "kind", self.kind, kind)

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
        self._check_kind(kind)
        # exp in float32 like ContrastiveScorer's model.logit_scale.exp(), so cached and online scales match bitwise
        scale = float(torch.tensor(self.logit_scale, dtype=torch.float32).exp())
        assert self.text_emb is not None, "ScoreCache: a frame with image_emb has text_emb (write_part writes both)"
        image, text = (torch.from_numpy(emb[rows].astype(np.float32, copy=False))  # float16 parts: the rows only
                       for emb in (self.image_emb, self.text_emb))
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
                columns[name] = f"{value.dtype}{list(value.shape[1:])}"
        out = {"path": self.path, "rows": len(self), "parts": len(self.parts), "columns": columns,
               "metadata": dict(self.metadata)}
        if self.selection:
            out["selection"] = self.selection
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
            pending.extend(split_batch(item) if is_batch(item) else [item])
            if len(pending) >= self.chunk:
                yield from self._keep(pending)
                pending = []
        yield from self._keep(pending)

    def _keep(self, samples: list[dict]) -> list[dict]:
        found = self.cache._lookup([s[KEY] for s in samples])[1].tolist()
        self.cache.counts["dropped"] += found.count(False)
        return [sample for sample, ok in zip(samples, found, strict=True) if ok]


def _column(frame: pl.DataFrame, name: str) -> np.ndarray | None:
    """A float column as numpy without a copy where Polars allows it (one chunk: a view of its Arrow buffer);
    embeddings keep float16 when stored so, anything else becomes float32."""
    if name not in frame.columns:
        return None
    array = frame[name].to_numpy()
    return array if array.dtype == np.float16 and array.ndim == 2 else array.astype(np.float32, copy=False)


def _concat(arrays: list) -> np.ndarray | None:
    """One array from the parts' columns; a single part's is used as it is (no copy). Empties the list as it
    goes, so each part's buffer is freed once copied."""
    if arrays[0] is None:
        return None
    if len(arrays) == 1:
        return arrays.pop()
    out = np.empty((sum(len(a) for a in arrays), *arrays[0].shape[1:]), arrays[0].dtype)
    start = 0
    while arrays:
        array = arrays.pop(0)
        out[start:start + len(array)] = array
        start += len(array)
    return out


def _key_series(keys: Iterable[str]) -> pl.Series:
    if isinstance(keys, pl.Series) and keys.dtype == pl.String:
        series = keys
    else:
        try:
            if isinstance(keys, Tensor | pl.Series):  # e.g. int keys that default_collate made a tensor
                raise TypeError(f"a {type(keys).__name__} of {getattr(keys, 'dtype', '?')}")
            series = pl.Series(KEY, list(keys), dtype=pl.String)
        except TypeError as err:
            raise KeyTypeError(f"ScoreCache: {KEY} values must be strings (a list of str per batch), got "
                               f"{str(err).splitlines()[0]}; make the keys strings in the source, e.g. "
                               f"sample['{KEY}'] = str(index)") from None
    if series.null_count():
        raise KeyTypeError(f"ScoreCache: {series.null_count()} {KEY} values are None; every sample needs a string "
                           f"{KEY}")
    return series


def _select_parts(files: list[str], parts, path: str) -> tuple[list[str], str]:
    """The part files `ScoreCache.open(parts=...)` asks for, and how to name that choice in messages."""
    if parts is None:
        return files, ""
    if callable(parts):
        chosen = [file for file in files if parts(posixpath.basename(file))]
        if not chosen:
            raise FileNotFoundError(f"ScoreCache: parts= selects none of the {len(files)} parts at {path!r} (e.g. "
                                    f"{posixpath.basename(files[0])!r}); check the predicate")
        return chosen, f"parts={getattr(parts, '__name__', 'predicate')}"
    items = [""] if isinstance(parts, str | bytes) else list(parts)
    if not items:
        raise ValueError(f"ScoreCache: parts= is empty, so nothing would be loaded from {path!r}; pass this rank's "
                         "part indices, e.g. parts=range(rank, n_shards, world_size) with rank < n_shards")
    if not all(isinstance(i, int | np.integer) and not isinstance(i, bool) and i >= 0 for i in items):
        raise TypeError(f"ScoreCache: parts= takes part indices (ints >= 0, e.g. range(rank, n_shards, world_size)) "
                        f"or a predicate over file names, got {parts!r}")
    indices = sorted({int(i) for i in items})
    by_index = {int(m.group(1)): file for file in files if (m := _PART_NAME.fullmatch(posixpath.basename(file)))}
    absent = [i for i in indices if i not in by_index]
    if absent:
        raise FileNotFoundError(f"ScoreCache: no part-NNNNN.parquet for parts {absent[:10]} at {path!r} "
                                f"({len(by_index)} parts there); score those shards with {REGENERATE}, or pass "
                                "parts= only the indices written (a shard skipped by --on-error skip has no part)")
    shown = f"{indices[:8]}"[:-1] + (", ...]" if len(indices) > 8 else "]")
    return [by_index[i] for i in indices], f"parts={shown}"


def _read_part(file: str, blob: bytes | Exception | None, path: str) -> tuple[dict, pl.DataFrame]:
    """A part's curate.* metadata and rows, from its bytes (remote) or its local path (blob None)."""
    if isinstance(blob, Exception):
        raise OSError(f"ScoreCache: cannot read part {file} of {path} ({type(blob).__name__}: {blob})") from blob
    source = file if blob is None else io.BytesIO(blob)
    try:
        raw = pl.read_parquet_metadata(source)
        frame = pl.read_parquet(source, memory_map=True)  # a local part is mapped, not read into a buffer first
    except (Exception, pl.exceptions.PanicException) as err:  # a damaged file can make Polars' Rust code panic
        raise CorruptPartError(file, f"not a readable Parquet file: {type(err).__name__}: {err}") from err
    meta = {name.removeprefix("curate."): value for name, value in raw.items() if name.startswith("curate.")}
    if meta and meta.get("schema_version") != "1":  # no curate.* or version 1 (no checksum): _check_part says so
        _verify(file, meta, frame)
    return meta, frame


def _verify(file: str, meta: dict, frame: pl.DataFrame) -> None:
    """Raises CorruptPartError unless the part decodes to exactly what write_part wrote."""
    if "checksum" not in meta:
        raise CorruptPartError(file, "it has curate.* metadata but no curate.checksum")
    nulls = {name: count for name, count in zip(frame.columns, frame.null_count().row(0), strict=True) if count}
    if nulls:  # write_part never writes a null; a damaged definition level can make one
        raise CorruptPartError(file, f"null values in {nulls}")
    try:
        digest = _checksum(frame, meta)
    except (Exception, pl.exceptions.PanicException) as err:  # e.g. a column decoded as a type it never had
        raise CorruptPartError(file, f"its columns cannot be checked: {type(err).__name__}: {err}") from err
    if digest != meta["checksum"]:
        raise CorruptPartError(file, f"its contents hash to {digest[:23]}..., the part records "
                                     f"{meta['checksum'][:23]}...")


def part_metadata(file: str, storage_options: dict | None = None) -> dict:
    """One part's curate.* metadata (prefix removed), from its footer alone: one or two ranged reads of a remote
    part, not the whole file. {} for a file without curate.* entries. Raises CorruptPartError for a file whose
    footer cannot be read. The checksum is not verified here (that needs the whole part): see ScoreCache.open."""
    fs, target = filesystem(file, storage_options)
    try:
        if "file" in fs.protocol:
            raw = pl.read_parquet_metadata(target)
        else:
            size = fs.size(target)
            tail = fs.cat_file(target, start=max(0, size - _FOOTER_GUESS))
            length = int.from_bytes(tail[-8:-4], "little")
            if tail[-4:] != b"PAR1" or length + 8 > size:
                raise ValueError("no Parquet footer")
            if length + 8 > len(tail):
                tail = fs.cat_file(target, start=size - length - 8)
            raw = pl.read_parquet_metadata(io.BytesIO(b"PAR1" + tail[-length - 8:]))  # the footer is self-contained
    except FileNotFoundError:
        raise
    except (Exception, pl.exceptions.PanicException) as err:
        raise CorruptPartError(file, f"its Parquet footer cannot be read: {type(err).__name__}: {err}") from err
    return {name.removeprefix("curate."): value for name, value in raw.items() if name.startswith("curate.")}


_PROVENANCE = {  # what `expect=` may check, and what a mismatch most likely means
    "reference_hash": "the reference was retrained or replaced since the cache was written",
    "dataset": "the cache was made for other data (another dataset, split or version of its shards)",
    "kind": "the cache holds scores of another kind (losses, softmax/CLIP or sigmoid/SigLIP embeddings)",
    "scorer": "the cache was scored with another scorer (fields, loss or precision)",
}


def _expectations(expect: dict | None) -> dict:
    expected = {name: value for name, value in (expect or {}).items() if value is not None}
    unknown = sorted(set(expected) - set(_PROVENANCE))
    if unknown:
        raise ValueError(f"ScoreCache.open: expect= checks {list(_PROVENANCE)}, got {unknown}")
    return {name: str(value) for name, value in expected.items()}


def _check_provenance(file: str, meta: dict, expected: dict, path: str) -> None:
    for name, value in expected.items():
        if meta.get(name) != value:
            raise ProvenanceError(
                f"ScoreCache: {path} was written with {name} {meta.get(name)!r} (part {file}), but {value!r} is "
                f"expected: {_PROVENANCE[name]}. Rerun {REGENERATE} with this recipe: it rescores the parts made "
                "with another reference, dataset or scorer (--overwrite rescores every part); or point cache.path "
                "at the cache made for it", name, meta.get(name), value)


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
                             f"{meta.get(name)!r} in {file}; a cache holds one reference's scores: rerun "
                             f"{REGENERATE} with the recipe of the reference you want, which rescores the parts "
                             "made with another reference, dataset or scorer (--overwrite rescores every part)")
    if frame.schema != schema:
        raise ValueError(f"ScoreCache: part {file} has columns {dict(frame.schema)}, but {first_file} has "
                         f"{dict(schema)}; regenerate the odd parts with {REGENERATE}")
    if KEY not in frame.columns or frame[KEY].dtype != pl.String or frame[KEY].null_count():
        raise ValueError(f"ScoreCache: part {file} needs a non-null string column {KEY!r}; regenerate it with "
                         f"{REGENERATE}")
