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


def _scored(losses: torch.Tensor) -> curate.ScoredSuperbatch:
    """A superbatch whose reference losses are `losses`, under easy_reference (score = -loss)."""
    n = len(losses)
    batch = {"__key__": [str(i) for i in range(n)], "x": torch.arange(n)}
    return curate.ScoredSuperbatch(batch, None, curate.ModelScores.of_losses(losses), curate.RULES["easy_reference"], n)


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_a_uniform_share_is_drawn_uniformly_and_the_rest_by_the_method(method):
    n, k, share = 20, 8, 0.25  # 2 uniform picks, 6 by the method
    losses = torch.arange(n, dtype=torch.float32)  # easy_reference: sample 0 is the best, 19 the worst
    scored = _scored(losses)
    select = curate.JointSelect(None, k, method, temperature=0.0, uniform_share=share)  # type: ignore[arg-type]
    draws, counts = 4000, torch.zeros(n)
    for i in range(draws):
        idx, _ = select.select(scored, k, torch.Generator().manual_seed(i))
        assert idx.numel() == k and idx.unique().numel() == k
        uniform, rest = idx[:2], idx[2:]
        # greedy on the rest: the 6 best of the candidates the uniform picks left
        best = [j for j in range(n) if j not in uniform.tolist()][:6]
        assert sorted(rest.tolist()) == best
        counts[uniform] += 1
    # each sample is one of the 2 uniform picks with probability 2/20: 5 binomial standard errors
    p = 2 / n
    assert ((counts / draws - p).abs() < 5 * (p * (1 - p) / draws) ** 0.5).all(), counts / draws
    # the worst samples reach a batch only through the uniform share, as often as it draws them
    assert counts[-1] > 0


def test_no_uniform_share_leaves_the_selection_unchanged_and_all_is_uniform():
    losses = torch.randn(30)
    plain = curate.JointSelect(None, 6, "sample")  # type: ignore[arg-type]
    zero = curate.JointSelect(None, 6, "sample", uniform_share=0.0)  # type: ignore[arg-type]
    whole = curate.JointSelect(None, 6, "sample", uniform_share=1.0)  # type: ignore[arg-type]
    for seed in range(5):
        a, _ = plain.select(_scored(losses), 6, torch.Generator().manual_seed(seed))
        b, _ = zero.select(_scored(losses), 6, torch.Generator().manual_seed(seed))
        assert a.tolist() == b.tolist()
        c, _ = whole.select(_scored(losses), 6, torch.Generator().manual_seed(seed))
        assert c.tolist() == torch.randperm(30, generator=torch.Generator().manual_seed(seed))[:6].tolist()


def test_a_uniform_share_outside_zero_to_one_is_refused():
    for share in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"uniform_share must be in \[0, 1\]"):
            curate.pipeline(make_samples(20), rule="uniform", method="sample", batch_size=4, uniform_share=share)


def test_a_pipeline_with_a_uniform_share_trains_on_both_and_refuses_a_state_without_it():
    data = make_samples(400)
    learner, reference = linear_models()
    kwargs = dict(learner=learner, reference=reference, scorer=curate.ClassificationScorer(), method="topk",
                  batch_size=10, filter_ratio=0.8, shuffle_buffer=0)
    plain, mixed = curate.pipeline(data, **kwargs), curate.pipeline(data, uniform_share=0.5, **kwargs)
    plain_keys = [b["__key__"] for b in plain]  # top-k: the 10 best of each superbatch, best first
    mixed_keys = [set(b["__key__"]) for b in mixed]
    assert len(mixed_keys) == len(plain_keys) == 8 and all(len(m) == 10 for m in mixed_keys)
    # 5 uniform picks and the 5 best of the rest: the superbatch's 5 best are in the batch either way
    assert all(set(p[:5]) <= m for p, m in zip(plain_keys, mixed_keys, strict=True))
    assert sum(m != set(p) for p, m in zip(plain_keys, mixed_keys, strict=True)) >= 6
    with pytest.raises(ValueError, match="uniform_share"):
        curate.pipeline(data, uniform_share=0.5, **kwargs).load_state_dict(plain.state_dict())


class _TwoRanks(curate.LocalScope):
    """The selection's view of a 2-rank global scope: rank r trains on positions [r·b, (r+1)·b) of its picks."""

    world_size = 2


def test_with_a_global_scope_every_rank_gets_its_own_uniform_share():
    n, b = 20, 4  # per rank: 2 uniform picks and 2 by top-k
    losses = torch.arange(n, dtype=torch.float32)
    select = curate.JointSelect(None, b, "topk", uniform_share=0.5, scope=_TwoRanks())  # type: ignore[arg-type]
    for seed in range(20):
        idx, _ = select.select(_scored(losses), 2 * b, torch.Generator().manual_seed(seed))
        given = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:4].tolist()
        best = [j for j in range(n) if j not in given][:4]
        ranks = idx.view(2, b).tolist()
        assert [r[:2] for r in ranks] == [given[:2], given[2:]]
        assert ranks[0][2:] + ranks[1][2:] == best
