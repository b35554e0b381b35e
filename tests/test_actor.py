"""ACL actor: a small proxy trained online by the pipeline on each selected batch, scoring instead of the learner."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

import curate
from curate.actor import Actor
from curate.batch import take
from curate.scorers import score_model

from .conftest import check_resume

B, b = 40, 8
SCORER = curate.ClassificationScorer()


def _blobs(n, seed, n_classes=4, dim=8):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(99)) * 1.5
    y = torch.randint(n_classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    return [{"__key__": f"a{seed}-{i}", "input": x[i], "target": y[i]} for i in range(n)]


def _actor_model(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(8, 4)


def _learner(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))


def _held_out_loss(model, data):
    batch = default_collate(data)
    with torch.no_grad():
        return float(F.cross_entropy(model(batch["input"]), batch["target"]))


def _run(data, prefetch=0, lr=0.2):
    model = _actor_model()
    actor = Actor(model, torch.optim.SGD(model.parameters(), lr=lr))
    pipe = curate.pipeline(data, batch_size=b, superbatch_size=B, learner=actor, scorer=SCORER, rule="hard_learner",
                           method="topk", shuffle_buffer=0, prefetch=prefetch)
    return [batch["__key__"] for batch in pipe], model, pipe


def _replay(data, score_with, lr=0.2):
    """By hand: keep the top-b of `score_with(superbatch)`; train a fresh actor copy on what was kept."""
    model = _actor_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    keys = []
    for start in range(0, len(data), B):
        superbatch = default_collate(data[start:start + B])
        loss = score_with(model, superbatch)
        batch = take(superbatch, torch.topk(loss, b).indices)
        keys.append(batch["__key__"])
        opt.zero_grad()
        F.cross_entropy(model(batch["input"]), batch["target"], reduction="none").mean().backward()
        opt.step()
    return keys


def test_actor_is_trained_and_its_held_out_loss_falls():
    data, held_out = _blobs(B * 20, seed=0), _blobs(400, seed=1)
    before = _held_out_loss(_actor_model(), held_out)
    _, model, pipe = _run(data)
    after = _held_out_loss(model, held_out)
    assert after < 0.5 * before, f"{before=:.3f} {after=:.3f}"
    stats = pipe.stats()
    assert stats["actor_updates"] == 20 and stats["actor_last_loss"] < stats["actor_loss_mean"]
    assert stats["score_lag_steps"] == 0


def test_selection_uses_the_actors_scores():
    data = _blobs(B * 12, seed=0)
    keys, _, _ = _run(data)
    by_actor = _replay(data, lambda actor, sb: score_model(actor, sb, SCORER, 1024).loss)
    learner = _learner()
    by_learner = _replay(data, lambda actor, sb: score_model(learner, sb, SCORER, 1024).loss)
    assert keys == by_actor  # each superbatch: the top-b of the actor as trained on every batch before it
    assert keys != by_learner
    frozen = _actor_model()  # and the actor is updated between superbatches (not scoring with its init)
    assert keys != _replay(data, lambda actor, sb: score_model(frozen, sb, SCORER, 1024).loss)


def test_prefetch_trains_the_actor_in_order_so_nothing_changes():
    data = _blobs(B * 10, seed=2)
    keys, model, _ = _run(data, prefetch=0)
    prefetched, prefetched_model, pipe = _run(data, prefetch=1)
    assert keys == prefetched
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), prefetched_model.parameters(), strict=True))
    assert pipe.stats()["score_lag_steps"] == 0


def test_pipeline_with_actor_resumes_exactly():
    data = _blobs(B * 6, seed=3)
    model = _actor_model()
    actor = Actor(model, torch.optim.Adam(model.parameters(), lr=0.05))
    initial = actor.state_dict()

    def build():  # every build starts from the same actor: the checkpoint carries the actor's state
        actor.load_state_dict(initial)
        return curate.pipeline(data, batch_size=b, superbatch_size=B, learner=actor, scorer=SCORER,
                               rule="hard_learner", method="sample", shuffle_buffer=50, seed=4)

    check_resume(build, points=[1, 3])


def test_custom_loss_fn_trains_the_actor():
    data = _blobs(B * 5, seed=4)
    model = _actor_model()
    seen = []

    def loss_fn(model, batch):
        seen.append(len(batch["__key__"]))
        return F.cross_entropy(model(batch["input"]), batch["target"], reduction="none")

    actor = Actor(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=loss_fn)
    before = copy.deepcopy(model.state_dict())
    list(curate.pipeline(data, batch_size=b, superbatch_size=B, learner=actor, scorer=SCORER, rule="hard_learner",
                         method="topk", shuffle_buffer=0))
    assert seen == [b] * 5 and not torch.equal(before["weight"], model.weight)


def test_bad_actor_input():
    model = _actor_model()
    with pytest.raises(ValueError, match="an optimizer is required"):
        Actor(model, None)
    with pytest.raises(ValueError, match="holds none of the model's parameters"):
        Actor(model, torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        Actor("model", torch.optim.SGD(model.parameters(), lr=0.1))
    mean_loss = Actor(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      loss_fn=lambda m, batch: F.cross_entropy(m(batch["input"]), batch["target"]))
    with pytest.raises(ValueError, match=r"per-example, shape \(8,\)"):
        mean_loss.update(default_collate(_blobs(8, seed=5)), SCORER)
