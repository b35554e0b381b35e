"""`selection_warmup`: the first N batches drawn uniformly from their superbatches, nothing scored, then selection."""

import pytest
import torch

import curate
from curate.seeding import make_generator

from .conftest import check_resume, linear_models, make_samples, roundtrip

B, b = 50, 10  # superbatch and batch: filter_ratio 0.8


def _pipeline(data, warmup: int = 0, learner=None, reference=None, **over):
    if learner is None:
        learner, reference = linear_models()
    options = dict(learner=learner, reference=reference, scorer=curate.ClassificationScorer(), method="topk",
                   batch_size=b, superbatch_size=B, shuffle_buffer=0, seed=5, selection_warmup=warmup)
    return curate.pipeline(data, **{**options, **over})


def _forwards(model: torch.nn.Module) -> list[int]:
    """A list that grows by one at each forward of `model`."""
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_warmup_batches_are_uniform_draws_scored_by_no_model_and_then_selection_is_unchanged():
    data = make_samples(400)  # 8 superbatches of 50, in order (no shuffle)
    learner, reference = linear_models()
    calls = _forwards(learner), _forwards(reference)
    warm = [batch["__key__"] for batch in _pipeline(data, 3, learner, reference, count_flops=False)]
    assert [len(c) for c in calls] == [5, 5]  # one forward per model per scored superbatch: the last 5 of 8
    plain = [batch["__key__"] for batch in _pipeline(data, count_flops=False)]
    for step in range(3):  # uniform: the selection's seeded draw of b of the superbatch's B, whatever the scores
        order = torch.randperm(B, generator=make_generator(5, "select", 0, step))[:b]
        assert warm[step] == [data[step * B + i]["__key__"] for i in order.tolist()]
        assert warm[step] != plain[step]  # top-k of the untrained models' scores picks otherwise
    assert warm[3:] == plain[3:]  # the models did not change, so their selection is the plain run's


def test_warmup_is_counted_over_epochs():
    data = make_samples(100)  # 2 superbatches per epoch; a warmup of 3 ends in the second epoch
    p, counts = _pipeline(data, 3), []
    for _ in range(3):
        list(p)
        counts.append(p.stats()["warmup_batches"])
    assert counts == [2, 3, 3]
    plain = _pipeline(data)
    epochs = [[batch["__key__"] for batch in plain] for _ in range(3)]
    again = _pipeline(data, 3)
    warm = [[batch["__key__"] for batch in again] for _ in range(3)]
    assert warm[0] != epochs[0] and warm[1][0] != epochs[1][0]
    assert warm[1][1] == epochs[1][1] and warm[2] == epochs[2]
    for e in (1, 2):  # open_clip's resume: a fresh pipeline told its epoch counts the epochs before as trained
        fresh = _pipeline(data, 3)
        fresh.set_epoch(e)
        assert [batch["__key__"] for batch in fresh] == warm[e]


def test_a_loop_that_cuts_its_epochs_short_still_gets_the_whole_warmup():
    p = _pipeline(make_samples(200), 5)  # 4 batches per epoch; the loop takes 2 of each, calling set_epoch as open_clip
    for epoch in range(3):
        p.set_epoch(epoch)
        it = iter(p)
        next(it), next(it)
    assert p.stats()["warmup_batches"] == 5 and p.stats()["superbatches"] == 6


def test_set_epoch_on_a_source_of_unknown_length_restarts_the_warmup_and_says_so(caplog):
    data = make_samples(100)
    fresh = _pipeline(iter(data), 3)
    with caplog.at_level("WARNING", logger="curate.score"):
        fresh.set_epoch(1)
        list(fresh)
    assert "selection warmup of 3 batches starts again" in caplog.text and "batches_per_epoch=" in caplog.text
    assert fresh.stats()["warmup_batches"] == 2


def test_a_run_resumed_inside_or_after_the_warmup_continues_as_the_uninterrupted_one():
    # epochs of 3 batches, a warmup of 4: checkpoints in the warmup, at its end, and after it
    check_resume(lambda: _pipeline(make_samples(150), 4), points=[1, 2])


