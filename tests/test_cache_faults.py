"""Score caches under faults and hostile input (issue 13): provenance checked against what the run expects,
a checksum per part (single-bit flips never load different numbers), duplicate and non-string keys refused,
and `curate precompute` rescoring stale parts and sharing work between concurrent runs through claims."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import torch
from torch import nn

import curate
from curate.cache import (
    CorruptPartError,
    DuplicateKeysError,
    KeyTypeError,
    ProvenanceError,
    ScoreCache,
    part_metadata,
    scan,
    write_part,
)
from curate.distributed import Comm
from pipelines import data
from pipelines.cli import main
from pipelines.precompute import precompute
from pipelines.recipe import load_recipe
from pipelines.train import _reference
from pipelines.train_reference import train_reference

from .conftest import make_bucket

ROOT = Path(__file__).resolve().parent.parent
META = {"reference_hash": "ref0", "scorer": "ContrastiveScorer", "dataset": "digits/train:aaaa"}


def siglip_part(path: Path, rows: int = 200, dim: int = 8, seed: int = 0, **options) -> str:
    g = torch.Generator().manual_seed(seed)
    keys = [f"shard-000/sample-{i:04d}" for i in range(rows)]
    image, text = (nn.functional.normalize(torch.randn(rows, dim, generator=g), dim=1) for _ in range(2))
    return write_part(str(path), keys, ref_loss=torch.rand(rows, generator=g), image_emb=image, text_emb=text,
                      logit_scale=2.0, logit_bias=-1.0, metadata={**META, **options.pop("meta", {})}, **options)


# --- provenance: the run's expectations against what the cache records ---


def test_a_cache_of_another_reference_or_dataset_is_refused_naming_both(tmp_path):
    siglip_part(tmp_path / "part-00000.parquet")
    cache = ScoreCache.open(str(tmp_path), expect={"reference_hash": "ref0", "dataset": "digits/train:aaaa",
                                                   "kind": "sigmoid"})
    assert cache.metadata["kind"] == "sigmoid" and cache.metadata["checksum"].startswith("sha256:")
    for field, expected in (("reference_hash", "ref1"), ("dataset", "digits/train:bbbb"), ("kind", "softmax")):
        with pytest.raises(ProvenanceError, match=rf"written with {field} '{cache.metadata[field]}' \(part .*"
                                                  rf"part-00000.parquet\), but '{expected}' is expected.*"
                                                  r"Rerun `curate precompute RECIPE`") as err:
            ScoreCache.open(str(tmp_path), expect={field: expected})
        assert (err.value.field, err.value.found, err.value.expected) == (field, cache.metadata[field], expected)
    with pytest.raises(ValueError, match=r"expect= checks .*got \['colour'\]"):
        ScoreCache.open(str(tmp_path), expect={"colour": "red"})


def test_a_siglip_cache_is_refused_by_a_softmax_scorer(tmp_path):
    siglip_part(tmp_path / "siglip" / "part-00000.parquet")
    batch = {"__key__": ["shard-000/sample-0001"]}
    siglip = ScoreCache.open(str(tmp_path / "siglip"))
    assert siglip.scores(batch, curate.ContrastiveScorer(loss="sigmoid")).bias == -1.0
    with pytest.raises(ProvenanceError, match=r"holds sigmoid \(SigLIP\) embeddings .*scorer is 'softmax'.*"
                                              r"loss='sigmoid'"):
        siglip.scores(batch, curate.ContrastiveScorer(loss="softmax"))
    # a softmax (CLIP) cache of a SigLIP model: written with kind="softmax", refused by a sigmoid scorer
    siglip_part(tmp_path / "clip" / "part-00000.parquet", kind="softmax")
    clip = ScoreCache.open(str(tmp_path / "clip"))
    assert clip.scores(batch, curate.ContrastiveScorer(loss="softmax")).bias == 0.0
    with pytest.raises(ProvenanceError, match=r"holds softmax \(CLIP\) embeddings"):
        clip.scores(batch, curate.ContrastiveScorer(loss="sigmoid"))
    with pytest.raises(ValueError, match=r"kind must be one of .*got kind='example'"):
        siglip_part(tmp_path / "x" / "part-00000.parquet", kind="example")  # it has embeddings


# --- checksums: a flipped bit never loads silently different numbers ---


def loaded(path: str) -> dict:
    cache = ScoreCache.open(path)
    return {"keys": cache.keys.to_list(), "metadata": cache.metadata,
            **{name: getattr(cache, name).tobytes() for name in ("ref_loss", "image_emb", "text_emb")}}


@pytest.mark.parametrize("emb_dtype", ["float32", "float16"])
def test_single_bit_flips_are_refused_or_change_nothing_read(tmp_path, emb_dtype):
    part = Path(siglip_part(tmp_path / "good" / "part-00000.parquet", emb_dtype=emb_dtype))
    original, good = loaded(str(part.parent)), part.read_bytes()
    flipped = tmp_path / "flipped" / "part-00000.parquet"
    flipped.parent.mkdir()
    rng = random.Random(13)
    outcomes = {"refused": 0, "unchanged": 0}
    for trial in range(40):
        position, bit = rng.randrange(len(good)), rng.randrange(8)
        raw = bytearray(good)
        raw[position] ^= 1 << bit
        flipped.write_bytes(bytes(raw))
        try:
            got = loaded(str(flipped.parent))
        except CorruptPartError as err:
            assert err.part == str(flipped) and "--overwrite" in str(err) and "curate precompute" in str(err)
            outcomes["refused"] += 1
            continue
        assert got == original, f"trial {trial}: bit {bit} of byte {position}/{len(good)} loaded other data"
        outcomes["unchanged"] += 1
    assert outcomes["refused"] >= 30, outcomes  # most bytes of a part are its data


def test_a_part_without_its_checksum_or_with_a_wrong_one_is_refused(tmp_path):
    path = siglip_part(tmp_path / "part-00000.parquet")
    frame, meta = pl.read_parquet(path), pl.read_parquet_metadata(path)
    tampered = frame.with_columns(pl.col("ref_loss") * 2)  # rewritten whole: a valid Parquet file, other numbers
    tampered.write_parquet(path, metadata={k: v for k, v in meta.items() if k.startswith("curate.")})
    with pytest.raises(CorruptPartError, match=r"part .*part-00000.parquet is damaged \(its contents hash to"):
        ScoreCache.open(str(tmp_path))
    frame.write_parquet(path, metadata={k: v for k, v in meta.items()
                                        if k.startswith("curate.") and k != "curate.checksum"})
    with pytest.raises(CorruptPartError, match=r"no curate.checksum"):
        ScoreCache.open(str(tmp_path))
    assert part_metadata(path)["reference_hash"] == "ref0"  # the footer alone, without verifying


# --- keys: duplicates in a superbatch, non-strings ---


def test_duplicate_keys_in_a_superbatch_are_refused_naming_them(tmp_path):
    siglip_part(tmp_path / "part-00000.parquet")
    cache = ScoreCache.open(str(tmp_path))
    keys = [f"shard-000/sample-{i:04d}" for i in (3, 4, 3, 5, 4, 3)]
    with pytest.raises(DuplicateKeysError, match=r"__key__ \['shard-000/sample-0003', 'shard-000/sample-0004'\] "
                                                 r"more than once \(3 repeats in 6 keys\)") as err:
        cache.scores({"__key__": keys}, curate.ContrastiveScorer())
    assert err.value.keys == ["shard-000/sample-0003", "shard-000/sample-0004"]
    # through a pipeline: a source whose samples share keys stops at the first superbatch
    samples = [{"__key__": f"shard-000/sample-{i % 15:04d}", "image": torch.zeros(3, 8, 8),
                "text": torch.zeros(6, dtype=torch.long)} for i in range(100)]
    pipe = curate.pipeline(samples, batch_size=10, learner=None, reference=cache, rule="easy_reference",
                           scorer=curate.ContrastiveScorer(), filter_ratio=0.5, method="topk", seed=0,
                           shuffle_buffer=0)
    with pytest.raises(DuplicateKeysError):
        next(iter(pipe))


def test_keys_that_are_not_strings_are_refused(tmp_path):
    siglip_part(tmp_path / "part-00000.parquet")
    cache = ScoreCache.open(str(tmp_path))
    scorer = curate.ContrastiveScorer()
    for keys, shown in (([1, 2], "Int64"), (torch.tensor([1, 2]), "Tensor of torch.int64"), ([None], "None")):
        with pytest.raises(KeyTypeError, match=rf"__key__ values must be strings.*{shown}|{shown}.*__key__"):
            cache.scores({"__key__": keys}, scorer)
        with pytest.raises(TypeError):
            cache.lookup(keys)


# --- curate precompute and curate run against the cache's provenance ---

RECIPE = ROOT / "recipes" / "rho_loss.yaml"  # digits + small_cnn: per-example reference losses
QUIET = {"log": lambda *_: None}


def overrides(root, out: Path, reference: Path, **extra) -> list[str]:
    values = {"data.root": root, "train.out": out, "reference.path": reference, "cache.path": out / "cache",
              "reference.steps": 5, "reference.batch_size": 32, **extra}
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Two digits datasets with the same key names (seeds 0 and 1, 8 train shards each) and two references."""
    root = tmp_path_factory.mktemp("faults")
    for seed in (0, 1):
        data.make_digits(root / f"digits{seed}", seed=seed, n_train=800, n_curated=200, n_test=200, shard_size=100)
    for steps in (5, 6):
        recipe = load_recipe(RECIPE, overrides(root / "digits0", root / "x", root / f"ref{steps}",
                                               **{"reference.steps": steps}))
        train_reference(recipe, **QUIET)
    return {"root": root, "data": [root / "digits0", root / "digits1"], "refs": [root / "ref5", root / "ref6"]}


