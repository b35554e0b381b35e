"""ScoreCache: Parquet parts written and read locally and through a real S3 server (moto), lookups against a
dict, cached vs online reference scoring (same scores, same selections), and every kind of bad input."""

import os
import pickle
import socket
import time

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import default_collate

import curate
from curate.cache import (
    SCHEMA_VERSION,
    MissingKeysError,
    ScoreCache,
    model_hash,
    polars_storage_options,
    scan,
    write_part,
)
from curate.distributed import Shards
from curate.scorers import score_model

from .conftest import make_bucket, make_pairs, make_samples, tiny_clip

META = {"reference_hash": "ref0", "scorer": "ClassificationScorer", "dataset": "synthetic"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny forwards: with 2 OpenMP threads on a shared 2-core CPU each one can stall ~0.5 s at the barrier.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def losses_part(root, name, keys, seed=0, meta=META, **options):
    loss = torch.rand(len(keys), generator=torch.Generator().manual_seed(seed)) * 3
    write_part(f"{root}/{name}", keys, ref_loss=loss, metadata=meta, **options)
    return dict(zip(keys, loss.tolist(), strict=True))


def test_write_open_lookup_describe_and_scan(tmp_path):
    expected = losses_part(tmp_path, "part-00000.parquet", [f"a{i}" for i in range(50)], seed=1)
    expected |= losses_part(tmp_path, "part-00001.parquet", [f"b{i}" for i in range(30)], seed=2)
    cache = ScoreCache.open(str(tmp_path), expect={"reference_hash": "ref0"})
    assert len(cache) == 80 and len(cache.parts) == 2
    query = ["b3", "zz", "a49", "a0", "", "b29"]
    rows, found = cache.lookup(query)
    assert found.tolist() == [k in expected for k in query]
    assert (rows[~found] == -1).all()
    for key, row in zip(query, rows.tolist(), strict=True):
        if key in expected:
            assert cache.keys[row] == key and cache.ref_loss[row] == np.float32(expected[key])
    copy = pickle.loads(pickle.dumps(cache))  # as DataLoader workers would get it
    assert torch.equal(copy.lookup(query)[0], rows)

    info = cache.describe()
    assert info["rows"] == 80 and info["parts"] == 2 and set(info["columns"]) == {"__key__", "ref_loss"}
    assert info["metadata"]["schema_version"] == str(SCHEMA_VERSION)
    assert {k: info["metadata"][k] for k in META} == META and info["metadata"]["created_at"].startswith("20")
    values = np.array(list(expected.values()), dtype=np.float32)
    assert info["ref_loss_quantiles"][0.0] == values.min() and info["ref_loss_quantiles"][1.0] == values.max()

    frame = scan(str(tmp_path)).collect()  # Polars reads the parts on its own
    assert dict(zip(frame["__key__"], frame["ref_loss"], strict=True)) == pytest.approx(expected)
    assert set(frame["file"].unique()) == {str(tmp_path / "part-00000.parquet"), str(tmp_path / "part-00001.parquet")}
    metadata = pl.read_parquet_metadata(tmp_path / "part-00000.parquet")
    assert metadata["curate.reference_hash"] == "ref0" and metadata["curate.dataset"] == "synthetic"


@settings(max_examples=25, deadline=None)
@given(st.sets(st.text(min_size=1, max_size=12), min_size=1, max_size=300),
       st.lists(st.text(max_size=12), max_size=60), st.randoms(use_true_random=False))
def test_lookup_matches_a_dict(stored, others, rnd):
    keys = sorted(stored)
    rnd.shuffle(keys)
    cache = ScoreCache(pl.DataFrame({"__key__": keys, "ref_loss": np.arange(len(keys), dtype=np.float32)}), META)
    query = others + rnd.sample(keys, min(len(keys), 40))
    rows, found = cache.lookup(query)
    index = {k: i for i, k in enumerate(keys)}
    assert rows.tolist() == [index.get(k, -1) for k in query]
    assert found.tolist() == [k in index for k in query]


def test_lookup_at_scale_is_exact():
    # 200k keys: many directory buckets; every present key maps to its row and near-miss keys are absent
    n = 200_000
    keys = [f"shard-{i // 1000:04d}/sample-{i:07d}" for i in np.random.default_rng(0).permutation(n)]
    cache = ScoreCache(pl.DataFrame({"__key__": keys, "ref_loss": np.zeros(n, np.float32)}), META)
    rows, found = cache.lookup(keys)
    assert found.all() and torch.equal(rows, torch.arange(n))
    assert not cache.lookup([k + "x" for k in keys[:5000]])[1].any()


def embedding_parts(root, n_parts, rows, dim=8, emb_dtype="float32", seed=0):
    """n_parts parts as `curate precompute` names them (part i: shard i), with losses and unit embeddings;
    returns {key: (loss, image, text)} in float32 as given to write_part."""
    g = torch.Generator().manual_seed(seed)
    expected = {}
    for i in range(n_parts):
        keys = [f"shard-{i:03d}/sample-{j:04d}" for j in range(rows)]
        loss = torch.rand(rows, generator=g)
        image, text = (nn.functional.normalize(torch.randn(rows, dim, generator=g), dim=1) for _ in range(2))
        write_part(f"{root}/part-{i:05d}.parquet", keys, ref_loss=loss, image_emb=image, text_emb=text,
                   logit_scale=2.0, logit_bias=-1.0, metadata=META, emb_dtype=emb_dtype)
        expected |= {k: (loss[j], image[j], text[j]) for j, k in enumerate(keys)}
    return expected


def test_a_rank_loads_its_share_and_scores_like_the_full_cache(tmp_path):
    expected = embedding_parts(tmp_path, 6, 50)
    full = ScoreCache.open(str(tmp_path))
    world = 4
    for rank in range(world):
        # the shards curate.Shards gives this rank are the parts it loads: part i holds shard i
        shards = Shards([f"shard-{i:03d}.tar" for i in range(6)], lambda urls: [], rank=rank, world_size=world)
        share = ScoreCache.open(str(tmp_path), parts=range(rank, len(shards.all_urls), world))
        mine = [k for k in expected if f"{k.split('/')[0]}.tar" in shards.urls]
        assert sorted(share.keys.to_list()) == sorted(mine) and len(share.parts) == len(shards.urls)
        for scorer in (curate.ClassificationScorer(), curate.ContrastiveScorer(loss="sigmoid")):
            got, want = share.scores({"__key__": mine}, scorer), full.scores({"__key__": mine}, scorer)
            for name in ("loss", "image_emb", "text_emb"):
                if getattr(want, name) is not None:
                    assert torch.equal(getattr(got, name), getattr(want, name)), (rank, name)
        other = next(k for k in expected if k not in set(mine))
        message = rf"1 of 2 keys are not in the rows loaded .*opened with parts=\[{rank}[],].*\['{other}'\]; open it"
        with pytest.raises(MissingKeysError, match=message) as err:
            share.scores({"__key__": [mine[0], other]}, curate.ClassificationScorer())
        assert err.value.keys == [other] and err.value.count == 1 and isinstance(err.value, ValueError)

    wanted = list(expected)[::7]  # keys= keeps exactly these rows, from whichever parts hold them
    subset = ScoreCache.open(str(tmp_path), keys=iter(wanted))
    assert sorted(subset.keys.to_list()) == sorted(wanted) and "keys= (" in repr(subset)
    got, want = (c.scores({"__key__": wanted}, curate.ClassificationScorer()).loss for c in (subset, full))
    assert torch.equal(got, want)
    with pytest.raises(MissingKeysError, match=r"opened with keys= \(43 keys\)"):
        subset.scores({"__key__": list(expected)[1:2]}, curate.ClassificationScorer())
    assert len(ScoreCache.open(str(tmp_path), parts=[1, 5], keys=wanted)) == len(
        [k for k in wanted if k.startswith(("shard-001", "shard-005"))])
    by_name = ScoreCache.open(str(tmp_path), parts=lambda name: name.endswith("3.parquet"))
    assert set(by_name.keys.str.slice(0, 9).to_list()) == {"shard-003"}


def test_bad_part_selections_are_refused_naming_the_fix(tmp_path):
    embedding_parts(tmp_path, 3, 5)
    with pytest.raises(FileNotFoundError, match=r"no part-NNNNN.parquet for parts \[3, 7\] .*3 parts there"):
        ScoreCache.open(str(tmp_path), parts=[0, 3, 7])
    with pytest.raises(ValueError, match=r"parts= is empty.*rank < n_shards"):
        ScoreCache.open(str(tmp_path), parts=range(5, 3, 4))
    for bad in ("part-00000.parquet", [0.5], [-1], [True]):
        with pytest.raises(TypeError, match=r"part indices \(ints >= 0"):
            ScoreCache.open(str(tmp_path), parts=bad)
    with pytest.raises(FileNotFoundError, match="selects none of the 3 parts"):
        ScoreCache.open(str(tmp_path), parts=lambda name: False)
    with pytest.raises(ValueError, match=r"none of the 2 keys= are in the 3 parts"):
        ScoreCache.open(str(tmp_path), keys=["nope", "nada"])


def test_float16_parts_halve_the_embedding_bytes_and_select_like_float32(tmp_path):
    pairs = make_pairs(256, seed=8)
    reference, learner = tiny_clip("sigmoid", embed_dim=32, seed=1), tiny_clip("sigmoid", embed_dim=32, seed=2)
    scorer = curate.ContrastiveScorer(loss="sigmoid")
    emb = score_model(reference, default_collate(pairs), scorer, 64)
    caches = {}
    for dtype in ("float32", "float16"):
        write_part(str(tmp_path / dtype / "part-00000.parquet"), [p["__key__"] for p in pairs],
                   image_emb=emb.image_emb, text_emb=emb.text_emb, logit_scale=reference.logit_scale.item(),
                   logit_bias=reference.logit_bias.item(), metadata=META, emb_dtype=dtype)
        caches[dtype] = ScoreCache.open(str(tmp_path / dtype))
    sizes = {d: os.path.getsize(tmp_path / d / "part-00000.parquet") for d in caches}
    assert sizes["float16"] < 0.6 * sizes["float32"], sizes
    half, full = caches["float16"], caches["float32"]
    assert half.image_emb.dtype == np.float16 and half.describe()["columns"]["image_emb"] == "float16[32]"
    superbatch = default_collate(pairs[:64])
    a, b = half.scores(superbatch, scorer), full.scores(superbatch, scorer)
    assert a.image_emb.dtype == a.text_emb.dtype == torch.float32  # what the sampler gets
    assert torch.allclose(a.image_emb, b.image_emb, atol=1e-3) and torch.allclose(a.loss, b.loss, rtol=1e-2, atol=1e-3)
    # the same JEST run (same learner, data order and seeds) keeps nearly the same samples
    kept = {d: kept_keys(pairs, caches[d], learner, scorer, 64, "joint") for d in caches}
    overlap = len(set(kept["float16"]) & set(kept["float32"])) / len(kept["float32"])
    assert len(kept["float16"]) == len(kept["float32"]) > 0 and overlap >= 0.95, overlap
    with pytest.raises(ValueError, match=r"emb_dtype must be one of \['float32', 'float16'\]"):
        write_part(str(tmp_path / "x.parquet"), ["a"], ref_loss=[1.0], metadata=META, emb_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"image_emb is NaN/inf in float16 for keys \['a'\]"):
        write_part(str(tmp_path / "x.parquet"), ["a"], image_emb=[[7e4]], text_emb=[[1.0]], logit_scale=1.0,
                   metadata=META, emb_dtype="float16")
    write_part(str(tmp_path / "float16" / "part-00001.parquet"), ["z"], image_emb=[[1.0] * 32],
               text_emb=[[1.0] * 32], logit_scale=reference.logit_scale.item(),
               logit_bias=reference.logit_bias.item(), metadata=META)
    with pytest.raises(ValueError, match=r"part-00001.parquet has columns .*Float32.*Float16"):
        ScoreCache.open(str(tmp_path / "float16"))


def test_write_part_is_atomic_and_validates(tmp_path):
    (tmp_path / "part-00000.parquet").mkdir()  # the rename onto a directory fails after the data was written
    with pytest.raises(OSError):
        write_part(str(tmp_path / "part-00000.parquet"), ["a"], ref_loss=[1.0], metadata=META)
    assert os.listdir(tmp_path) == ["part-00000.parquet"]  # no temporary file left behind
    path = str(tmp_path / "part-00001.parquet")
    bad = [
        (dict(keys=["a", "a"], ref_loss=[1.0, 2.0]), "duplicate keys"),
        (dict(keys=["a", "b"], ref_loss=[1.0, float("nan")]), r"NaN/inf for keys \['b'\]"),
        (dict(keys=["a", "b"], ref_loss=[1.0]), r"shape \(2\)"),
        (dict(keys=["a"], image_emb=np.ones((1, 4))), "both image_emb and text_emb"),
        (dict(keys=["a"], image_emb=np.ones((1, 4)), text_emb=np.ones((1, 4))), "logit_scale"),
        (dict(keys=["a"], image_emb=np.ones((1, 4)), text_emb=np.ones((1, 3)), logit_scale=1.0), "same width"),
        (dict(keys=[], ref_loss=[]), "non-empty"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            write_part(path, metadata=META, **kwargs)
    with pytest.raises(ValueError, match="missing.*dataset"):
        write_part(path, ["a"], ref_loss=[1.0], metadata={"reference_hash": "r", "scorer": "s"})
    with pytest.raises(ValueError, match="must end in .parquet"):
        write_part(str(tmp_path / "part"), ["a"], ref_loss=[1.0], metadata=META)
    assert os.listdir(tmp_path) == ["part-00000.parquet"]


def test_bad_caches_are_refused_naming_the_file(tmp_path):
    losses_part(tmp_path, "part-00000.parquet", ["a", "b", "c"])
    losses_part(tmp_path, "part-00001.parquet", ["d", "c", "e", "a"])
    with pytest.raises(ValueError, match=r"2 keys appear more than once.*'a': \[.*part-00000.parquet', .*part-00001"):
        ScoreCache.open(str(tmp_path))
    os.remove(tmp_path / "part-00001.parquet")

    with pytest.raises(ValueError, match=r"written with reference_hash 'ref0' \(part .*part-00000.parquet\), but "
                                         r"'ref1' is expected.*curate precompute RECIPE"):
        ScoreCache.open(str(tmp_path), expect={"reference_hash": "ref1"})
    with pytest.raises(ValueError, match=r"schema version 2, expected 3; .*curate precompute RECIPE"):
        ScoreCache.open(str(tmp_path), expect_schema_version=3)
    losses_part(tmp_path, "part-00002.parquet", ["x"], meta={**META, "reference_hash": "other"})
    with pytest.raises(ValueError, match=r"disagree on reference_hash: 'ref0' in .*part-00000.*'other' in .*-00002"):
        ScoreCache.open(str(tmp_path))
    os.remove(tmp_path / "part-00002.parquet")

    good = (tmp_path / "part-00000.parquet").read_bytes()
    for corrupt in (b"not parquet at all", good[: len(good) // 2]):
        (tmp_path / "part-00003.parquet").write_bytes(corrupt)
        with pytest.raises(ValueError, match=r"part .*part-00003.parquet is damaged \(not a readable .*--overwrite"):
            ScoreCache.open(str(tmp_path))
    os.remove(tmp_path / "part-00003.parquet")
    pl.DataFrame({"__key__": ["q"], "ref_loss": [1.0]}).write_parquet(tmp_path / "foreign.parquet")
    with pytest.raises(ValueError, match="foreign.parquet has no curate.* metadata"):
        ScoreCache.open(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no \*\.parquet parts"):
        ScoreCache.open(str(tmp_path / "nowhere"))


def test_missing_keys_error_online_and_filter(tmp_path):
    samples = make_samples(40)
    reference = nn.Linear(8, 3)
    scorer = curate.ClassificationScorer()
    batch = default_collate(samples)
    online = score_model(reference, batch, scorer, micro_batch_size=1)
    cached_keys = batch["__key__"][:30]
    write_part(str(tmp_path / "part-00000.parquet"), cached_keys, ref_loss=online.loss[:30],
               metadata={**META, "reference_hash": model_hash(reference)})

    cache = ScoreCache.open(str(tmp_path))
    with pytest.raises(ValueError, match=r"10 of 40 keys are not in .*\['s00030', 's00031', .*curate precompute"):
        cache.scores(batch, scorer)

    cache = ScoreCache.open(str(tmp_path), missing="online", fallback=reference)
    mixed = cache.scores(batch, scorer, micro_batch_size=1)
    assert torch.equal(mixed.loss, online.loss) and cache.stats()["online"] == 10
    with pytest.raises(ValueError, match="fallback model hash .* differs"):
        ScoreCache.open(str(tmp_path), missing="online", fallback=nn.Linear(8, 3))
    with pytest.raises(ValueError, match="missing='online' needs fallback"):
        ScoreCache.open(str(tmp_path), missing="online")
    with pytest.raises(ValueError, match=r"filter them before it with cache.filter\(samples\)"):
        ScoreCache.open(str(tmp_path), missing="drop")

    cache = ScoreCache.open(str(tmp_path))
    kept = cache.filter(samples, chunk=7)
    assert [s["__key__"] for s in kept] == cached_keys and cache.stats()["dropped"] == 10
    assert [s["__key__"] for s in cache.filter([batch])] == cached_keys  # collated batches are split
    pipe = curate.pipeline(kept, batch_size=5, learner=nn.Linear(8, 3), reference=cache, scorer=scorer,
                           filter_ratio=0.5, method="topk", seed=1)  # re-iterates the filter: an epoch
    trained = [k for b in pipe for k in b["__key__"]]
    assert len(trained) == 15 and set(trained) <= set(cached_keys) and cache.stats()["dropped"] == 30


def test_scorer_and_cache_contents_must_match(tmp_path):
    write_part(str(tmp_path / "l" / "part-0.parquet"), ["a"], ref_loss=[1.0], metadata=META)
    write_part(str(tmp_path / "e" / "part-0.parquet"), ["a"], image_emb=np.ones((1, 2)), text_emb=np.ones((1, 2)),
               logit_scale=2.0, metadata=META)
    batch = {"__key__": ["a"]}
    with pytest.raises(ValueError, match="needs reference embeddings"):
        ScoreCache.open(str(tmp_path / "l")).scores(batch, curate.ContrastiveScorer(loss="softmax"))
    with pytest.raises(ValueError, match="holds embeddings, not per-example losses"):
        ScoreCache.open(str(tmp_path / "e")).scores(batch, curate.ClassificationScorer())
    with pytest.raises(ValueError, match="needs the reference's logit_bias"):
        ScoreCache.open(str(tmp_path / "e")).scores(batch, curate.ContrastiveScorer(loss="sigmoid"))
    softmax = ScoreCache.open(str(tmp_path / "e")).scores(batch, curate.ContrastiveScorer(loss="softmax"))
    assert softmax.scale == float(torch.tensor(2.0).exp()) and softmax.bias == 0.0


def test_model_hash_tracks_weights():
    a, b = nn.Linear(4, 2), nn.Linear(4, 2)
    b.load_state_dict(a.state_dict())
    assert model_hash(a) == model_hash(b) and len(model_hash(a)) == 16
    with torch.no_grad():
        b.bias[0] += 1e-6
    assert model_hash(a) != model_hash(b)


def kept_keys(source, reference, learner, scorer, micro_batch_size, method):
    pipe = curate.pipeline(source, batch_size=8, learner=learner, reference=reference, scorer=scorer,
                           filter_ratio=0.6, method=method, n_chunks=2, shuffle_buffer=32, seed=7,
                           micro_batch_size=micro_batch_size, count_flops=False)
    return [key for batch in pipe for key in batch["__key__"]]


@pytest.mark.parametrize("precompute_batch", [1, 64])
def test_cached_and_online_reference_select_the_same_classification(tmp_path, precompute_batch):
    samples = make_samples(120, seed=3)
    torch.manual_seed(0)
    reference, learner = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), nn.Linear(8, 3)
    scorer = curate.ClassificationScorer()
    for i in range(0, 120, 60):  # two parts, as two precompute ranks would write them
        batch = default_collate(samples[i:i + 60])
        loss = score_model(reference, batch, scorer, precompute_batch).loss
        write_part(str(tmp_path / f"part-{i:05d}.parquet"), batch["__key__"], ref_loss=loss,
                   metadata={**META, "reference_hash": model_hash(reference)})
    cache = ScoreCache.open(str(tmp_path), expect={"reference_hash": model_hash(reference)})

    # the same forward (micro-batches of 1 on both sides) gives bitwise-equal reference losses
    superbatch = default_collate(samples[5:45])
    online = score_model(reference, superbatch, scorer, 1).loss
    cached = cache.scores(superbatch, scorer).loss
    assert torch.equal(cached, online) if precompute_batch == 1 else torch.allclose(cached, online, atol=1e-6)
    micro = precompute_batch if precompute_batch == 1 else 1024
    for method in ("topk", "sample", "joint"):
        assert (kept_keys(samples, cache, learner, scorer, micro, method)
                == kept_keys(samples, reference, learner, scorer, micro, method))


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_cached_and_online_reference_select_the_same_contrastive(tmp_path, loss):
    pairs = make_pairs(96, seed=4)
    reference, learner = tiny_clip(loss, seed=1), tiny_clip(loss, seed=2)
    scorer = curate.ContrastiveScorer(loss=loss)
    batch = default_collate(pairs)
    emb = score_model(reference, batch, scorer, 1)
    write_part(str(tmp_path / "part-00000.parquet"), batch["__key__"], image_emb=emb.image_emb, text_emb=emb.text_emb,
               logit_scale=reference.logit_scale.item(),
               logit_bias=None if reference.logit_bias is None else reference.logit_bias.item(),
               metadata={**META, "reference_hash": model_hash(reference), "scorer": repr(scorer)})
    cache = ScoreCache.open(str(tmp_path), expect={"reference_hash": model_hash(reference)})

    superbatch = default_collate(pairs[10:50])
    online, cached = score_model(reference, superbatch, scorer, 1), cache.scores(superbatch, scorer)
    assert cached.kind == online.kind == loss and (cached.scale, cached.bias) == (online.scale, online.bias)
    assert torch.equal(cached.image_emb, online.image_emb) and torch.equal(cached.text_emb, online.text_emb)
    assert torch.equal(cached.loss, online.loss)
    assert kept_keys(pairs, cache, learner, scorer, 1, "joint") == kept_keys(pairs, reference, learner, scorer, 1,
                                                                             "joint")


# --- S3: a real server (moto) on 127.0.0.1, through s3fs and through Polars' object store ---


@pytest.fixture(scope="module")
def s3(s3_server):
    make_bucket(s3_server, "caches")
    return s3_server


def test_s3_cache_through_s3fs_and_polars(s3):
    url = "s3://caches/run1"
    expected = losses_part(url, "part-00000.parquet", [f"k{i}" for i in range(40)], seed=5, storage_options=s3)
    expected |= losses_part(url, "part-00001.parquet", [f"m{i}" for i in range(25)], seed=6, storage_options=s3)
    cache = ScoreCache.open(url, storage_options=s3, expect={"reference_hash": "ref0"})  # s3fs
    assert len(cache) == 65 and cache.parts == ["caches/run1/part-00000.parquet", "caches/run1/part-00001.parquet"]
    rows, found = cache.lookup(list(expected))
    assert found.all() and cache.ref_loss[rows.numpy()].tolist() == pytest.approx(list(expected.values()))
    share = ScoreCache.open(url, storage_options=s3, parts=[1])  # one rank's part: only it is fetched
    assert share.parts == ["caches/run1/part-00001.parquet"]
    assert sorted(share.keys) == sorted(f"m{i}" for i in range(25))

    frame = scan(url, storage_options=s3).collect()  # Polars' own object store, same endpoint
    assert dict(zip(frame["__key__"], frame["ref_loss"], strict=True)) == pytest.approx(expected)
    metadata = pl.read_parquet_metadata(f"{url}/part-00001.parquet", storage_options=polars_storage_options(s3))
    assert metadata["curate.reference_hash"] == "ref0" and metadata["curate.schema_version"] == str(SCHEMA_VERSION)

    import fsspec

    fs = fsspec.filesystem("s3", **s3)
    fs.pipe_file("caches/run1/part-00002.parquet", b"PAR1 truncated")
    with pytest.raises(ValueError, match=r"part caches/run1/part-00002.parquet is damaged \(not a readable Parquet"):
        ScoreCache.open(url, storage_options=s3)
    with pytest.raises(FileNotFoundError, match=r"no \*\.parquet parts"):
        ScoreCache.open("s3://caches/empty", storage_options=s3)


def test_unreachable_s3_fails_fast():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    start = time.perf_counter()
    with pytest.raises(OSError, match=r"cannot list s3://caches/run1 .*endpoint_url"):
        ScoreCache.open("s3://caches/run1", storage_options=options)
    with pytest.raises(Exception, match="(?i)connect"):
        scan("s3://caches/run1", storage_options=options).collect()
    assert time.perf_counter() - start < 30
