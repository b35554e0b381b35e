"""The web world (pipelines/web.py): a deterministic, never-repeating, long-tailed compositional stream with the
declared concept, noise and duplicate rates (measured on 50k samples), balanced clean splits from disjoint source
digits, and the web task end to end through `curate data web` and `curate run`."""

from __future__ import annotations

import collections
import io
import json

import numpy as np
import pytest
import torch

from pipelines import web
from pipelines.data import DIGIT_NAMES

N = 50_000


@pytest.fixture(scope="module")
def stream() -> list[dict]:
    return web.web_rows("train", 0, N, seed=0)


@pytest.fixture(scope="module")
def metas(stream) -> list[dict]:
    return [json.loads(row["json"]) for row in stream]


def test_the_stream_is_deterministic_per_seed_and_its_prefix_does_not_depend_on_its_length(stream):
    assert web.web_rows("train", 0, 300, seed=0) == stream[:300]
    assert web.web_rows("train", 8000, 8300, seed=0) == stream[8000:8300]  # a block boundary inside: 8192
    other = web.web_rows("train", 0, 300, seed=1)
    assert sum(a["npy"] == b["npy"] for a, b in zip(other, stream, strict=False)) == 0


def test_no_pair_repeats_and_no_image_either(stream):
    assert len({(row["npy"], row["txt"]) for row in stream}) == N
    assert len({row["npy"] for row in stream}) == N  # near-duplicates differ by their faint noise
    assert len({row["__key__"] for row in stream}) == N


def test_the_declared_noise_and_duplicate_rates(metas):
    kinds = collections.Counter(meta["noise"] for meta in metas)
    for kind, rate in web.NOISE.items():
        assert kinds[kind] / N == pytest.approx(rate, abs=0.002)
    assert kinds["clean"] / N == pytest.approx(1 - sum(web.NOISE.values()), abs=0.002)
    assert all(meta["is_noisy"] == (meta["noise"] in ("misaligned", "junk")) for meta in metas)
    assert all(meta["is_duplicate"] == (meta["noise"] == "duplicate") for meta in metas)


def test_concepts_are_many_compositional_and_zipf_distributed(metas):
    assert web.N_CONCEPTS == 600 >= 500
    ids = torch.arange(web.N_CONCEPTS)
    a = web.concept_attributes(ids)
    assert torch.equal((a["tens"] * 10 + a["units"]) * 6 + a["colour"], ids)
    assert torch.equal(a["number"], a["tens"] * 10 + a["units"])
    assert all(meta["number"] == meta["tens"] * 10 + meta["units"] for meta in metas)
    originals = [meta for meta in metas if not meta["is_duplicate"]]
    seen = collections.Counter(meta["concept"] for meta in originals)
    assert len(seen) >= 500
    probabilities = web.concept_probabilities(0)
    ranks = web.concept_ranks(0)
    assert torch.equal(torch.argsort(ranks), torch.argsort(probabilities, descending=True, stable=True))
    # Zipf with exponent 1: p(rank r) ∝ 1/(r+1); the measured frequency of a rank follows it
    by_rank = torch.zeros(web.N_CONCEPTS)
    for concept, count in seen.items():
        by_rank[int(ranks[concept])] += count / len(originals)
    harmonic = (1 / torch.arange(1, web.N_CONCEPTS + 1).double()).sum()
    for r in (0, 1, 9):
        assert float(by_rank[r]) == pytest.approx(1 / ((r + 1) * float(harmonic)), rel=0.08)
    tail = sum(meta["tail"] for meta in originals) / len(originals)
    assert tail == pytest.approx(float(probabilities[ranks >= 300].sum()), abs=0.006)  # the rarer half: ~10%
    assert all(meta["tail"] == (meta["rank"] >= 300) for meta in metas)
    backgrounds = collections.Counter(meta["background"] for meta in metas)  # the unnamed nuisance: uniform
    assert all(count / N == pytest.approx(1 / 3, abs=0.01) for count in backgrounds.values())


def test_captions_name_the_concept_unless_misaligned_or_junk(stream, metas):
    def named(concept: int) -> set[str]:
        return {web.concept_caption(concept, t) for t in range(len(web.TEMPLATES))}

    for row, meta in zip(stream[:5000], metas[:5000], strict=True):
        caption = row["txt"].decode()
        if meta["noise"] in ("clean", "duplicate"):
            assert caption in named(meta["concept"])
            assert not any(background in caption for background in web.BACKGROUNDS)
        elif meta["noise"] == "misaligned":  # another concept's caption
            assert caption not in named(meta["concept"])
            assert any(caption.startswith(w) or f" {w}" in caption for w in (*DIGIT_NAMES, *"0123456789"))
        else:
            assert all(caption not in named(c) for c in (meta["concept"],))
            assert not any(colour in caption for colour in web.COLOURS)