def recipe_of(world: dict, name: str, data_index: int = 0, ref_index: int = 0, **extra):
    return load_recipe(RECIPE, overrides(world["data"][data_index], world["root"] / name, world["refs"][ref_index],
                                         **extra))


def frame(recipe) -> pl.DataFrame:
    return scan(recipe.cache.path).drop("file").collect().sort("__key__")


def run_reference(recipe):
    return _reference(recipe, torch.device("cpu"), Comm(0, 1))


def test_a_retrained_reference_is_refused_by_the_run_and_rescored_by_precompute(world):
    old = recipe_of(world, "retrained")
    assert precompute(old, **QUIET)["parts_written"] == 8
    assert isinstance(run_reference(old), ScoreCache)
    new = recipe_of(world, "retrained", ref_index=1)  # the reference retrained: same cache path, other weights
    old_hash, new_hash = (json.loads((r / "model.json").read_text())["hash"] for r in world["refs"])
    with pytest.raises(ProvenanceError, match=rf"reference_hash '{old_hash}' .*but '{new_hash}' is expected.*"
                                              r"Rerun `curate precompute RECIPE`"):
        run_reference(new)
    summary = precompute(new, **QUIET)  # the advice works: every part is rescored, none is "already there"
    assert summary["parts_rescored"] == summary["parts_written"] == 8 and summary["parts_existing"] == 0
    assert run_reference(new).metadata["reference_hash"] == new_hash
    assert precompute(new, **QUIET)["parts_existing"] == 8  # and now they are current


