"""curate.learner: every kind of learner= resolves to one LearnerSide (provider, ledger role, sync, trained model)."""

import pytest
import torch
from torch import nn

import curate
from curate.learner import as_provider, resolve_learner

from .conftest import make_samples

SCORER = curate.ClassificationScorer()


def _model():
    torch.manual_seed(0)
    return nn.Linear(8, 3)


def test_a_module_is_scored_live_and_its_scoring_forward_is_its_training_forward():
    model = _model()
    side = resolve_learner(model)
    assert isinstance(side.provider, curate.ModelProvider) and side.provider.model is model and side.live
    assert (side.role, side.sync, side.trained, side.scores_training_forward, side.staleness) == (
        "learner", None, model, True, 0)
    assert not resolve_learner(model, train_model=_model()).scores_training_forward  # another model trains
    assert not resolve_learner(model, train_scorer=SCORER).scores_training_forward  # another forward trains


def test_a_prefetched_module_scores_from_a_sync_made_for_it():
    model = _model()
    side = resolve_learner(model, prefetch=1)
    assert isinstance(side.provider, curate.WeightSync) and side.sync is side.provider and side.owns_sync
    assert not side.live and side.trained is model and side.scores_training_forward
    with pytest.raises(ValueError, match="prefetch must be 0 or 1"):
        resolve_learner(model, prefetch=2)


def test_a_weight_sync_lags_by_its_staleness():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sync = curate.WeightSync(model, every=3).attach(optimizer)
    for _ in range(4):
        optimizer.step()
    side = resolve_learner(sync)
    assert side.staleness == 1 and side.trained is model and side.scores_training_forward and not side.owns_sync


def test_an_actor_is_its_own_ledger_role_and_scores_in_order():
    proxy = _model()
    actor = curate.Actor(proxy, torch.optim.SGD(proxy.parameters(), lr=0.1))
    trained = _model()
    side = resolve_learner(actor, prefetch=1, train_model=trained)
    assert (side.role, side.actor, side.in_order, side.scores_training_forward) == ("actor", actor, True, False)
    assert resolve_learner(side, train_model=trained) is side  # resolved once


def test_a_resolved_side_must_fit_the_pipeline_it_goes_into():
    side = resolve_learner(_model())
    with pytest.raises(ValueError, match="resolve it with prefetch=1"):
        curate.pipeline(make_samples(40), learner=side, scorer=SCORER, rule="hard_learner", batch_size=4, prefetch=1)
    with pytest.raises(ValueError, match="train_model differs"):
        resolve_learner(side, train_model=_model())


def test_providers_must_take_micro_batch_size_and_anything_else_is_refused():
    class Old:
        def scores(self, batch, scorer):
            return None

    with pytest.raises(TypeError, match="must take micro_batch_size"):
        resolve_learner(Old())
    with pytest.raises(TypeError, match="must be an nn.Module or a ScoreProvider"):
        as_provider(42, "reference")
