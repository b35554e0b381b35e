"""`curate precompute` and `curate inspect` on a small digits dataset: parts against the reference scored
online, rank splits, resume after a real SIGKILL, corrupt shards (fail / skip with a report), shards and cache
on a real S3 server (moto), and the Ray backend against the local one."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch
from torch.utils.data import default_collate

from curate.cache import ScoreCache, scan
from curate.scorers import score_model
from pipelines import data, tasks
from pipelines.cli import main
from pipelines.precompute import part_path, precompute, report_path
from pipelines.recipe import load_recipe
from pipelines.train_reference import train_reference

from .conftest import make_bucket

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "rho_loss.yaml"  # digits + small_cnn: per-example reference losses


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    data.make_digits(out, n_train=800, n_curated=200, n_test=200, shard_size=100)  # 8 train shards
    return out


def overrides(root, out: Path, **extra) -> list[str]:
    values = {"data.root": root, "train.out": out, "reference.path": out.parent / "reference",
              "cache.path": out / "cache", "reference.steps": 5, "reference.batch_size": 32, **extra}
    return [f"{key}={json.dumps(value) if isinstance(value, dict) else value}" for key, value in values.items()]


def cli_args(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory) -> Path:
    """A run directory whose parent holds the trained reference every test here shares."""
    out = tmp_path_factory.mktemp("runs") / "first"
    train_reference(load_recipe(RECIPE, overrides(digits, out)), log=lambda *_: None)
    return out


def run_dir(trained: Path, name: str) -> Path:
    return trained.parent / name  # a sibling: the same reference, its own cache and reports


def train_keys(root) -> dict[str, list[str]]:
    urls = data.shard_urls(root, "digits", "train")
    return {url: [s["__key__"] for s in data.load_digits([url])] for url in urls}


def parts(cache: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(cache.glob("part-*.parquet"))}


def test_parts_hold_the_reference_scores_of_every_key_once(digits, trained):
    out = run_dir(trained, "local")
    recipe = load_recipe(RECIPE, overrides(digits, out, **{"cache.batch_size": 64}))
    summary = precompute(recipe, log=lambda *_: None)
    assert summary["parts_written"] == 8 and summary["rows"] == 800 and summary["skipped"] == []
    assert json.loads(report_path(recipe).read_text()) == summary
    cache = ScoreCache.open(recipe.cache.path)
    assert cache.metadata["reference_hash"] and len(cache.parts) == 8
    # each part holds its shard's keys, scored exactly as the reference scores them online
    model, _ = tasks.load_model(recipe.reference_path, recipe, recipe.reference_model)
    scorer = tasks.scorer_for(recipe)
    for index, (url, keys) in enumerate(train_keys(digits).items()):
        part = pl.read_parquet(part_path(recipe, index))
        assert part["__key__"].to_list() == keys
        batch = default_collate([{k: v for k, v in s.items() if k != "noise"} for s in data.load_digits([url])])
        online = score_model(model, batch, scorer, 1024).loss
        torch.testing.assert_close(torch.tensor(part["ref_loss"].to_numpy()), online, rtol=1e-5, atol=1e-6)
    # a rerun finds every part and touches none
    before = parts(out / "cache")
    again = precompute(recipe, log=lambda *_: None)
    assert again["parts_existing"] == 8 and again["parts_written"] == 0 and parts(out / "cache") == before


def test_ranks_split_the_shards(digits, trained):
    out = run_dir(trained, "ranks")
    recipe = load_recipe(RECIPE, overrides(digits, out))
    summaries = [precompute(recipe, rank=r, world_size=3, log=lambda *_: None) for r in range(3)]
    assert [s["parts_written"] for s in summaries] == [3, 3, 2]
    assert all(report_path(recipe, r, 3).is_file() for r in range(3))
    assert sorted(parts(out / "cache")) == [f"part-{i:05d}.parquet" for i in range(8)]
    expected = sorted(key for keys in train_keys(digits).values() for key in keys)
    assert sorted(ScoreCache.open(recipe.cache.path).keys.to_list()) == expected
    with pytest.raises(ValueError, match=r"0 <= rank < world_size, got rank=3 world_size=3"):
        precompute(recipe, rank=3, world_size=3)


def test_inspect_prints_describe_and_writes_a_histogram(digits, trained, capsys):
    out = run_dir(trained, "local")  # written by the first test; made here when run alone
    recipe = load_recipe(RECIPE, overrides(digits, out))
    precompute(recipe, log=lambda *_: None)
    png = out / "hist.png"
    assert main(["inspect", recipe.cache.path, "--png", str(png)]) == 0
    printed = capsys.readouterr().out
    description = json.loads(printed[:printed.rindex("}") + 1])
    assert description["rows"] == 800 and description["parts"] == 8 and "ref_loss" in description["columns"]
    losses = ScoreCache.open(recipe.cache.path).ref_loss
    assert description["ref_loss_quantiles"]["1.0"] == pytest.approx(float(losses.max()))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_killed_mid_run_then_rerun_has_every_key_once(digits, trained):
    out = run_dir(trained, "killed")
    values = overrides(digits, out, **{"cache.batch_size": 25})
    cache = out / "cache"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "precompute", str(RECIPE), *cli_args(values)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not list(cache.glob("part-*.parquet")) and proc.poll() is None:
        assert time.time() < deadline, "precompute never wrote a part"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = parts(cache)
    assert 1 <= len(finished) < 8, f"the kill should land mid-run, found {len(finished)} parts"
    # what a kill inside write_part leaves: a half-written temp file next to the part it was writing
    todo = next(i for i in range(8) if f"part-{i:05d}.parquet" not in finished)
    (cache / f".part-{todo:05d}.parquet.0123abcd4567.tmp").write_bytes(b"PAR1 half a part")

    assert main(["precompute", str(RECIPE), *cli_args(values)]) == 0
    assert {name: parts(cache)[name] for name in finished} == finished  # finished parts are untouched
    assert sorted(p.name for p in cache.iterdir()) == [f"part-{i:05d}.parquet" for i in range(8)]  # no temps
    keys = scan(str(cache)).select("__key__").collect()["__key__"]
    assert keys.is_unique().all() and sorted(keys) == sorted(k for ks in train_keys(digits).values() for k in ks)


def corrupt_copy(digits: Path, dest: Path, index: int, how: str) -> tuple[str, list[str]]:
    """A copy of the dataset with train shard `index` truncated or overwritten; returns its url and keys."""
    shutil.copytree(digits, dest)
    url = data.shard_urls(dest, "digits", "train")[index]
    keys = [s["__key__"] for s in data.load_digits([url])]
    raw = Path(url).read_bytes()
    Path(url).write_bytes(raw[:len(raw) // 2] if how == "truncated" else os.urandom(len(raw)))
    return url, keys


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_shard_fails_naming_it_or_is_skipped_and_reported(digits, trained, tmp_path, capsys, how):
    url, keys = corrupt_copy(digits, tmp_path / "digits", 3, how)
    out = run_dir(trained, f"corrupt-{how}")
    args = ["precompute", str(RECIPE), *cli_args(overrides(tmp_path / "digits", out))]
    assert main(args) == 2  # on_error defaults to fail
    error = capsys.readouterr().err
    assert f"shard {url} cannot be read whole" in error and "--on-error skip" in error
    assert sorted(parts(out / "cache")) == [f"part-{i:05d}.parquet" for i in range(3)]  # whole parts only

    assert main([*args, "--on-error", "skip"]) == 0
    assert sorted(parts(out / "cache")) == [f"part-{i:05d}.parquet" for i in range(8) if i != 3]
    report = json.loads((out / "precompute_report.json").read_text())
    assert report["parts_written"] == 4 and report["parts_existing"] == 3 and report["shards_skipped"] == 1
    (skipped,) = report["skipped"]
    assert skipped["shard"] == url and skipped["index"] == 3
    read = skipped["keys_read"]
    if how == "truncated":  # the samples before the cut were read and are named, in order
        assert 0 < len(read) < len(keys) and read == keys[:len(read)], skipped["error"]
        assert "truncated" in skipped["error"]
    else:
        assert read == [] and skipped["error"].startswith("ValueError"), skipped["error"]
    cached = ScoreCache.open(str(out / "cache")).keys.to_list()
    assert len(cached) == 700 and not set(cached) & set(keys)  # nothing of the bad shard, nothing lost elsewhere


# --- S3: shards and cache through a real S3 server (moto) ---


@pytest.fixture(scope="module")
def s3(s3_server):
    return make_bucket(s3_server, "bucket"), s3_server


def test_shards_and_cache_on_s3(digits, tmp_path, s3):
    fs, options = s3
    for path in digits.rglob("*"):
        if path.is_file():  # same layout, so the manifest's relative shard paths stay valid
            fs.put_file(str(path), f"bucket/digits/{path.relative_to(digits).as_posix()}")
    s3_data = {"data.storage_options": options, "cache.path": "s3://bucket/cache"}
    recipe = load_recipe(RECIPE, overrides("s3://bucket/digits", tmp_path / "run", **s3_data))
    train_reference(recipe, log=lambda *_: None)  # reads the curated and test splits from S3
    summary = precompute(recipe, log=lambda *_: None)
    assert summary["parts_written"] == 8 and summary["rows"] == 800
    cache = ScoreCache.open("s3://bucket/cache", options)
    assert len(cache.parts) == 8
    assert sorted(cache.keys.to_list()) == sorted(k for ks in train_keys(digits).values() for k in ks)
    # shards on S3, cache on local disk (the same storage_options reach both): the same rows
    local = load_recipe(RECIPE, overrides("s3://bucket/digits", tmp_path / "run", **{
        **s3_data, "cache.path": tmp_path / "local"}))
    precompute(local, log=lambda *_: None)
    assert scan(local.cache.path).drop("file").collect().sort("__key__").equals(
        scan("s3://bucket/cache", options).drop("file").collect().sort("__key__"))  # Polars' own S3 reader
    fs.rm("bucket/cache/part-00005.parquet")  # resume on S3: only the missing part is written
    # and the claim a writer killed after writing part 2 left is cleared (the one listing finds dot-files too)
    fs.pipe_file("bucket/cache/.part-00002.parquet.claim", json.dumps(
        {"host": socket.gethostname(), "pid": 2 ** 22 + 1, "started": None, "token": "x"}).encode())
    again = precompute(recipe, log=lambda *_: None)
    assert again["parts_written"] == 1 and again["parts_existing"] == 7
    fs.invalidate_cache()
    assert not fs.exists("bucket/cache/.part-00002.parquet.claim")


# --- Ray Data backend ---


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_ray_backend_writes_the_same_rows_as_local(digits, trained, tmp_path):
    ray = pytest.importorskip("ray")
    url, _ = corrupt_copy(digits, tmp_path / "digits", 5, "truncated")  # also: skip works the same under Ray
    results = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        for backend in ("local", "ray"):
            recipe = load_recipe(RECIPE, overrides(tmp_path / "digits", run_dir(trained, f"ray-{backend}")))
            results[backend] = precompute(recipe, backend=backend, on_error="skip", actors=2, cpus_per_actor=0.5,
                                          log=lambda *_: None)
            results[backend]["frame"] = scan(recipe.cache.path).drop("file").collect().sort("__key__")
        recipe = load_recipe(RECIPE, overrides(tmp_path / "digits", run_dir(trained, "ray-fail")))
        with pytest.raises(RuntimeError, match=f"shard {url} cannot be read whole"):
            precompute(recipe, backend="ray", actors=2, cpus_per_actor=0.5)
    finally:
        ray.shutdown()
    local, remote = results["local"], results["ray"]
    assert remote["parts_written"] == local["parts_written"] == 7 and remote["rows"] == 700
    assert remote["frame"].equals(local["frame"]) and remote["frame"].height == 700
    assert remote["skipped"] == local["skipped"] and local["skipped"][0]["shard"] == url


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ray_is_optional_and_its_absence_says_how_to_install(digits, trained, monkeypatch):
    code = "import sys, pipelines.cli, pipelines.precompute; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    monkeypatch.setitem(sys.modules, "ray", None)  # what an install without the extra looks like
    recipe = load_recipe(RECIPE, overrides(digits, run_dir(trained, "no-ray")))
    with pytest.raises(ImportError, match=r'pip install "curate\[ray\]"'):
        precompute(recipe, backend="ray")
    assert not (run_dir(trained, "no-ray") / "cache").exists()
