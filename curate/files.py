"""Files that appear whole or not at all, local or remote (fsspec).

Every file curate and its jobs write goes through `atomic_write`: locally the bytes go to a hidden temporary
name in the same directory, are flushed to disk, and the file is renamed into place (a rename within a
directory is atomic), so a killed job never leaves a partial file under the real name and readers that list
`*.parquet` or `*.tar` never see one. On object stores (`s3://`) the file is one PUT (or one completed
multipart upload), which is atomic already. Temporary names are `.NAME.<12 hex>.tmp`: unique per writer, so
two writers of one file never share a temporary, and `stale_temps(path)` finds what killed writers left.

S3 requests are bounded (`S3_CONFIG`: 5 s to connect, 20 s to answer, 2 attempts, and no further s3fs retry
round), so a hung or unreachable endpoint fails in under a minute with `StorageTimeoutError` /
`StorageConnectionError` naming the endpoint, instead of botocore's and s3fs's retries multiplying to ~15
minutes. Raise them in storage_options: {"config_kwargs": {"read_timeout": 120, "retries":
{"total_max_attempts": 5}}, "retries": 3} (`retries`: s3fs's rounds of retries around botocore's).
"""

from __future__ import annotations

import errno
import glob
import io
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

__all__ = ["DiskFullError", "S3_CONFIG", "S3_RETRIES", "StorageConnectionError", "StorageError", "StorageTimeoutError",
           "atomic_write", "deadline", "filesystem", "read_bytes", "remote_errors", "stale_temps", "write_json"]

# botocore's client config for every S3 filesystem curate opens: a request that gets no answer fails after
# 2 × 20 s, not botocore's default 60 s × 5 attempts (times s3fs's 5 rounds: the ~15 minutes issue 13 measured)
S3_CONFIG = {"connect_timeout": 5, "read_timeout": 20, "retries": {"total_max_attempts": 2, "mode": "standard"}}
S3_RETRIES = 1  # s3fs's own rounds around botocore's attempts (its default, 5, multiplies them)
_TEMP = ".tmp"


class StorageError(OSError):
    """Remote storage (S3) could not be reached or did not answer; the message names the endpoint and the fix."""


class StorageTimeoutError(StorageError, TimeoutError):
    """The endpoint accepted the connection (or none came) but did not answer within the read/connect timeout."""


class StorageConnectionError(StorageError, ConnectionError):
    """The endpoint refused the connection or its name did not resolve."""


class DiskFullError(OSError):
    """A local write ran out of room: no space (ENOSPC), over quota (EDQUOT) or over a file size limit (EFBIG).

    `str()` is one line: what happened, where, and the usual fixes."""

    def __str__(self) -> str:
        return (f"{self.strerror}: free space there, or write elsewhere (a recipe's train.out); a file size limit "
                "comes from `ulimit -f` or the file system")


_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
         errno.EFBIG: "file too large for this file system or the file size limit"}


def _s3_options(storage_options: dict | None) -> dict:
    options = dict(storage_options or {})
    options["config_kwargs"] = {**S3_CONFIG, **options.get("config_kwargs", {})}
    return options


def filesystem(path: str, storage_options: dict | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path within it); on S3 with bounded timeouts and retries (`S3_CONFIG`, `S3_RETRIES`)
    unless storage_options' `config_kwargs` / `retries` set them."""
    import fsspec

    options = dict(storage_options or {})
    protocol = fsspec.utils.get_protocol(path)
    s3 = protocol in ("s3", "s3a")
    retries = options.pop("retries", S3_RETRIES)
    if s3:
        options = _s3_options(options)
    try:
        fs, inner = fsspec.core.url_to_fs(path, **options)
        if s3:
            fs.retries = retries  # a class attribute of s3fs, not an option: set on this (cached) instance
        return fs, inner
    except ImportError as error:  # fsspec names the package; say which extra has it
        extra = {"s3": "s3", "s3a": "s3"}.get(protocol)
        hint = f'pip install "curate[{extra}]"' if extra else f"install the fsspec backend for {protocol}://"
        raise ImportError(f"{path}: reading {protocol}:// paths needs an fsspec backend: {hint} ({error})") from error


