"""Writing a split's rows as shards: webdataset tar files or Parquet tables, each shard written atomically.

A row is a webdataset sample: `__key__` plus members (name → bytes). `write_tar` writes the members as they are;
`write_parquet` writes one column per member (`__key__`, image bytes as binary, text as UTF-8 strings, `cls` as
an integer), the layout of Hugging Face and DataComp image-text exports. `as_jpeg` turns a row's uint8 `.npy`
image into JPEG bytes (`jpg`), the image format img2dataset writes. Identical rows give byte-identical shards;
shards of the same suffix a previous, larger run left behind are removed, so a glob never picks them up.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from curate.files import atomic_write

__all__ = ["SUFFIX", "as_jpeg", "write_parquet", "write_tar"]

SUFFIX = {"npy": "tar", "webdataset": "tar", "parquet": "parquet"}  # a make_digits format → its shards' suffix
JPEG_QUALITY = 95  # high enough that a 16×16 digit keeps its strokes; img2dataset's default is 95 too


def as_jpeg(row: dict) -> dict:
    """The row with its `npy` image (uint8 H×W) replaced by an RGB JPEG `jpg` member."""
    from PIL import Image

    pixels = np.load(io.BytesIO(row["npy"]), allow_pickle=False)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return {"__key__": row["__key__"], "jpg": buffer.getvalue(),
            **{name: value for name, value in row.items() if name not in ("__key__", "npy")}}


def write_tar(rows: list[dict], directory: Path, split: str, shard_size: int) -> list[dict]:
    """Tar shards `split-NNNNNN.tar` of `shard_size` rows; their manifest entries (path, count, bytes, sha256)."""
    import webdataset as wds

    def write(stream, chunk: list[dict]) -> None:
        # Fixed mtime/owner: the same rows give byte-identical tar files.
        with wds.TarWriter(stream, encoder=False, mtime=0, user="curate", group="curate") as writer:
            for row in chunk:
                writer.write(row)

    return _write(rows, directory, split, shard_size, "tar", write)


def write_parquet(rows: list[dict], directory: Path, split: str, shard_size: int) -> list[dict]:
    """Parquet shards `split-NNNNNN.parquet` of `shard_size` rows, one column per member."""
    import polars as pl

    def column(name: str, values: list):
        if name == "cls":
            return pl.Series(name, [int(value) for value in values], dtype=pl.Int64)
        if name in ("__key__", "txt", "json"):
            return pl.Series(name, [v.decode() if isinstance(v, bytes) else v for v in values], dtype=pl.String)
        return pl.Series(name, values, dtype=pl.Binary)

    def write(stream, chunk: list[dict]) -> None:
        names = list(chunk[0])
        table = pl.DataFrame([column(name, [row[name] for row in chunk]) for name in names])
        table.write_parquet(stream, statistics=False)

    return _write(rows, directory, split, shard_size, "parquet", write)


def _write(rows: list[dict], directory: Path, split: str, shard_size: int, suffix: str, write) -> list[dict]:
    directory.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, start in enumerate(range(0, len(rows), shard_size)):
        final = directory / f"{split}-{index:06d}.{suffix}"
        chunk = rows[start:start + shard_size]
        with atomic_write(final) as stream:  # a killed run leaves no partial shard
            write(stream, chunk)
        data = final.read_bytes()
        shards.append({"path": f"{directory.name}/{final.name}", "count": len(chunk), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
    # Shards a previous, larger run left here would join a glob; temp files are what a killed run left.
    written = {shard["path"] for shard in shards}
    for path in [*directory.glob(f"{split}-*.{suffix}"), *directory.glob(f".{split}-*.{suffix}*.tmp")]:
        if f"{directory.name}/{path.name}" not in written:
            path.unlink(missing_ok=True)
    return shards
