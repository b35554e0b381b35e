"""Score caches under faults and hostile input (issue 13): provenance checked against what the run expects,
a checksum per part (single-bit flips never load different numbers), duplicate and non-string keys refused,
and `curate precompute` rescoring stale parts and sharing work between concurrent runs through claims."""

from __future__ import annotations

import random
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
    write_part,
)

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