def test_mixed_parts_are_refused_and_precompute_rescores_only_the_odd_ones(world):
    good, other = recipe_of(world, "mixed"), recipe_of(world, "mixed-other", ref_index=1)
    precompute(good, **QUIET)
    precompute(other, **QUIET)
    expected, cache = frame(good), Path(good.cache.path)
    for index in (2, 5):  # parts of another reference among this cache's
        shutil.copy(Path(other.cache.path) / f"part-{index:05d}.parquet", cache / f"part-{index:05d}.parquet")
    with pytest.raises(ValueError, match=r"parts disagree on reference_hash.*rerun `curate precompute RECIPE`.*"
                                         r"rescores the parts made with another reference"):
        ScoreCache.open(str(cache))
    summary = precompute(good, **QUIET)
    assert summary["parts_rescored"] == 2 and summary["written"] == [2, 5] and summary["parts_existing"] == 6
    assert frame(good).equals(expected)


def test_a_cache_of_other_data_with_the_same_keys_is_refused(world):
    first = recipe_of(world, "foreign")
    precompute(first, **QUIET)
    other_data = recipe_of(world, "foreign", data_index=1)  # seed 1: the same key names, other samples
    assert sorted(ScoreCache.open(first.cache.path).keys.to_list()) == sorted(
        s["__key__"] for s in data.load_digits(data.shard_urls(world["data"][1], "digits", "train")))
    with pytest.raises(ProvenanceError, match=r"dataset 'digits/train:\w{16}' .*but 'digits/train:\w{16}' is "
                                              r"expected: the cache was made for other data") as err:
        run_reference(other_data)
    assert err.value.found != err.value.expected
    assert precompute(other_data, **QUIET)["parts_rescored"] == 8
    assert run_reference(other_data).metadata["dataset"] == err.value.expected