def test_near_duplicates_copy_a_clean_head_pair_of_their_block(stream, metas):
    index = {row["__key__"]: i for i, row in enumerate(stream)}
    head = round(web.HEAD_SHARE * web.N_CONCEPTS)
    duplicates = [i for i, meta in enumerate(metas) if meta["is_duplicate"]]
    assert duplicates
    for i in duplicates[:2000]:
        j = index[metas[i]["duplicate_of"]]
        assert i // web.BLOCK == j // web.BLOCK and metas[j]["noise"] == "clean"
        assert metas[i]["concept"] == metas[j]["concept"] and metas[i]["rank"] < head
        assert stream[i]["txt"] == stream[j]["txt"]
        a, b = (np.load(io.BytesIO(stream[k]["npy"])).astype(int) for k in (i, j))
        assert 0 < np.abs(a - b).mean() < 6  # the same view, faint noise


def test_curated_and_test_are_clean_balanced_and_from_disjoint_source_digits(metas):
    splits = {split: [json.loads(r["json"]) for r in web.web_rows(split, 0, 2 * web.N_CONCEPTS, seed=0)]
              for split in ("curated", "test")}
    for rows in splits.values():
        assert set(collections.Counter(m["concept"] for m in rows).values()) == {2}
        assert all(m["noise"] == "clean" for m in rows)
    sources = {split: {s for m in rows for s in m["source"]} for split, rows in splits.items()}
    sources["train"] = {s for m in metas for s in m["source"]}
    assert not sources["train"] & sources["test"] and not sources["train"] & sources["curated"]
    assert not sources["curated"] & sources["test"]


def test_images_show_the_concept(stream, metas):
    """The number is drawn in the concept's colour: the pixels most like that colour (rather than a grey of the
    same brightness) lie in both halves of the frame, and each half's ink matches its source digit's shape better
    than the other digits' mean shapes do, most of the time (the views are rotated, zoomed and shifted)."""
    from pipelines.data import _source_pools

    images, labels, _ = _source_pools(0)
    means = torch.stack([images[labels == d].mean(0) for d in range(10)])  # (10, 8, 8)
    shapes = (means - means.mean((1, 2), keepdim=True)).flatten(1)
    right = 0
    for row, meta in list(zip(stream, metas, strict=True))[:500]:
        image = np.load(io.BytesIO(row["npy"])).astype(float) / 255  # (3, 16, 16)
        colour = np.array(list(web.COLOURS.values())[meta["colour"]])
        likeness = np.tensordot(colour - colour.mean(), image - image.mean(0), axes=(0, 0))  # (16, 16)
        halves = likeness[:, :8].sum(), likeness[:, 8:].sum()
        assert min(halves) > 0.2 * max(halves) > 0  # ink in both halves, in the concept's colour
        for half, digit in ((likeness[:, :8], meta["tens"]), (likeness[:, 8:], meta["units"])):
            ink = torch.nn.functional.interpolate(torch.tensor(half.clip(0))[None, None].float(), size=(8, 8),
                                                  mode="area")[0, 0]
            ink = (ink - ink.mean()).flatten()
            right += int(torch.argmax(torch.nn.functional.cosine_similarity(shapes, ink[None])) == digit)
    assert right / 1000 > 0.3  # chance is 0.1 (measured: 0.39, the mean shapes are a crude template)


def test_curate_data_web_writes_shards_the_web_task_loads(tmp_path, capsys):
    from pipelines import cli, tasks
    from pipelines.recipe import parse_recipe

    assert cli.main(["data", "web", str(tmp_path), "--n-train", "5000", "--shard-size", "2000"]) in (0, None)
    assert "600 concepts" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["count"] for s in manifest["web"]["splits"]["train"]["shards"]] == [2000, 2000, 1000]
    assert manifest["web"]["splits"]["test"]["concepts"] == 600 and manifest["web"]["version"] == 2
    recipe = parse_recipe("name: w\ndata: {dataset: web}\nmodel: {kind: tiny_clip}\n", "test",
                          [f"data.root={tmp_path}"])
    samples = list(tasks.load_split(recipe, "train"))
    assert len(samples) == 5000 and samples[0]["image"].shape == (3, 16, 16)
    rows = web.web_rows("train", 0, 2, seed=0)
    assert samples[1]["__key__"] == rows[1]["__key__"]
    assert samples[1]["label"] == json.loads(rows[1]["json"])["concept"]
    assert torch.equal((samples[1]["image"] * 255).round().to(torch.uint8),
                       torch.from_numpy(np.load(io.BytesIO(rows[1]["npy"]))))
    model = tasks.build_model(recipe.model, recipe, seed=0)
    test = tasks.in_memory_batches(tasks.load_split(recipe, "test"))
    metrics = tasks.task_of(recipe).evaluate(model, test, recipe.model, torch.device("cpu"))
    assert set(metrics) == {"accuracy", "number_accuracy", "tens_accuracy", "units_accuracy", "colour_accuracy",
                            "tail_accuracy", "r1"}
    assert metrics["accuracy"] < 0.05  # an untrained model is near chance (1/600)
    manifest["web"]["version"] = 1  # a world an older curate made: other concepts than this code's prompts
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"version 1, this curate reads version 2.*curate data web"):
        tasks.check_data(recipe)


