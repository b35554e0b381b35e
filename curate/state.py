"""One pipeline state file per rank: `save_state(dir, pipe)` / `load_state(dir, pipe)`.

Frameworks that checkpoint a loader often keep only rank 0's state (Lightning, accelerate), so after a DDP
resume every rank would replay rank 0's stream: duplicate data. These write `dir/pipeline-rank{r}-of-{w}.pt`
for each rank, atomically (a killed save leaves the previous file whole), and read each rank's own back;
`Pipeline.load_state_dict` then refuses a state of another rank, world size or configuration. States are
plain data (positions, RNG states), saved with `torch.save` and read with `weights_only=True`: loading runs no
code from the file. `dir` is a local path or an fsspec URL (s3://, with `storage_options`).
"""

from __future__ import annotations

import io
import os
import posixpath
import re

import torch

from .files import atomic_write, filesystem, read_bytes
from .pipeline import Pipeline

__all__ = ["load_state", "save_state", "state_path"]

_NAME = re.compile(r"pipeline-rank(\d+)-of-(\d+)\.pt$")


def state_path(directory: str | os.PathLike, rank: int, world_size: int) -> str:
    """Where rank `rank` of `world_size` keeps its pipeline state in `directory`."""
    return posixpath.join(os.fspath(directory), f"pipeline-rank{rank:05d}-of-{world_size:05d}.pt")


def save_state(directory: str | os.PathLike, pipe: Pipeline, *, storage_options: dict | None = None) -> str:
    """Writes this rank's `pipe.state_dict()` to `state_path(directory, rank, world_size)`; returns the path.
    Every rank calls it (each writes its own file)."""
    path = state_path(directory, pipe.rank, pipe.world_size)
    buffer = io.BytesIO()
    torch.save(pipe.state_dict(), buffer)
    with atomic_write(path, parents=True, storage_options=storage_options) as stream:
        stream.write(buffer.getvalue())
    return path


def load_state(directory: str | os.PathLike, pipe: Pipeline, *, storage_options: dict | None = None) -> None:
    """Loads this rank's state from `directory` into `pipe` (the next `iter()` resumes it). Every rank calls it.

    Raises FileNotFoundError naming the ranks whose states are there when this rank's is not (e.g. a job resumed
    with another number of processes), and ValueError when the file holds another rank's or configuration's state.
    """
    path = state_path(directory, pipe.rank, pipe.world_size)
    try:
        data = read_bytes(path, storage_options)
    except FileNotFoundError:
        fs, root = filesystem(os.fspath(directory), storage_options)
        names = fs.glob(posixpath.join(root, "pipeline-rank*.pt")) if fs.exists(root) else []
        found = sorted(f"rank {int(m[1])} of {int(m[2])}" for name in names if (m := _NAME.search(name)))
        there = f"it holds the states of {', '.join(found)}" if found else "it holds no pipeline state"
        raise FileNotFoundError(f"load_state: no state for rank {pipe.rank} of {pipe.world_size} at {path} ({there}); "
                                "resume with the number of processes the states were saved with") from None
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    pipe.load_state_dict(state)
