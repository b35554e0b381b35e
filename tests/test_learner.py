"""curate.learner: every kind of learner= resolves to one LearnerSide (provider, ledger role, sync, lag, trained)."""

import pytest
import torch
from torch import nn

import curate
from curate.learner import as_provider, resolve_learner

SCORER = curate.ClassificationScorer()


def _model():
    torch.manual_seed(0)
    return nn.Linear(8, 3)


def test_a_module_is_scored_live_and_its_scoring_forward_is_its_training_forward():
    model = _model()
    side = resolve_learner(model)
    assert isinstance(side.provider, curate.ModelProvider) and side.provider.model is model
    assert (side.role, side.sync, side.trained, side.scores_training_forward, side.lag) == ("learner", None, model,
                                                                                            True, 0)
    other = _model()
    assert not resolve_learner(model, train_model=other).scores_training_forward  # another model trains


def test_a_prefetched_module_scores_from_a_sync_made_for_it_one_step_behind():
    model = _model()
    side = resolve_learner(model, prefetch=1)
    assert isinstance(side.provider, curate.WeightSync) and side.sync is side.provider and side.owns_sync
    assert side.lag == 1 and side.trained is model
    with pytest.raises(ValueError, match="prefetch must be 0 or 1"):
        resolve_learner(model, prefetch=2)


def test_a_weight_sync_lags_by_its_staleness_plus_the_read_ahead():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sync = curate.WeightSync(model, every=3).attach(optimizer)
    for _ in range(4):
        optimizer.step()
    assert resolve_learner(sync).lag == 1 and resolve_learner(sync, prefetch=1).lag == 2
    side = resolve_learner(sync)
    assert side.trained is model and side.scores_training_forward and not side.owns_sync


def test_an_actor_is_its_own_ledger_role_and_never_lags():
    proxy = _model()
    actor = curate.Actor(proxy, torch.optim.SGD(proxy.parameters(), lr=0.1))
    side = resolve_learner(actor, prefetch=1, train_model=_model())
    assert (side.role, side.actor, side.lag, side.scores_training_forward) == ("actor", actor, 0, False)
    assert resolve_learner(side) is side  # resolved once


def test_providers_must_take_micro_batch_size_and_anything_else_is_refused():
    class Old:
        def scores(self, batch, scorer):
            return None

    with pytest.raises(TypeError, match="must take micro_batch_size"):
        resolve_learner(Old())
    with pytest.raises(TypeError, match="must be an nn.Module or a ScoreProvider"):
        as_provider(42, "reference")