@pytest.mark.slow
def test_the_web_recipe_runs_end_to_end(tmp_path):
    """`curate run recipes/web_jest.yaml` on a 5000-sample world (prepare: true makes the reference and cache)."""
    from pipelines import cli

    out = tmp_path / "runs"
    assert cli.main(["data", "web", f"{tmp_path}/web", "--n-train", "5000"]) in (0, None)
    assert cli.main(["run", "recipes/web_jest.yaml", "--set", f"data.root={tmp_path}/web", "--set",
                     f"train.out={out}", "--set", f"cache.path={out}/cache", "--set", f"reference.path={out}/ref",
                     "--set", "reference.steps=20", "--set", "train.steps=10", "--set", "train.eval_every=5"]) \
        in (0, None)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"learnability", "uniform", "easy_reference"}
    assert summary["uniform"]["noisy_kept"] == pytest.approx(0.3, abs=0.08)  # 10 steps of 64: the stream's rate


def test_the_shared_tail_is_made_of_the_heads_parts_and_the_distinct_tail_of_its_own():
    """The one property the two worlds differ in, fixed before any method ran: in "shared" every digit and colour
    is common and mostly head; in "distinct" the tens digits 5-9 (each about 2% of the stream) are tail only, while
    the Zipf law (so the tail's mass) is the same."""
    shared, distinct = web.attribute_shares(0, "shared"), web.attribute_shares(0, "distinct")
    for name in ("tens", "units", "colour"):
        share, in_tail = shared[name]
        assert share.min() > 0.035 and in_tail.max() < 0.3
    share, in_tail = distinct["tens"]
    assert torch.equal(in_tail[5:], torch.ones(5, dtype=in_tail.dtype)) and not in_tail[:5].any()
    assert share[5:].max() < 0.025
    for name in ("units", "colour"):  # common to head and tail in both worlds
        assert distinct[name][1].max() < 0.3
    zipf = web.concept_probabilities(0).sort().values
    assert torch.equal(web.concept_probabilities(0, "distinct").sort().values, zipf)
    ranks = web.concept_ranks(0, "distinct")
    tens = web.concept_attributes(torch.arange(web.N_CONCEPTS))["tens"]
    assert torch.equal(ranks >= web.TAIL_RANK, tens >= 5)
    assert not torch.equal(ranks, web.concept_ranks(1, "distinct"))  # each half in a seeded random order
    with pytest.raises(ValueError, match=r"tail must be one of \('shared', 'distinct'\), got 'rare'"):
        web.concept_probabilities(0, "rare")


def test_the_distinct_tail_world_has_the_declared_rates_and_the_same_balanced_splits():
    n = 20_000
    metas = [json.loads(row["json"]) for row in web.web_rows("train", 0, n, seed=0, tail="distinct")]
    kinds = collections.Counter(meta["noise"] for meta in metas)
    for kind, rate in web.NOISE.items():
        assert kinds[kind] / n == pytest.approx(rate, abs=0.003)
    originals = [meta for meta in metas if not meta["is_duplicate"]]
    assert all(meta["tail"] == (meta["tens"] >= 5) for meta in metas)
    tail_mass = float(web.concept_probabilities(0, "distinct")[web.concept_ranks(0, "distinct") >= web.TAIL_RANK].sum())
    assert sum(meta["tail"] for meta in originals) / len(originals) == pytest.approx(tail_mass, abs=0.01)
    assert not any(meta["tail"] for meta in metas if meta["is_duplicate"])  # duplicates copy the head
    for split in ("curated", "test"):  # the same images and captions; the tail flag follows the ranking
        shared, own = (web.web_rows(split, 0, web.N_CONCEPTS, seed=0, tail=t) for t in web.TAILS)
        assert [(r["npy"], r["txt"]) for r in shared] == [(r["npy"], r["txt"]) for r in own]
        assert sum(json.loads(r["json"])["tail"] for r in own) == web.N_CONCEPTS // 2


def test_curate_data_web_accepts_exactly_the_worlds_tails(tmp_path, capsys):
    """The CLI spells `--tail`'s choices out (it imports no torch, so not `web.TAILS`): each of the world's tails
    makes that world, and a name the world does not know is refused before anything is written."""
    from pipelines import cli

    for tail in web.TAILS:
        assert cli.main(["data", "web", str(tmp_path / tail), "--n-train", "50", "--tail", tail]) in (0, None)
        assert json.loads((tmp_path / tail / "manifest.json").read_text())["web"]["tail"] == tail
    with pytest.raises(SystemExit):
        cli.main(["data", "web", str(tmp_path / "other"), "--n-train", "50", "--tail", "other"])
    assert "invalid choice: 'other'" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_curate_data_web_tail_distinct_writes_that_world_and_says_so(tmp_path, capsys):
    from pipelines import cli

    assert cli.main(["data", "web", str(tmp_path), "--n-train", "600", "--tail", "distinct"]) in (0, None)
    assert "distinct tail" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["web"]["tail"] == "distinct"
    assert manifest["web"]["splits"]["test"]["tail_share"] == 0.5  # balanced: half the concepts are tail
    with pytest.raises(SystemExit, match="--tail is the web world's; drop it"):
        cli.main(["data", "digits", str(tmp_path / "d"), "--tail", "distinct"])
