"""Files that appear whole or not at all, local or remote (fsspec).

Every file curate and its jobs write goes through `atomic_write`: locally the bytes go to a hidden temporary
name in the same directory, are flushed to disk, and the file is renamed into place (a rename within a
directory is atomic), so a killed job never leaves a partial file under the real name and readers that list
`*.parquet` or `*.tar` never see one. On object stores (`s3://`) the file is one PUT (or one completed
multipart upload), which is atomic already. Temporary names are `.NAME.<12 hex>.tmp`: unique per writer, so
two writers of one file never share a temporary, and `stale_temps(path)` finds what killed writers left.
"""

from __future__ import annotations

import glob
import io
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

__all__ = ["S3_CONFIG", "atomic_write", "filesystem", "stale_temps", "write_json"]

# Bounded retries/timeouts so an unreachable endpoint fails in seconds instead of botocore's minutes.
S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}
_TEMP = ".tmp"


def filesystem(path: str, storage_options: dict | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path within it), with bounded S3 retries unless `config_kwargs` overrides them."""
    import fsspec

    options = dict(storage_options or {})
    protocol = fsspec.utils.get_protocol(path)
    if protocol in ("s3", "s3a"):
        options["config_kwargs"] = {**S3_CONFIG, **options.get("config_kwargs", {})}
    try:
        return fsspec.core.url_to_fs(path, **options)
    except ImportError as error:  # fsspec names the package; say which extra has it
        extra = {"s3": "s3", "s3a": "s3"}.get(protocol)
        hint = f'pip install "curate[{extra}]"' if extra else f"install the fsspec backend for {protocol}://"
        raise ImportError(f"{path}: reading {protocol}:// paths needs an fsspec backend: {hint} ({error})") from error


def _temp(target: str) -> str:
    head, name = os.path.split(target)
    return os.path.join(head, f".{name}.{uuid.uuid4().hex[:12]}{_TEMP}")


def stale_temps(path: str | os.PathLike) -> list[str]:
    """Temporary files that writers of local `path` left behind (killed mid-write)."""
    head, name = os.path.split(os.fspath(path))
    return sorted(glob.glob(os.path.join(glob.escape(head), f".{glob.escape(name)}.{'[0-9a-f]' * 12}{_TEMP}")))


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, parents: bool = False,
                 storage_options: dict | None = None) -> Iterator[IO]:
    """A file object to write `path` through; the file appears at `path`, whole, only if the block succeeds.

    Args:
        path: a local path or an fsspec URL (`s3://bucket/key`).
        mode: "wb" (bytes) or "w" (text, UTF-8).
        parents: create missing parent directories of a local path (object stores have none).
        storage_options: fsspec options for remote paths (s3fs's spelling).

    An exception inside the block propagates and leaves nothing behind: no temporary, no partial file, and
    whatever was at `path` before stays as it was.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode=}")
    fs, target = filesystem(os.fspath(path), storage_options)
    if "file" not in fs.protocol:
        buffer: io.BytesIO | io.StringIO = io.BytesIO() if mode == "wb" else io.StringIO()
        yield buffer
        value = buffer.getvalue()
        fs.pipe_file(target, value if isinstance(value, bytes) else value.encode())
        return
    if parents:
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    temp = _temp(target)
    try:
        with open(temp, mode, encoding=None if mode == "wb" else "utf-8") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())  # the bytes are on disk before the name points at them
        os.replace(temp, target)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def write_json(path: str | os.PathLike, value: Any, *, indent: int = 2, parents: bool = False) -> None:
    """`value` as JSON (and a final newline) at `path`, atomically."""
    with atomic_write(path, "w", parents=parents) as stream:
        json.dump(value, stream, indent=indent)
        stream.write("\n")