def test_overwrite_rescores_every_part_and_mends_a_damaged_one(world, capsys):
    recipe = recipe_of(world, "overwrite")
    precompute(recipe, **QUIET)
    expected, part = frame(recipe), Path(recipe.cache.path) / "part-00004.parquet"
    raw = bytearray(part.read_bytes())
    raw[len(raw) // 3] ^= 0x10  # a flipped bit inside the data
    part.write_bytes(bytes(raw))
    with pytest.raises(CorruptPartError, match=r"part-00004.parquet is damaged.*--overwrite"):
        ScoreCache.open(recipe.cache.path)
    args = ["precompute", str(RECIPE), *[a for v in overrides(world["data"][0], world["root"] / "overwrite",
                                                              world["refs"][0]) for a in ("--set", v)]]
    assert main([*args, "--overwrite"]) == 0
    assert "8 parts written" in capsys.readouterr().out
    assert frame(recipe).equals(expected) and len(ScoreCache.open(recipe.cache.path)) == 800
    assert precompute(recipe, **QUIET)["parts_written"] == 0  # the next run without --overwrite keeps them


# --- concurrency: claims ---


def cli(world: dict, name: str, *extra: str, **values) -> list[str]:
    sets = overrides(world["data"][0], world["root"] / name, world["refs"][0], **values)
    return [sys.executable, "-m", "pipelines.cli", "precompute", str(RECIPE),
            *[a for v in sets for a in ("--set", v)], *extra]


def hold_claim(part: Path) -> subprocess.Popen:
    """A real process holding the claim on `part` (as a precompute scoring it does) until it is killed."""
    code = ("import sys, time, fsspec; from pipelines.claims import Claims\n"
            "with Claims(fsspec.filesystem('file'), 600, print) as claims:\n"
            f"    assert claims.acquire({str(part)!r}); print('held', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_live_claim_and_its_temp_file_are_left_alone_and_a_dead_ones_taken_over(world):
    recipe = recipe_of(world, "claimed")
    cache = Path(recipe.cache.path)
    cache.mkdir(parents=True)
    part = cache / "part-00003.parquet"
    holder = hold_claim(part)
    temp = cache / ".part-00003.parquet.0123456789ab.tmp"  # what the holder would be writing
    temp.write_bytes(b"PAR1 half a part")
    try:
        summary = precompute(recipe, **QUIET)
        assert summary["claimed_elsewhere"] == [3] and summary["parts_written"] == 7
        assert temp.exists() and not part.exists()  # the live writer's temp file is untouched
    finally:
        holder.kill()
        holder.wait()
    messages: list[str] = []
    summary = precompute(recipe, log=messages.append)  # its owner is dead: taken over at once
    assert summary["written"] == [3] and summary["parts_existing"] == 7
    assert any("took over .part-00003.parquet.claim from pid" in m and "not running" in m for m in messages)
    assert sorted(p.name for p in cache.iterdir()) == [f"part-{i:05d}.parquet" for i in range(8)]  # no temps


@pytest.mark.timeout(120)
def test_a_dead_writers_claim_on_a_whole_part_is_cleared_and_a_live_one_left(world):
    """A writer killed after its part's rename and before its claim's release leaves the claim of a whole part,
    which no run would claim again (the part is current): the next run clears it, unless its owner is live."""
    recipe = recipe_of(world, "claim-after-part")
    cache = Path(recipe.cache.path)
    assert precompute(recipe, **QUIET)["parts_written"] == 8
    dead = cache / ".part-00002.parquet.claim"
    dead.write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 1, "started": None, "token": "x"}))
    holder = hold_claim(cache / "part-00005.parquet")
    try:
        summary = precompute(recipe, **QUIET)
        assert summary["parts_written"] == 0 and summary["parts_existing"] == 8  # nothing rescored
        assert not dead.exists() and (cache / ".part-00005.parquet.claim").exists()
    finally:
        holder.kill()
        holder.wait()


