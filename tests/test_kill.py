"""`kill -9` at seeded random moments: a precompute rerun and a `curate run --resume` chain, each killed five
times, end bitwise equal to an uninterrupted run and leave no temporary files.

Each kill waits for a seeded random amount of progress (parts written, evaluations logged) plus a seeded random
delay, so the kills land at different points of the work: mid-shard, mid-write, mid-step, mid-checkpoint. The
process is killed with SIGKILL (no clean-up runs), then rerun / resumed; after the fifth kill the job runs to the
end. Its result is compared with an uninterrupted run's: every cached value, every model weight and every
metric (wall-clock seconds aside).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
import torch

from pipelines import data
from pipelines.recipe import load_recipe
from pipelines.train_reference import train_reference

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "rho_loss.yaml"  # digits + small_cnn: a per-example reference loss cache
KILLS = 5


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    data.make_digits(out, n_train=3200, n_curated=200, n_test=200, shard_size=100)  # 32 train shards
    return out


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory) -> Path:
    """The trained reference both jobs share (trained once, in this process)."""
    path = tmp_path_factory.mktemp("reference") / "reference"
    train_reference(load_recipe(RECIPE, _values(digits, path.parent / "unused", path)), log=lambda *_: None)
    return path


def _values(digits: Path, out: Path, reference: Path, **extra) -> list[str]:
    values = {"data.root": digits, "train.out": out, "reference.path": reference, "cache.path": out / "cache",
              "reference.steps": 5, "reference.batch_size": 32, "cache.batch_size": 25, **extra}
    return [f"{key}={value}" for key, value in values.items()]


def _cli(command: str, values: list[str], *extra: str) -> subprocess.Popen:
    # one torch thread, as in this process (conftest), so float reductions agree to the last bit
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    args = [arg for value in values for arg in ("--set", value)]
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", command, str(RECIPE), *args, *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"rc {proc.returncode}:\n{out[-3000:]}"


def _kill_when(proc: subprocess.Popen, progressed: Callable[[], bool], delay: float, timeout: float = 240) -> bool:
    """SIGKILL `proc` `delay` seconds after `progressed()` turns true; False if it finished first."""
    deadline = time.monotonic() + timeout
    while not progressed():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _cache_frame(cache: Path) -> pl.DataFrame:
    frames = [pl.read_parquet(part) for part in sorted(cache.glob("part-*.parquet"))]
    return pl.concat(frames).sort("__key__")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_precompute_killed_five_times_then_rerun_equals_an_uninterrupted_run(digits, reference, tmp_path):
    whole = tmp_path / "whole"
    _finish(_cli("precompute", _values(digits, whole, reference)))
    expected = _cache_frame(whole / "cache")
    assert expected.height == 3200

    rng = random.Random(13)
    killed = tmp_path / "killed"
    cache = killed / "cache"
    values = _values(digits, killed, reference)
    count = lambda: len(list(cache.glob("part-*.parquet")))  # noqa: E731
    kills = mid_parts = 0
    for target in sorted(rng.sample(range(0, 31), KILLS)):  # kill once `target` parts are whole, then a bit later
        delay = rng.uniform(0.0, 0.1)  # a part takes ~0.1 s here
        landed = _kill_when(_cli("precompute", values), lambda t=target: count() > t, delay)
        kills += landed
        mid_parts += landed and count() < 32
    # a kill after the last part lands in the report or the exit, which the rerun must survive too
    assert kills >= KILLS - 1 and mid_parts >= 3, f"{kills} of {KILLS} kills landed, {mid_parts} between parts"
    _finish(_cli("precompute", values))

    got = _cache_frame(cache)
    assert got.columns == expected.columns
    assert got.equals(expected), "the rerun's cache differs from the uninterrupted run's"
    assert _files(cache) == _files(whole / "cache"), "temporary or claim files were left behind"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_run_killed_five_times_then_resumed_equals_an_uninterrupted_run(digits, reference, tmp_path):
    extra = {"train.steps": 40, "train.eval_every": 4, "train.batch_size": 8, "selection.shuffle_buffer": 32}
    whole = tmp_path / "whole"
    _finish(_cli("run", _values(digits, whole, reference, **extra)))
    runs = sorted(json.loads((whole / "summary.json").read_text()))
    assert runs == ["learnability", "uniform"]

    rng = random.Random(7)
    killed = tmp_path / "killed"
    values = _values(digits, killed, reference, **extra)
    logged = lambda: sum(_lines(killed / run / "metrics.jsonl") for run in runs)  # noqa: E731
    kills = 0
    # 2 runs × 10 evaluations; kill once `target` are logged (a checkpoint is written with each), then a bit later
    for i, target in enumerate(sorted(rng.sample(range(0, 19), KILLS))):
        delay = rng.uniform(0.0, 0.5)
        proc = _cli("run", values, *(["--resume"] if i else []))
        kills += _kill_when(proc, lambda t=target: logged() > t, delay)
    assert kills >= KILLS - 1, f"only {kills} of {KILLS} kills landed mid-run"
    _finish(_cli("run", values, "--resume"))

    for run in runs:
        assert _metrics(killed / run) == _metrics(whole / run), f"{run}: the resumed metrics differ"
        a, b = (torch.load(d / run / "checkpoint.pt", weights_only=True) for d in (whole, killed))
        for name, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][name]), f"{run}: weight {name} differs after resume"
    assert _files(killed) - {"summary.json"} == _files(whole) - {"summary.json"}, "temporary files left behind"


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:  # wall clock
        record.pop("seconds")
        record["pipeline"].pop("score_seconds", None)
    return records
