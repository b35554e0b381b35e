"""The Stage base and chain stats: a hand-built chain of public stages is what curate.pipeline() builds."""

import pytest
import torch
from torch import nn
from torchdata.nodes import BaseNode

import curate
from curate.stage import LAST, MAX, SUM, Counter, Stage, chain, chain_stats

from .conftest import assert_same_item, check_resume, make_pairs, make_samples, roundtrip, tiny_clip


def _classification():
    torch.manual_seed(0)
    learner, reference = nn.Linear(8, 3), nn.Linear(8, 3)
    options = dict(learner=learner, reference=reference, scorer=curate.ClassificationScorer(), rule="learnability",
                   method="sample", batch_size=8, superbatch_size=40, shuffle_buffer=50, seed=4)

    def by_hand(data):
        node = curate.Shuffle(curate.Source(data), 80, seed=4)  # pipeline() rounds the block to whole superbatches
        node = curate.Superbatch(node, 40)
        node = curate.Score(node, learner, reference, curate.ClassificationScorer(), "learnability")
        node = curate.JointSelect(node, 8, "sample", seed=4, superbatch_size=40)
        return curate.Pipeline(node)  # the learner's scoring forward is its training forward: the ledger has it

    return options, by_hand


def _jest():
    learner, reference = tiny_clip("sigmoid"), tiny_clip("sigmoid", seed=1)
    options = dict(learner=learner, reference=reference, scorer=curate.ContrastiveScorer(), method="joint",
                   batch_size=6, superbatch_size=24, n_chunks=3, shuffle_buffer=30, seed=2)

    def by_hand(data):
        node = curate.Shuffle(curate.Source(data), 48, seed=2)
        node = curate.Superbatch(node, 24)
        node = curate.Score(node, learner, reference, curate.ContrastiveScorer())
        node = curate.JointSelect(node, 6, "joint", n_chunks=3, seed=2, superbatch_size=24)
        return curate.Pipeline(node)

    return options, by_hand


def _timeless(state):
    """A state without wall-clock figures (score_seconds)."""
    if isinstance(state, dict):
        return {k: _timeless(v) for k, v in state.items() if k != "score_seconds"}
    return state


@pytest.mark.parametrize("case, data", [(_classification, lambda: make_samples(300)),
                                        (_jest, lambda: make_pairs(120))], ids=["classification", "jest"])
def test_a_hand_built_chain_gives_the_same_batches_state_and_stats_as_pipeline(case, data):
    options, by_hand = case()
    built, hand = curate.pipeline(data(), **options), by_hand(data())
    for epoch in range(2):
        a, b = list(built), list(hand)
        assert len(a) == len(b) > 2, epoch
        assert_same_item(a, b, where=f"epoch {epoch}")
        # the chains' states are the same; what each knows of its configuration differs (pipeline()'s options,
        # a hand-built chain's stage list), so neither loads the other's state by mistake
        states = [roundtrip(pipe.state_dict()) for pipe in (built, hand)]
        assert states[0]["curate"]["config"]["stages"] == states[1]["curate"]["config"]["stages"]
        assert_same_item(*[_timeless({k: v for k, v in st.items() if k != "curate"}) for st in states],
                         where=f"state, epoch {epoch}")
        stats, hand_stats = built.stats(), hand.stats()
        stats.pop("score_seconds"), hand_stats.pop("score_seconds")  # wall-clock
        assert stats == hand_stats
    assert stats["seen"] == 2 * len(data()) and stats["training_flops"] > 0 and stats["flops_overhead"] > 0
    check_resume(lambda: by_hand(data()), points=[1])  # the hand-built chain resumes exactly too