def test_what_a_writer_killed_while_claiming_leaves_is_taken_over_and_removed(world):
    """A kill inside a claim's creation: before the atomic create, an empty claim file (an O_EXCL create killed
    before its write did that, and the rerun left the shard as "being written by another run" for 10 minutes);
    now a claim temp that was never linked. Neither may hold a shard or outlive the rerun."""
    recipe = recipe_of(world, "killed-claiming")
    cache = Path(recipe.cache.path)
    cache.mkdir(parents=True)
    (cache / ".part-00001.parquet.claim").write_bytes(b"")  # fresh (age 0), owner unknown
    (cache / "..part-00004.parquet.claim.0123456789ab.tmp").write_bytes(b'{"host": "h", "pi')
    messages: list[str] = []
    summary = precompute(recipe, log=messages.append)
    assert summary["parts_written"] == 8 and summary["claimed_elsewhere"] == []
    assert any("took over .part-00001.parquet.claim from an unknown process (damaged)" in m for m in messages)
    assert sorted(p.name for p in cache.iterdir()) == [f"part-{i:05d}.parquet" for i in range(8)]  # no leftovers


def test_local_claims_are_never_seen_half_written(tmp_path):
    """The claim appears with its whole payload, by a link of a finished temp, and no temp stays behind."""
    import fsspec

    from pipelines.claims import Claims

    part = tmp_path / "cache" / "part-00000.parquet"
    seen: list[bytes] = []
    real_link = os.link

    def link_then_look(source, target):  # the moment the claim's name exists, read it as another process would
        real_link(source, target)
        seen.append(Path(target).read_bytes())

    with Claims(fsspec.filesystem("file"), 600, print) as claims, pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "link", link_then_look)
        assert claims.acquire(str(part))
        assert not Claims(fsspec.filesystem("file"), 600, print).acquire(str(part))  # exclusive
    assert len(seen) == 1 and json.loads(seen[0])["pid"] == os.getpid()
    assert list((tmp_path / "cache").iterdir()) == []  # released, and the temps gone


