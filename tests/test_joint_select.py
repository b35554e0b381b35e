"""The JointSelect stage: how many it keeps, what it counts, and the local scope."""

import pytest
import torch

import curate

from .conftest import linear_models, make_samples


def test_stats_report_counts_and_quantiles():
    data = make_samples(200)
    learner, reference = linear_models()
    p = curate.pipeline(data, learner=learner, reference=reference, scorer=curate.ClassificationScorer(),
                        method="topk", batch_size=10, filter_ratio=0.5)
    list(p)
    stats = p.stats()
    assert stats["seen"] == 200 and stats["kept"] == 100 and stats["kept_fraction"] == 0.5
    assert stats["kept_score_mean"] > stats["score_mean"]
    q = stats["score_quantiles"]
    assert q["q10"] <= q["q50"] <= q["q90"]


def test_stats_report_the_sampling_entropy_of_sampled_selections_only():
    data = make_samples(200)
    learner, reference = linear_models()
    kwargs = dict(learner=learner, reference=reference, scorer=curate.ClassificationScorer(), batch_size=10,
                  filter_ratio=0.5)
    for method, temperature in (("sample", 1.0), ("sample", 0.0), ("topk", 1.0)):
        p = curate.pipeline(data, method=method, temperature=temperature, **kwargs)
        list(p)
        entropy = p.stats().get("chunk_entropy")
        if method == "topk":
            assert entropy is None
            continue
        assert entropy["later"] is None and len(entropy["last_superbatch"]) == 1  # one draw per superbatch
        if temperature:
            assert 0.5 < entropy["first"] < 1.0  # 20 candidates, unequal scores: peaked, far from one-hot
        else:
            assert entropy["first"] == 0.0


def test_short_last_superbatch_keeps_the_same_fraction_or_is_dropped():
    data = make_samples(1000)
    learner, reference = linear_models()
    kwargs = dict(learner=learner, reference=reference, scorer=curate.ClassificationScorer(), method="topk",
                  batch_size=32, filter_ratio=0.8, shuffle_buffer=0)
    sizes = [len(b["__key__"]) for b in curate.pipeline(data, **kwargs)]
    assert sizes == [32] * 6 + [8]  # B = 160: 6 full superbatches, then 40 samples keep 40·32/160
    p = curate.pipeline(data, drop_last=True, **kwargs)
    assert [len(b["__key__"]) for b in p] == [32] * 6
    assert p.stats()["dropped_tail"] == 40


def test_the_local_scope_keeps_this_processes_rows_in_selection_order():
    batch = {"__key__": ["a", "b", "c", "d"], "x": torch.arange(4)}
    scored = curate.ScoredSuperbatch(batch, None, None, curate.RULES["uniform"], 4)
    share = curate.LocalScope().share(scored, torch.tensor([2, 0]), torch.tensor([0.5, 1.0, 2.0, 3.0]))
    assert share.batch == {"__key__": ["c", "a"], "x": share.batch["x"]} and share.batch["x"].tolist() == [2, 0]
    assert share.own.tolist() == [0.5, 1.0, 2.0, 3.0] and share.kept.tolist() == [2.0, 0.5]


def test_topk_of_a_superbatch_no_model_scored_is_refused():
    node = curate.Superbatch(curate.Source(make_samples(20)), 20)
    node = curate.JointSelect(curate.Score(node, rule="uniform"), 5, method="topk")
    with pytest.raises(ValueError, match="would keep the first samples"):
        next(iter(curate.Pipeline(node)))


def test_a_superbatch_smaller_than_the_batch_is_refused():
    node = curate.Superbatch(curate.Source(make_samples(20)), 4)
    node = curate.JointSelect(curate.Score(node, rule="uniform"), 5, method="sample")
    with pytest.raises(ValueError, match="batch_size must be smaller than the superbatch"):
        next(iter(curate.Pipeline(node)))