def test_a_hand_built_prefetching_chain_reports_the_lag_pipeline_reports():
    data = make_samples(200)
    torch.manual_seed(0)
    learner, reference = nn.Linear(8, 3), nn.Linear(8, 3)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    sync = curate.WeightSync(learner).attach(optimizer)
    options = dict(learner=sync, reference=reference, scorer=curate.ClassificationScorer(), method="topk",
                   batch_size=8, superbatch_size=40, shuffle_buffer=0, prefetch=1)
    node = curate.Superbatch(curate.Source(data), 40)
    node = curate.Score(node, sync, reference, curate.ClassificationScorer())
    node = curate.Prefetch(curate.JointSelect(node, 8, "topk", superbatch_size=40), sync)
    for pipe in (curate.pipeline(data, **options), curate.Pipeline(node)):
        for batch in pipe:
            optimizer.zero_grad()
            nn.functional.cross_entropy(learner(batch["input"]), batch["target"]).backward()
            optimizer.step()
        stats = pipe.stats()
        assert (stats["prefetch"], stats["score_lag_steps"], stats["sync"]["staleness"]) == (1, 1, 0)
    live = curate.Score(curate.Superbatch(curate.Source(data), 40), learner, reference, curate.ClassificationScorer())
    with pytest.raises(ValueError, match="scores the live learner"):
        curate.Prefetch(curate.JointSelect(live, 8, "topk"))


class CountsEvens(Stage[dict]):
    """A user's own stage: declares a counter, and the pipeline's stats report it with no other change."""

    counters = {"evens": Counter(SUM), "largest": Counter(MAX), "last_key": Counter(LAST, "")}

    def next(self) -> dict:
        batch = next(self.source)  # stages pass collated batches
        numbers = [int(key[1:]) for key in batch["__key__"]]
        self.counts["evens"] += sum(number % 2 == 0 for number in numbers)
        self.counts["largest"] = max(self.counts["largest"], *numbers)
        self.counts["last_key"] = batch["__key__"][-1]
        return batch


def test_a_new_stage_reports_by_declaring_its_counters_and_resumes():
    data = make_samples(100)

    def build():
        node = CountsEvens(curate.Source(data, group_size=10))
        node = curate.Superbatch(node, 20)
        node = curate.Score(node, scorer=curate.ClassificationScorer(), rule="uniform")
        return curate.Pipeline(curate.JointSelect(node, 5, "sample"))

    pipe = build()
    list(pipe)
    stats = pipe.stats()
    assert (stats["evens"], stats["largest"], stats["last_key"]) == (50, 99, "s00099")
    assert stats["seen"] == 100 and stats["kept"] == 25
    check_resume(build, points=[2])
    resumed = build()
    it = iter(pipe)
    next(it)
    resumed.load_state_dict(roundtrip(pipe.state_dict()))
    list(resumed), list(it)  # both to the end of epoch 2
    after, before = _timeless(resumed.stats()), _timeless(pipe.stats())
    assert after == before and after["evens"] == 100  # counters come back with the state and run across epochs


def test_stats_merge_as_declared_across_ranks_and_a_stage_must_declare_what_it_reports():
    node = CountsEvens(curate.Source(make_samples(10)))
    ranks = [[{}, {"evens": 3, "largest": 9, "last_key": "a"}], [{}, {"evens": 4, "largest": 12, "last_key": "b"}]]
    assert chain_stats(chain(node), ranks) == {"evens": 7, "largest": 12, "last_key": "a"}

    class Undeclared(Stage[dict]):
        def next(self):
            return next(self.source)

        def stats(self):
            return {"mystery": 1}

    with pytest.raises(TypeError, match="reports 'mystery' without declaring how it merges"):
        chain_stats(chain(Undeclared(node)))


def test_chain_walks_from_the_source_and_names_stages_by_type():
    source = curate.Source(make_samples(10))
    rank_split = curate.RankSplit(source, 0, 2)
    shuffle = curate.Shuffle(rank_split, 4)
    assert chain(shuffle) == [source, rank_split, shuffle]
    pipe = curate.Pipeline(shuffle)
    assert list(pipe.stages) == ["source", "rank_split", "shuffle"] and pipe.stages["shuffle"] is shuffle
    assert isinstance(pipe.root, BaseNode)