def test_a_claim_not_refreshed_for_the_timeout_is_taken_over(world):
    recipe = recipe_of(world, "stale-claim")
    cache = Path(recipe.cache.path)
    cache.mkdir(parents=True)
    claim = cache / ".part-00001.parquet.claim"  # a run on another host that stopped refreshing its claim
    claim.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": None, "token": "x"}))
    assert precompute(recipe, claim_timeout_s=60, **QUIET)["claimed_elsewhere"] == [1]  # fresh: left alone
    os.utime(claim, (time.time() - 120, time.time() - 120))
    messages: list[str] = []
    assert precompute(recipe, claim_timeout_s=60, log=messages.append)["written"] == [1]
    assert any("from pid 1 on elsewhere (not refreshed for 12" in m for m in messages), messages
    assert not claim.exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_concurrent_precomputes_score_every_shard_once(world, tmp_path):
    data.make_digits(tmp_path / "digits", n_train=800, n_curated=200, n_test=200, shard_size=25)  # 32 shards
    world = {**world, "data": [tmp_path / "digits"]}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    runs = [subprocess.Popen(cli(world, "concurrent", **{"cache.batch_size": 10}), cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=150)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    written = [int(re.search(r"precompute: (\d+) parts written", out).group(1)) for out in outputs]
    recipe = recipe_of(world, "concurrent")
    writers = Counter(part_metadata(str(p))["writer"].split(":")[1] for p in Path(recipe.cache.path).glob("*.parquet"))
    assert sum(written) == 32 and sum(writers.values()) == 32, (written, writers)  # no shard scored twice
    assert sorted(writers.values()) == sorted(n for n in written if n), (written, writers)
    assert sorted(p.name for p in Path(recipe.cache.path).iterdir()) == [f"part-{i:05d}.parquet" for i in range(32)]
    single = recipe_of(world, "single")
    precompute(single, **QUIET)
    assert frame(recipe).equals(frame(single))
    print(f"parts written by the two runs: {written}")


def test_claims_on_s3_are_exclusive_and_a_stale_one_is_taken_over_once(s3_server):
    from pipelines.claims import Claims

    fs = make_bucket(s3_server, "claims")
    part = "claims/cache/part-00000.parquet"
    # 3 s: a loaded 2-core machine once took over 1 s between the first two acquires, so the claim read as stale
    first = Claims(fs, timeout_s=3.0, log=lambda *_: None)  # not entered: no heartbeat, so its claim goes stale
    second, third = (Claims(fs, timeout_s=3.0, log=lambda *_: None) for _ in range(2))
    assert first.acquire(part) and not second.acquire(part)  # If-None-Match: one creator wins
    owner, _, stale_etag = second._read(Claims.path(part))
    assert owner["token"] == first.owner["token"]
    time.sleep(3.5)
    assert second.acquire(part)  # stale: replaced with If-Match on the stale claim's ETag
    assert not third._take_over(Claims.path(part), owner, stale_etag)  # a second taker of the same stale claim loses
    first.release(part)  # no longer its claim: left alone
    assert json.loads(fs.cat_file(Claims.path(part)))["token"] == second.owner["token"]
    second.release(part)
    assert not fs.exists(Claims.path(part))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_working_owner_keeps_its_claim_fresh(where, tmp_path, request):
    """The heartbeat: a claim held longer than the timeout by a live owner is not taken over."""
    import fsspec

    from pipelines.claims import Claims

    if where == "s3":
        fs, part = make_bucket(request.getfixturevalue("s3_server"), "beats"), "beats/cache/part-00000.parquet"
    else:
        fs, part = fsspec.filesystem("file"), str(tmp_path / "part-00000.parquet")
    other = Claims(fs, timeout_s=2.0, log=lambda *_: None)
    with Claims(fs, timeout_s=2.0, log=lambda *_: None) as owner:
        assert owner.acquire(part)
        time.sleep(3.0)  # past the timeout: only the heartbeat (every 0.5 s) keeps it fresh
        found = other._read(Claims.path(part))
        assert found is not None and found[1] < 2.0 and not other.acquire(part), found
    assert other.acquire(part)  # released on exit
    other.release(part)