def test_scoring_flops_count_only_scored_superbatches_and_training_flops_every_batch():
    data = make_samples(400)
    p = _pipeline(data, 3)
    list(p)
    stats = p.stats()
    per_sample = stats["flops_per_sample"]
    assert per_sample["learner"] > 0 and per_sample["reference"] > 0
    assert stats["scoring_flops"] == pytest.approx((per_sample["learner"] + per_sample["reference"]) * 5 * B)
    # training is measured apart (the warmup trains before any scoring forward): the learner's forward, ×3
    assert per_sample["train"] == pytest.approx(per_sample["learner"])
    assert stats["training_flops"] == pytest.approx(3 * per_sample["train"] * 8 * b)
    early = _pipeline(data, 3)
    next(iter(early))  # a batch of the warmup: trained, so counted, though nothing is scored yet
    assert early.stats()["training_flops"] == pytest.approx(3 * per_sample["train"] * b)
    assert early.stats()["scoring_flops"] == 0
    # score means are over the scored superbatches: the plain run over the same 5 superbatches reports the same
    tail = _pipeline(data[3 * B:])
    list(tail)
    assert stats["warmup_batches"] == 3 and stats["seen"] == 400 and stats["kept"] == 80
    assert stats["score_mean"] == pytest.approx(tail.stats()["score_mean"])
    assert stats["kept_score_mean"] == pytest.approx(tail.stats()["kept_score_mean"])


def test_the_sampling_entropy_is_over_the_sampled_superbatches():
    data = make_samples(400)
    warm, tail = _pipeline(data, 3, method="sample"), _pipeline(data[3 * B:], method="sample")
    list(warm), list(tail)
    # other seeds (the tail's superbatch 0 is the warm run's 3) draw other samples from the same distributions
    assert warm.stats()["chunk_entropy"]["first"] == pytest.approx(tail.stats()["chunk_entropy"]["first"])


def test_a_global_scope_warmup_draws_every_ranks_batch_from_the_whole_superbatch():
    class TwoRanks(curate.LocalScope):
        world_size = 2

    select = curate.JointSelect(None, 4, "topk", scope=TwoRanks())  # type: ignore[arg-type]
    batch = {"__key__": [str(i) for i in range(20)]}
    scored = curate.ScoredSuperbatch(batch, None, None, curate.RULES["learnability"], 20, uniform=True)
    for seed in range(5):  # top-k of a superbatch no model scored: refused, except in the warmup
        idx, _ = select.select(scored, 8, torch.Generator().manual_seed(seed))
        assert idx.tolist() == torch.randperm(20, generator=torch.Generator().manual_seed(seed))[:8].tolist()


def test_a_bad_warmup_and_a_state_of_another_warmup_are_refused():
    data = make_samples(100)
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="selection_warmup must be a non-negative int"):
            _pipeline(data, bad)  # type: ignore[arg-type]
    plain = _pipeline(data)
    next(iter(plain))
    with pytest.raises(ValueError, match="selection_warmup"):
        _pipeline(data, 2).load_state_dict(roundtrip(plain.state_dict()))


def _without(state, names: set[str]):
    """`state` with these keys removed wherever they are, and Score's superbatch count (its state is the one with a
    ledger): a state saved before they existed."""
    if isinstance(state, dict):
        drop = names | ({"superbatches"} if "ledger" in state else set())
        return {k: _without(v, names) for k, v in state.items() if k not in drop}
    return state


def test_a_state_saved_before_the_warmup_counters_existed_still_loads():
    data = make_samples(200)
    whole = [batch["__key__"] for batch in _pipeline(data)]
    first = _pipeline(data)
    it = iter(first)
    head = [next(it)["__key__"] for _ in range(2)]
    old = _without(roundtrip(first.state_dict()), {"warmup_batches", "_warmup_seen", "_warmup_kept"})
    resumed = _pipeline(data)
    resumed.load_state_dict(old)
    assert head + [batch["__key__"] for batch in resumed] == whole
    assert resumed.stats()["warmup_batches"] == 0 and resumed.stats()["kept"] == 4 * b