def _endpoint(storage_options: dict | None) -> str:
    options = storage_options or {}
    return (options.get("endpoint_url") or options.get("client_kwargs", {}).get("endpoint_url")
            or "AWS S3 (the default endpoint)")


def _timeout_error(error: BaseException) -> bool:
    import asyncio

    names = {c.__name__ for c in type(error).__mro__}
    return isinstance(error, TimeoutError | asyncio.TimeoutError) or bool(names & {
        "ReadTimeoutError", "ConnectTimeoutError", "ServerTimeoutError", "FSTimeoutError"})


def _connection_error(error: BaseException) -> bool:
    names = {c.__name__ for c in type(error).__mro__}
    return bool(names & {"EndpointConnectionError", "ConnectionClosedError", "ClientConnectorError",
                         "ConnectionRefusedError", "ServerDisconnectedError"})


def _limits(storage_options: dict | None) -> tuple[float, float, int]:
    """(connect timeout, read timeout, botocore attempts) that S3 requests with these options run under."""
    config = _s3_options(storage_options)["config_kwargs"]
    retries = config.get("retries", {})
    attempts = int(retries.get("total_max_attempts", retries.get("max_attempts", 0) + 1))
    return float(config.get("connect_timeout", 60)), float(config.get("read_timeout", 60)), attempts


def deadline(storage_options: dict | None, nbytes: int = 0) -> float:
    """Seconds one S3 call may take in all: every attempt's connect and read timeouts, 2 s of backoff, and
    1 s per MB sent. botocore's read timeout alone does not end a PUT: aiohttp waits for the answer to its
    `Expect: 100-continue` without one, which left a write to a stopped endpoint hanging for good."""
    connect, read, attempts = _limits(storage_options)
    return attempts * (connect + read) + 2 + nbytes / 1e6


@contextmanager
def remote_errors(path: str, storage_options: dict | None = None, what: str = "reading") -> Iterator[None]:
    """Turns the timeouts and connection errors of S3 I/O on `path` into `StorageTimeoutError` /
    `StorageConnectionError` naming the endpoint, how long it waited and the options that change it."""
    try:
        yield
    except StorageError:
        raise
    except Exception as error:
        if not (_timeout_error(error) or _connection_error(error)) or "://" not in path:
            raise
        _, read, attempts = _limits(storage_options)
        waited = (f"{read:g} s ({attempts} attempts)" if "FSTimeoutError" not in type(error).__name__
                  else f"{deadline(storage_options):.0f} s")
        fix = ("check endpoint_url and the network, or raise the timeouts via storage_options={'config_kwargs': "
               "{'read_timeout': 120, 'retries': {'total_max_attempts': 5}}}")
        if _timeout_error(error):
            raise StorageTimeoutError(
                f"S3 endpoint {_endpoint(storage_options)} did not answer within {waited} {what} {path}: {fix} "
                f"({type(error).__name__})") from error
        raise StorageConnectionError(
            f"S3 endpoint {_endpoint(storage_options)} could not be reached {what} {path}: {fix} "
            f"({type(error).__name__}: {str(error)[:200]})") from error


def read_bytes(path: str | os.PathLike, storage_options: dict | None = None) -> bytes:
    """The bytes at a local path or fsspec URL; S3 failures as `StorageError` (see `remote_errors`)."""
    path = os.fspath(path)
    with remote_errors(path, storage_options):
        fs, inner = filesystem(path, storage_options)
        if "file" in fs.protocol:
            return fs.cat_file(inner)
        return fs.cat_file(inner, timeout=deadline(storage_options))  # fsspec's sync wrapper: a bound in all


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
        with remote_errors(os.fspath(path), storage_options, "writing"):
            data = value if isinstance(value, bytes) else value.encode()
            fs.pipe_file(target, data, timeout=deadline(storage_options, len(data)))
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
    except OSError as error:
        if error.errno in _FULL:
            raise DiskFullError(error.errno, f"{_FULL[error.errno]} writing {target}", target) from error
        raise
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def write_json(path: str | os.PathLike, value: Any, *, indent: int = 2, parents: bool = False) -> None:
    """`value` as JSON (and a final newline) at `path`, atomically."""
    with atomic_write(path, "w", parents=parents) as stream:
        json.dump(value, stream, indent=indent)
        stream.write("\n")
