"""ACL's actor: a small proxy learner, trained online on the selected batches, that scores instead of the learner.

Scoring B candidates with a large learner can cost more than training it on b of them. ACL (Evans et
al., 2023) scores with a small model trained alongside on the same selected batches: its losses track
the learner's, at a fraction of the FLOPs (see the FLOP ledger in `Pipeline.stats()`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchdata.nodes import BaseNode

from .batch import batch_size_of
from .flops import FlopLedger
from .scorers import ModelScores, Scorer, score_model
from .stage import LAST, SUM, Stage

__all__ = ["Actor", "TrainActor"]


class Actor:
    """A small model trained online on each selected batch and used for scoring; pass it as `learner=`.

    Args:
        model: the proxy model; scored like a learner (same scorer).
        optimizer: updates `model`; one step per selected batch.
        loss_fn: `loss_fn(model, batch) -> per-example losses (b,)` with grad, to train on. Default: the
            scorer's per-example loss (`scorer(model, batch).loss`), i.e. the learner's objective.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, loss_fn: Callable | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Actor: model must be an nn.Module, got {type(model).__name__}")
        if optimizer is None:
            raise ValueError("Actor: an optimizer is required: the actor trains on every selected batch, e.g. "
                             "Actor(model, torch.optim.AdamW(model.parameters(), lr=1e-3))")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Actor: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        owned = {id(p) for p in model.parameters()}
        if not any(id(p) in owned for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("Actor: the optimizer holds none of the model's parameters; build it from "
                             "model.parameters()")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"Actor: loss_fn must be a function (model, batch) -> losses, got {loss_fn!r}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.counts: dict[str, Any] = {"updates": 0, "trained": 0, "loss_sum": 0.0, "last_loss": None}

    def scores(self, batch: dict, scorer: Scorer, micro_batch_size: int = 1024) -> ModelScores:
        """The actor's scores of `batch` (the `ScoreProvider` protocol)."""
        return score_model(self.model, batch, scorer, micro_batch_size)

    def update(self, batch: dict, scorer: Scorer) -> float:
        """One optimizer step on the mean per-example loss of `batch`; returns that loss."""
        self.model.train()
        losses = self.loss_fn(self.model, batch) if self.loss_fn else scorer(self.model, batch).loss
        n = batch_size_of(batch)
        if not isinstance(losses, Tensor) or losses.shape != (n,):
            raise ValueError(f"Actor: the training loss must be per-example, shape ({n},), got "
                             f"{getattr(losses, 'shape', type(losses).__name__)}")
        loss = losses.mean()
        if not torch.isfinite(loss):
            raise ValueError(f"Actor: non-finite training loss {float(loss)} on keys {batch.get('__key__', [])[:10]}; "
                             "lower the actor's learning rate or check those inputs")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        value = float(loss.detach())
        self.counts.update(updates=self.counts["updates"] + 1, trained=self.counts["trained"] + n,
                           loss_sum=self.counts["loss_sum"] + value, last_loss=value)
        return value

    def state_dict(self) -> dict:
        """Copies of the model's and optimizer's state and the counts (the actor keeps training in place)."""
        return copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "counts": self.counts})

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.counts = dict(state["counts"])

    def stats(self) -> dict:
        c = self.counts
        mean = c["loss_sum"] / c["updates"] if c["updates"] else None
        return {"actor_updates": c["updates"], "actor_loss_mean": mean, "actor_last_loss": c["last_loss"]}


class TrainActor(Stage[dict]):
    """Trains the actor on each selected batch, then passes the batch on.

    The actor's weights are part of this stage's state, so a resumed pipeline scores with the actor
    as it was at the checkpoint.

    Args:
        source: node of selected batches (`JointSelect`).
        actor: the `Actor` that scored them.
        scorer: gives the actor's per-example training loss unless the actor has a `loss_fn`.
        count_flops: measure the actor's training FLOPs (forward + backward) on its first update.
    """

    gauges = {"flops_per_sample": LAST, "actor_training_flops": SUM, "actor_updates": LAST, "actor_loss_mean": LAST,
              "actor_last_loss": LAST}

    def __init__(self, source: BaseNode, actor: Actor, scorer: Scorer, count_flops: bool = True):
        super().__init__(source)
        self.actor, self.scorer, self.count_flops = actor, scorer, count_flops
        self.ledger = FlopLedger()

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        if initial_state is not None:  # a new epoch (None) keeps the actor as trained so far
            self.actor.load_state_dict(initial_state["actor"])
            self.ledger.load(initial_state["ledger"])

    def next(self) -> dict:
        batch = next(self.source)
        fn = lambda: self.actor.update(batch, self.scorer)  # noqa: E731
        self.ledger.run("actor_train", batch_size_of(batch), fn) if self.count_flops else fn()
        return batch

    def get_state(self) -> dict:
        return {**super().get_state(), "actor": self.actor.state_dict(), "ledger": self.ledger.state()}

    def stats(self) -> dict:
        out = self.actor.stats()
        if self.count_flops:
            out["flops_per_sample"] = dict(self.ledger.per_sample)
            out["actor_training_flops"] = self.ledger.total("actor_train")
        return out
