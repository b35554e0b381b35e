"""Semantic dedup and balanced sampling against brute force, planted duplicates and a trained reference.

Data is made here: scikit-learn's bundled 8×8 digits (shipped in the package) and random clusters.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from curate.cache import ScoreCache, write_part
from curate.curation import DedupResult, alignment_filter, balance, read_keys, semantic_dedup, write_keys

TOL = 1e-5  # the rounding slack semantic_dedup documents: duplicates have cos ≥ threshold - 1e-5


def brute_force(keys: list[str], emb: np.ndarray, clusters: np.ndarray, threshold: float) -> tuple[np.ndarray, ...]:
    """The documented rule, one row at a time in float64: in each cluster, in key order, a row is removed
    iff some already kept row has cos ≥ threshold; it then points at the most similar kept row."""
    x = emb.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dup = np.full(len(x), -1)
    sim = np.full(len(x), np.nan)
    for c in np.unique(clusters):
        kept: list[int] = []
        for j in sorted(np.flatnonzero(clusters == c), key=lambda i: keys[i]):
            s = x[kept] @ x[j]
            if kept and s.max() >= threshold - TOL:
                dup[j], sim[j] = kept[int(s.argmax())], s.max()
            else:
                kept.append(j)
    return dup, sim


def assert_matches_brute_force(keys: list[str], emb: np.ndarray, result: DedupResult, threshold: float) -> None:
    dup, sim = brute_force(keys, emb, result.clusters, threshold)
    np.testing.assert_array_equal(result.kept, dup < 0)
    removed = ~result.kept
    # the representative may differ only on an exact float tie; its similarity may not
    np.testing.assert_allclose(result.similarity[removed], sim[removed], atol=1e-5)
    assert result.kept[result.duplicate_of[removed]].all()
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    direct = np.einsum("ij,ij->i", x[removed], x[result.duplicate_of[removed]])
    np.testing.assert_allclose(result.similarity[removed], direct, atol=1e-5)
    assert (result.clusters[removed] == result.clusters[result.duplicate_of[removed]]).all()


def clustered(n: int, d: int, n_dup: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Rows around 8 centres (siblings at cos ≈ 0.5) plus n_dup exact or noisy copies; keys in random order."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, d))
    base = centres[rng.integers(8, size=n - n_dup)] + rng.standard_normal((n - n_dup, d))
    src = rng.integers(n - n_dup, size=n_dup)
    copies = base[src] + rng.choice([0.0, 0.02], size=(n_dup, 1)) * rng.standard_normal((n_dup, d))
    keys = [f"k{k:05d}" for k in rng.permutation(n)]
    return keys, np.concatenate([base, copies]).astype(np.float32), np.concatenate([np.arange(n - n_dup), src])


@pytest.mark.parametrize("max_block", [1, 2_000, 1 << 24])
@pytest.mark.parametrize("n_clusters", [1, 6])
def test_matches_brute_force(n_clusters: int, max_block: int) -> None:
    keys, emb, _ = clustered(600, 32, 150, seed=n_clusters)
    result = semantic_dedup(keys, emb, n_clusters=n_clusters, threshold=0.9, max_block=max_block)
    assert 120 < (~result.kept).sum() < 180  # mostly the planted copies
    assert_matches_brute_force(keys, emb, result, 0.9)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(-2, 2), min_size=3, max_size=3), min_size=1, max_size=30),
    threshold=st.sampled_from([0.0, 0.5, 0.8, 0.95, 1.0]),
    max_block=st.integers(1, 200),
    data=st.data(),
)
def test_matches_brute_force_on_ties(rows: list[list[int]], threshold: float, max_block: int, data) -> None:
    # small integer rows: many exact duplicates, antipodes and equal similarities
    emb = np.array([r if any(r) else [1, 0, 0] for r in rows], np.float32)
    keys = data.draw(st.permutations([f"{i:02d}" for i in range(len(emb))]))
    result = semantic_dedup(keys, emb, n_clusters=1, threshold=threshold, max_block=max_block)
    assert_matches_brute_force(keys, emb, result, threshold)
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    kept = x[result.kept]
    s = kept @ kept.T
    assert (s[np.triu_indices(len(kept), 1)] < threshold - TOL + 1e-6).all()  # kept rows are not duplicates


def test_threshold_one_removes_exact_copies_only() -> None:
    keys, emb, group = clustered(400, 32, 100, seed=3)
    exact = (emb[300:] == emb[group[300:]]).all(axis=1)
    result = semantic_dedup(keys, emb, n_clusters=5, threshold=1.0)
    assert (~result.kept).sum() == exact.sum() > 20
    np.testing.assert_allclose(result.similarity[~result.kept], 1.0, atol=1e-6)
    assert result.similarity[~result.kept].max() <= 1.0


def test_keeps_lowest_key_and_frame() -> None:
    emb = np.array([[1, 0], [1, 0], [0, 1], [1, 0.01]], np.float32)
    result = semantic_dedup(["c", "a", "z", "b"], emb, n_clusters=1, threshold=0.99)
    assert result.kept_keys == ["a", "z"]
    frame = result.to_frame()
    assert frame.columns == ["__key__", "cluster", "kept", "duplicate_of", "similarity"]
    assert frame["duplicate_of"].to_list() == ["a", None, None, "a"]
    assert frame["similarity"][0] == pytest.approx(1.0)


# ---- planted duplicates in real images ----

DIGITS, LABELS = load_digits(return_X_y=True)
DIGITS = DIGITS.astype(np.float32)


def embed(images: np.ndarray) -> np.ndarray:
    """A fixed simple embedding: pixels minus the dataset's mean image (normalised inside semantic_dedup)."""
    return images - DIGITS.mean(axis=0)


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A near copy of an 8×8 digit: sub-pixel shift, ±5% contrast, pixel noise (cos ≈ 0.97-0.99 to the original)."""
    out = ndimage.shift(image.reshape(8, 8), rng.uniform(-0.1, 0.1, 2), order=1, mode="nearest")
    return np.clip(out * rng.uniform(0.95, 1.05) + rng.normal(0, 0.3, out.shape), 0, 16).ravel()


def distinct_digits(threshold: float) -> np.ndarray:
    """Indices of digits with no earlier digit at cos ≥ threshold: the dataset has ~70 natural near-duplicates
    in this embedding, which would otherwise count against precision although they are real duplicates."""
    x = embed(DIGITS)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = np.tril(x @ x.T, -1)
    return np.flatnonzero(s.max(axis=1) < threshold)


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_digit_duplicates_precision_recall(seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = distinct_digits(0.95)
    sources = rng.choice(base, 400, replace=False)
    # each source gets an exact copy, or two augmentations, or both
    copies, group = [], []
    for i, s in enumerate(sources):
        n_exact, n_aug = [(1, 0), (0, 2), (1, 2)][i % 3]
        copies += [DIGITS[s]] * n_exact + [augment(DIGITS[s], rng) for _ in range(n_aug)]
        group += [s] * (n_exact + n_aug)
    images = np.concatenate([DIGITS[base], np.stack(copies)])
    group = np.concatenate([base, group])
    keys = [f"img-{k:05d}" for k in rng.permutation(len(images))]  # which copy has the lowest key is random

    result = semantic_dedup(keys, embed(images), n_clusters=30, threshold=0.95, seed=seed)

    removed = ~result.kept
    size = np.bincount(group)
    correct = np.minimum(np.bincount(group[removed], minlength=len(size)), np.maximum(size - 1, 0)).sum()
    precision, recall = correct / removed.sum(), correct / np.maximum(size - 1, 0).sum()
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert (group[removed] == group[result.duplicate_of[removed]]).mean() >= 0.95  # names the right original


# ---- balanced sampling ----


def test_balance_caps_every_cluster() -> None:
    rng = np.random.default_rng(0)
    clusters = rng.choice(12, size=3000, p=np.arange(1, 13) / 78)  # sizes from ~40 to ~460
    clusters[:5] = 12  # and one cluster smaller than the cap
    keys = [f"k{i:04d}" for i in range(3000)]
    kept = balance(keys, clusters, per_cluster=30, seed=1)
    index = {k: i for i, k in enumerate(keys)}
    rows = np.array([index[k] for k in kept])
    assert (np.diff(rows) > 0).all()  # input order
    hist = np.bincount(clusters[rows], minlength=13)
    np.testing.assert_array_equal(hist, np.minimum(np.bincount(clusters), 30))  # flat: tolerance 0
    assert balance(keys, clusters, per_cluster=30, seed=1) == kept
    assert balance(keys, clusters, per_cluster=30, seed=2) != kept


def test_balance_clusters_embeddings_itself() -> None:
    keys, emb, _ = clustered(800, 16, 0, seed=4)
    kept = balance(keys, emb, per_cluster=20, n_clusters=8, seed=0)
    assert 8 * 10 <= len(kept) <= 8 * 20 and len(set(kept)) == len(kept)


def test_curated_reference_beats_random_subset() -> None:
    """A pool with 10× class imbalance and 60 digits each copied 15× (augmented): a logistic regression trained
    on dedup + balance must beat one trained on a random subset of the same size, on a held-out split."""
    curated_acc, random_acc, minority_share = [], [], []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        x_train, x_test, y_train, y_test = train_test_split(
            DIGITS, LABELS, test_size=0.4, stratify=LABELS, random_state=seed
        )
        pool = rng.random(len(y_train)) < np.where(y_train < 5, 1.0, 0.1)
        x_pool, y_pool = x_train[pool], y_train[pool]
        popular = rng.choice(np.flatnonzero(y_pool < 5), 60, replace=False)
        x_pool = np.concatenate([x_pool, [augment(x_pool[i], rng) for i in popular for _ in range(15)]])
        y_pool = np.concatenate([y_pool, np.repeat(y_pool[popular], 15)])
        keys = [f"{k:05d}" for k in rng.permutation(len(x_pool))]

        dedup = semantic_dedup(keys, embed(x_pool), n_clusters=30, threshold=0.95, seed=seed)
        kept = np.flatnonzero(dedup.kept)
        chosen = balance([keys[i] for i in kept], dedup.clusters[kept], per_cluster=8, seed=seed)
        index = {k: i for i, k in enumerate(keys)}
        curated = np.array([index[k] for k in chosen])
        uniform = rng.choice(len(x_pool), len(curated), replace=False)

        for rows, accs in ((curated, curated_acc), (uniform, random_acc)):
            model = LogisticRegression(solver="newton-cg", max_iter=500).fit(x_pool[rows] / 16, y_pool[rows])
            accs.append(model.score(x_test / 16, y_test))
        minority_share.append(((y_pool[curated] >= 5).mean(), (y_pool >= 5).mean()))
    share = np.mean(minority_share, axis=0)
    assert share[0] >= 2 * share[1], share  # balancing by cluster also flattens the (unseen) classes
    assert np.mean(curated_acc) >= np.mean(random_acc), (curated_acc, random_acc)


def test_dedup_over_a_score_cache(tmp_path) -> None:
    """The offline path: reference embeddings in a ScoreCache → dedup → a key list the pipeline reads back."""
    keys, emb, group = clustered(300, 16, 60, seed=5)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    meta = {"reference_hash": "h", "scorer": "contrastive", "dataset": "clustered"}
    write_part(str(tmp_path / "cache" / "part-00000.parquet"), keys, image_emb=emb, text_emb=emb,
               logit_scale=2.3, metadata=meta)  # fmt: skip
    cache = ScoreCache.open(str(tmp_path / "cache"))
    result = semantic_dedup(cache.keys, cache.image_emb, n_clusters=4, threshold=0.99)
    assert_matches_brute_force(cache.keys.to_list(), cache.image_emb, result, 0.99)
    path = write_keys(tmp_path / "kept.parquet", result.kept_keys, {"threshold": 0.99, "cache": str(tmp_path)})
    assert read_keys(path) == sorted(result.kept_keys)
    assert len(result.kept_keys) == len(np.unique(group))  # exactly the planted copies went


# ---- key lists ----


def test_write_read_keys_roundtrip(tmp_path) -> None:
    path = write_keys(tmp_path / "keep.parquet", ["b", "a", "c"], {"threshold": 0.95, "recipe": "r.yaml"})
    assert read_keys(path) == ["a", "b", "c"]
    meta = pl.read_parquet_metadata(path)
    assert meta["threshold"] == "0.95" and meta["recipe"] == "r.yaml" and meta["curate.count"] == "3"


def test_write_keys_bad_input_loses_nothing(tmp_path) -> None:
    path = write_keys(tmp_path / "keep.parquet", ["a"])
    with pytest.raises(ValueError, match="unique"):
        write_keys(path, ["x", "x"])
    with pytest.raises(ValueError, match="must be str"):
        write_keys(path, ["x", None])
    with pytest.raises(OSError):
        write_keys(tmp_path / "missing" / "keep.parquet", ["a"])
    assert read_keys(path) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.parquet"]  # no temp files left


def test_read_keys_needs_key_column(tmp_path) -> None:
    pl.DataFrame({"id": ["a"]}).write_parquet(tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"no '__key__' column \(has \['id'\]\)"):
        read_keys(tmp_path / "x.parquet")


# ---- alignment filter ----


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3), st.integers(1, 3)), min_size=1, max_size=40),
       st.floats(0.01, 1.0))
def test_alignment_filter_matches_brute_force(rows: list[tuple[int, int, int]], share: float) -> None:
    """Small integer vectors, so that many rows tie: the kept rows are round(share·N) of highest cosine (cosines
    computed here one row at a time in float64; rows whose cosines differ by float32 rounding may go either way),
    and among identical rows the earlier is kept."""
    image = np.array([[1.0, 0.0, float(z)] for _, _, z in rows])
    text = np.array([[float(x), float(y), 1.0] for x, y, _ in rows])
    keys = [f"k{i:03d}" for i in range(len(rows))]
    result = alignment_filter(keys, image, text, share=share)
    cos = np.array([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(image, text, strict=True)])
    np.testing.assert_allclose(result.alignment, cos, atol=1e-6)
    k = round(share * len(rows))
    assert result.kept.sum() == k and result.kept_keys == [keys[i] for i in np.flatnonzero(result.kept)]
    if 0 < k < len(rows):
        assert cos[result.kept].min() >= cos[~result.kept].max() - 1e-6
    for i, j in itertools.combinations(range(len(rows)), 2):  # identical rows: the earlier one first
        if rows[i] == rows[j] and result.kept[j]:
            assert result.kept[i]
    if k:
        assert result.cutoff == result.alignment[result.kept].min()
    else:  # round(share·N) is 0: nothing kept, and no cutoff
        assert np.isnan(result.cutoff)


# ---- bad input ----

GOOD = np.eye(4, dtype=np.float32)
KEYS = ["a", "b", "c", "d"]


def test_nan_rows_are_named() -> None:
    emb = GOOD.copy()
    emb[1, 2] = np.nan
    emb[3, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 embedding rows are NaN/inf or all zero.*\['b', 'd'\]"):
        semantic_dedup(KEYS, emb, n_clusters=2)
    with pytest.raises(ValueError, match=r"\['c'\]"):
        balance(KEYS, GOOD * [[1], [1], [0], [1]], per_cluster=1, n_clusters=2)


@pytest.mark.parametrize(
    ("keys", "emb", "match"),
    [
        (KEYS[:3], GOOD, "3 keys for 4 rows"),
        (KEYS, GOOD[0], r"2-D|\(N, d\)"),
        (KEYS, GOOD[:, :0], r"\(N, d\)"),
        (KEYS, [[1.0, 0.0], [0.0, 1.0], [1.0], [0.0, 1.0]], "same d for every row"),
        (["a", "a", "b", "c"], GOOD, r"unique, repeated: \['a'\]"),
    ],
)
def test_shape_and_key_errors(keys, emb, match) -> None:
    with pytest.raises(ValueError, match=match):
        semantic_dedup(keys, emb, n_clusters=1)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_clusters": 5}, r"n_clusters must be an int in \[1, 4\].*n_clusters=5"),
    ({"n_clusters": 0}, "n_clusters=0"),
    ({"n_clusters": 2, "threshold": 1.5}, "threshold=1.5"),
    ({"n_clusters": 2, "threshold": -0.1}, "threshold=-0.1"),
    ({"n_clusters": 2, "threshold": float("nan")}, "threshold=nan"),
])  # fmt: skip
def test_argument_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        semantic_dedup(KEYS, GOOD, **kwargs)


def test_balance_argument_errors() -> None:
    with pytest.raises(ValueError, match="per_cluster=0"):
        balance(KEYS, np.zeros(4, int), per_cluster=0)
    with pytest.raises(ValueError, match="need n_clusters"):
        balance(KEYS, GOOD, per_cluster=1)
    with pytest.raises(ValueError, match="n_clusters=2 is unused"):
        balance(KEYS, np.zeros(4, int), per_cluster=1, n_clusters=2)
    with pytest.raises(ValueError, match="n_clusters=9"):
        balance(KEYS, GOOD, per_cluster=1, n_clusters=9)
    with pytest.raises(ValueError, match="3 keys for 4 rows"):
        balance(KEYS[:3], np.zeros(4, int), per_cluster=1)


@pytest.mark.parametrize(("args", "match"), [
    ((KEYS, np.eye(4), np.eye(4), 0.0), r"share=0\.0"),
    ((KEYS, np.eye(4), np.eye(4), 1.5), r"share=1\.5"),
    ((KEYS, np.eye(4), np.eye(4), True), "share=True"),
    ((KEYS, np.eye(4), np.ones((4, 3)), 0.5), r"same shape.*\(4, 4\) and \(4, 3\)"),
    ((KEYS, np.eye(4), np.eye(4)[:3], 0.5), "3 keys for 4 rows|4 keys for 3 rows"),
    ((KEYS, np.eye(4), np.eye(4) * [[1], [0], [1], [1]], 0.5), r"all zero.*\['b'\]"),
])  # fmt: skip
def test_alignment_filter_errors(args, match) -> None:
    keys, image, text, share = args
    with pytest.raises(ValueError, match=match):
        alignment_filter(keys, image, text, share=share)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_faiss_is_lazy_and_its_absence_says_how_to_install(monkeypatch) -> None:
    code = "import sys, curate.curation; assert 'faiss' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "faiss", None)  # what `import faiss` meets when it is not installed
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        semantic_dedup(KEYS, GOOD, n_clusters=2)
