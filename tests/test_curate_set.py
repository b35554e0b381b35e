"""`curate curate-set`: a cache with planted near-duplicates (every copy found, nothing else removed, balance
caps every cluster), the report's counts and histogram, and end to end: precomputed reference embeddings →
curated keys → `curate.pipeline(keep_keys=...)` trains only on them."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import curate
from curate.cache import ScoreCache, write_part
from curate.curation import read_keys
from pipelines import data
from pipelines.cli import main
from pipelines.curate_set import curate_set
from pipelines.precompute import precompute
from pipelines.recipe import load_recipe
from pipelines.train_reference import train_reference

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart.yaml"  # digit pairs + tiny_clip: a cache of reference embeddings
N, COPIES = 300, 40


def planted_cache(path: Path, seed: int = 0) -> dict[str, str]:
    """N random unit vectors in 32-d (pairwise cosine far below 0.95) and COPIES noisy copies (cosine ≈ 0.998)
    of distinct originals, under later keys, written as a two-part cache; returns {copy key: original key}."""
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((N + COPIES, 32)).astype(np.float32)
    originals = rng.choice(N, COPIES, replace=False)
    image[N:] = image[originals] + 0.01 * rng.standard_normal((COPIES, 32)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text = rng.standard_normal((N + COPIES, 32)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    keys = [f"s{i:05d}" for i in range(N + COPIES)]
    order = rng.permutation(N + COPIES)  # copies spread over both parts
    meta = {"reference_hash": "planted", "scorer": "test", "dataset": "planted"}
    for part, rows in enumerate(np.array_split(order, 2)):
        write_part(str(path / f"part-{part:05d}.parquet"), [keys[i] for i in rows], image_emb=image[rows],
                   text_emb=text[rows], logit_scale=2.3, logit_bias=-10.0, metadata=meta)
    return {keys[N + j]: keys[i] for j, i in enumerate(originals)}


def test_planted_duplicates_removed_and_clusters_capped(tmp_path, capsys):
    planted = planted_cache(tmp_path / "cache")
    args = ["curate-set", str(RECIPE), "--set", f"cache.path={tmp_path / 'cache'}", "--set", f"train.out={tmp_path}",
            "--threshold", "0.95", "--per-cluster", "12"]
    assert main(args) == 0
    assert "curate-set: kept" in capsys.readouterr().out
    report = json.loads((tmp_path / "curate_set_report.json").read_text())
    decisions = pl.read_parquet(tmp_path / "curate_set_decisions.parquet")
    assert report["input"] == decisions.height == N + COPIES and report["n_clusters"] == round((N + COPIES) ** 0.5)
    # every copy, and only the copies, removed as a duplicate of its original
    duplicates = decisions.filter(pl.col("reason") == "duplicate")
    assert dict(zip(duplicates["__key__"], duplicates["duplicate_of"], strict=True)) == planted
    assert (duplicates["similarity"] > 0.99).all() and report["removed"]["duplicate"] == COPIES
    # balance: each cluster keeps min(its deduplicated size, 12)
    per_cluster = decisions.group_by("cluster").agg(deduped=(pl.col("reason") != "duplicate").sum(),
                                                    kept=pl.col("kept").sum())
    assert (per_cluster["kept"] == per_cluster["deduped"].clip(upper_bound=12)).all()
    assert per_cluster["deduped"].max() > 12, "the cap should bind somewhere for this test to mean anything"
    balanced = decisions.filter(pl.col("reason") == "balance").height
    assert report["removed"]["balance"] == balanced > 0
    assert report["kept"] + COPIES + balanced == N + COPIES
    kept = read_keys(tmp_path / "curated_keys.parquet")
    assert kept == sorted(decisions.filter("kept")["__key__"]) and len(kept) == report["kept"]
    meta = json.loads(pl.read_parquet_metadata(tmp_path / "curated_keys.parquet")["curate.curate_set"])
    assert meta["threshold"] == 0.95 and meta["per_cluster"] == 12 and meta["reference_hash"] == "planted"
    assert report["cluster_sizes"]["curated"]["max"] <= 12
    png = tmp_path / "cluster_sizes.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_without_cap_and_on_text_or_both_embeddings(tmp_path):
    planted = planted_cache(tmp_path / "cache")
    recipe = load_recipe(RECIPE, [f"cache.path={tmp_path / 'cache'}", f"train.out={tmp_path}"])
    report = curate_set(recipe, embedding="text", n_clusters=4, log=lambda *_: None)
    # the text vectors were not copied: no duplicates there, and no cap: everything is kept
    assert report["removed"] == {"misaligned": 0, "duplicate": 0, "balance": 0} and report["kept"] == N + COPIES
    # "both": cosine is the mean of the image (≈ 0.998 for copies) and text cosines; brute force says which
    # copies reach 0.6 (no two unrelated rows come near: their mean cosines stay below 0.55 here)
    report = curate_set(recipe, embedding="both", threshold=0.6, out=tmp_path / "both", log=lambda *_: None)
    cache = ScoreCache.open(recipe.cache.path)
    row = {key: i for i, key in enumerate(cache.keys)}
    joint = {copy: (cache.image_emb[row[copy]] @ cache.image_emb[row[original]]
                    + cache.text_emb[row[copy]] @ cache.text_emb[row[original]]) / 2
             for copy, original in planted.items()}
    decisions = pl.read_parquet(report["decisions"])
    cluster = dict(zip(decisions["__key__"], decisions["cluster"], strict=True))
    expected = {c for c, cos in joint.items() if cos >= 0.6 and cluster[c] == cluster[planted[c]]}  # SemDeDup
    removed = set(decisions.filter(pl.col("reason") == "duplicate")["__key__"])
    assert removed == expected and 0 < len(expected) < COPIES


def test_the_least_aligned_go_first_and_the_rest_are_deduplicated(tmp_path, capsys):
    """--aligned-share: the samples whose reference image and text embeddings agree least are dropped before
    dedup (a CLIP-score filter); which ones is checked against the cosines computed here, brute force."""
    rng = np.random.default_rng(1)
    n, bad = 400, 100
    image = rng.standard_normal((n, 32)).astype(np.float32)
    image[350:] = image[:50] + 0.01 * rng.standard_normal((50, 32)).astype(np.float32)  # 50 near-copies
    text = image + 0.4 * rng.standard_normal((n, 32)).astype(np.float32)  # captions that match their image
    misaligned = rng.choice(n, bad, replace=False)
    text[misaligned] = rng.standard_normal((bad, 32)).astype(np.float32)  # captions of something else
    keys = [f"s{i:05d}" for i in range(n)]
    write_part(str(tmp_path / "cache" / "part-00000.parquet"), keys, image_emb=image, text_emb=text, logit_scale=2.3,
               logit_bias=-10.0, metadata={"reference_hash": "planted", "scorer": "test", "dataset": "planted"})
    args = ["curate-set", str(RECIPE), "--set", f"cache.path={tmp_path / 'cache'}", "--set", f"train.out={tmp_path}",
            "--aligned-share", "0.75"]
    assert main(args) == 0
    assert "100 least aligned (image-text cosine < " in capsys.readouterr().out
    cosine = np.einsum("ij,ij->i", image / np.linalg.norm(image, axis=1, keepdims=True),
                       text / np.linalg.norm(text, axis=1, keepdims=True))
    best = {keys[i] for i in np.argsort(-cosine)[:300]}
    assert best == set(keys) - {keys[i] for i in misaligned}  # the planted ones are the least aligned here
    decisions = pl.read_parquet(tmp_path / "curate_set_decisions.parquet")
    assert decisions["__key__"].to_list() == keys  # one row per input, in input order
    np.testing.assert_allclose(decisions["alignment"].to_numpy(), cosine, atol=1e-5)
    dropped = decisions.filter(pl.col("reason") == "misaligned")
    assert set(dropped["__key__"]) == set(keys) - best and dropped["cluster"].null_count() == bad
    # dedup ran on the aligned 300 alone: every near-copy whose original and itself were both kept is removed
    copies = {keys[350 + j]: keys[j] for j in range(50) if keys[350 + j] in best and keys[j] in best}
    duplicates = decisions.filter(pl.col("reason") == "duplicate")
    assert dict(zip(duplicates["__key__"], duplicates["duplicate_of"], strict=True)) == copies and copies
    report = json.loads((tmp_path / "curate_set_report.json").read_text())
    assert report["removed"] == {"misaligned": bad, "duplicate": len(copies), "balance": 0}
    assert report["kept"] == 300 - len(copies) == len(read_keys(tmp_path / "curated_keys.parquet"))
    assert report["n_clusters"] == round(300 ** 0.5)  # √ of the samples clustered
    assert report["alignment_cutoff"] == pytest.approx(float(np.sort(cosine)[bad]), abs=1e-5)
    assert set(read_keys(tmp_path / "curated_keys.parquet")) == best - set(copies)
    assert main([*args[:-1], "0"]) == 2
    assert "curation.aligned_share: Input should be greater than 0, got 0" in capsys.readouterr().err


def test_bad_input_is_named(tmp_path, capsys):
    planted_cache(tmp_path / "cache")
    base = ["curate-set", str(RECIPE), "--set", f"cache.path={tmp_path / 'cache'}", "--set", f"train.out={tmp_path}"]
    # the flags are recipe overrides (curation.*), validated with the recipe's path in the message
    assert main([*base, "--threshold", "1.5"]) == 2
    assert "curation.threshold: Input should be less than or equal to 1, got 1.5" in capsys.readouterr().err
    assert main([*base, "--n-clusters", "0"]) == 2
    assert "curation.n_clusters: Input should be greater than 0, got 0" in capsys.readouterr().err
    assert main([*base, "--per-cluster", "0"]) == 2
    assert "curation.per_cluster: Input should be greater than 0, got 0" in capsys.readouterr().err
    assert main([*base, "--n-clusters", "1000"]) == 2  # more clusters than rows: the library's own check
    assert "n_clusters must be an int in [1, 340]" in capsys.readouterr().err
    losses = tmp_path / "losses"
    write_part(str(losses / "part-00000.parquet"), ["a", "b"], ref_loss=[0.1, 0.2],
               metadata={"reference_hash": "r", "scorer": "s", "dataset": "d"})
    assert main(["curate-set", str(RECIPE), "--set", f"cache.path={losses}", "--set", f"train.out={tmp_path}"]) == 2
    assert "holds per-example losses, not embeddings" in capsys.readouterr().err
    assert not (tmp_path / "curated_keys.parquet").exists()  # a failed job writes nothing


def test_precomputed_embeddings_to_curated_training_batches(tmp_path):
    root = tmp_path / "digits"
    data.make_digits(root, n_train=400, n_curated=200, n_test=200, shard_size=100)
    recipe = load_recipe(RECIPE, [f"data.root={root}", f"train.out={tmp_path / 'run'}", "reference.steps=5",
                                  f"cache.path={tmp_path / 'run' / 'cache'}"])
    train_reference(recipe, log=lambda *_: None)
    precompute(recipe, log=lambda *_: None)
    report = curate_set(recipe, threshold=0.99, log=lambda *_: None)
    kept = set(read_keys(report["keys"]))
    assert report["input"] == 400 and len(kept) == report["kept"] == 400 - sum(report["removed"].values()) > 0
    cache = ScoreCache.open(recipe.cache.path)
    samples = data.load_pairs(data.shard_urls(root, "pairs", "train"))
    pipe = curate.pipeline(samples, batch_size=8, reference=cache, rule="easy_reference", method="topk",
                           scorer=curate.ContrastiveScorer(image_key="image", text_key="text", loss="sigmoid"),
                           filter_ratio=0.5, keep_keys=report["keys"], shuffle_buffer=0)
    trained_on = [key for batch in pipe for key in batch["__key__"]]
    assert set(trained_on) <= kept and len(trained_on) == len(set(trained_on)) > 0
    assert pipe.stats()["dropped_by_keep_keys"] == 400 - len(kept)
