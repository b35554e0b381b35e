"""The learner side, resolved once: what scores in the learner's place, how stale it is, what training costs.

`resolve_learner` turns whatever is passed as `learner=` (an `nn.Module`, a model wrapped in
DistributedDataParallel, a `WeightSync`, an ACL `Actor`, or any `ScoreProvider`) into one `LearnerSide`, so
the stages never switch on its type: the Score stage scores with `provider` and names its FLOPs `role`; a
prefetch thread scores from `sync`; `TrainActor` trains `actor`; the ledger measures `trained`'s forward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

from .actor import Actor
from .scorers import ModelProvider, ScoreProvider
from .sync import WeightSync

__all__ = ["LearnerSide", "as_provider", "resolve_learner", "unwrap_ddp"]


@dataclass(frozen=True)
class LearnerSide:
    """What scores in the learner's place, and what the pipeline needs to know about it.

    Args:
        provider: scores superbatches for the learner side.
        role: its name in the FLOP ledger: "learner", or "actor" for an ACL actor.
        sync: the snapshot `provider` reads, when the weights may change while it scores (a background thread
            or DataLoader workers); None when it scores live weights or weights it trains itself.
        owns_sync: the pipeline made `sync` (a prefetching pipeline over a plain module) and pushes it.
        actor: the ACL actor, trained on every selected batch; None otherwise.
        trained: the model the selected batches train (for the ledger's training FLOPs); None when unknown.
        scores_training_forward: `provider` runs `trained`'s own forward, so the ledger's measurement of the
            scoring forward is also the training forward's (no second measuring forward).
        read_ahead: superbatches scored before the batch in training is trained on (1 with a prefetch thread),
            each one step of lag; 0 for an actor, which is trained and scores in order in that thread.
    """

    provider: ScoreProvider
    role: str = "learner"
    sync: WeightSync | None = None
    owns_sync: bool = False
    actor: Actor | None = None
    trained: nn.Module | None = None
    scores_training_forward: bool = False
    read_ahead: int = 0

    @property
    def lag(self) -> int:
        """Optimizer steps between the weights that score a superbatch and the weights its batch trains."""
        staleness = self.sync.staleness if self.sync is not None else 0  # a sync made here is pushed every batch: 0
        return self.read_ahead + staleness


def unwrap_ddp(model):
    """The module inside DistributedDataParallel: its forward would synchronise buffers across ranks, a collective
    the pipeline (maybe in a prefetch thread) must not start."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def as_provider(model, name: str) -> ScoreProvider:
    """A model (scored live) or a `ScoreProvider` as a provider; anything else is a TypeError naming `name`."""
    model = unwrap_ddp(model)
    if isinstance(model, nn.Module):
        return ModelProvider(model)
    if not callable(getattr(model, "scores", None)):
        raise TypeError(f"Score: {name} must be an nn.Module or a ScoreProvider (with .scores(batch, scorer, "
                        f"micro_batch_size)), got {type(model).__name__}")
    if "micro_batch_size" not in inspect.signature(model.scores).parameters:  # once, here: not per superbatch
        raise TypeError(f"Score: {name}.scores must take micro_batch_size (the ScoreProvider protocol: "
                        f"scores(batch, scorer, micro_batch_size)); add it to {type(model).__name__}.scores")
    return model


def resolve_learner(learner, *, prefetch: int = 0, train_model: nn.Module | None = None) -> LearnerSide:
    """The `LearnerSide` of `learner=` (see the module docstring).

    Args:
        learner: an `nn.Module` (or DDP model), `WeightSync`, `Actor`, `ScoreProvider`, or an already resolved
            `LearnerSide` (returned as is).
        prefetch: 1 when superbatches are scored in a background thread: a plain module is then scored from a
            `WeightSync` copy made here (the live one is rewritten by the optimizer meanwhile).
        train_model: the model trained on the batches, when it is not the learner (an actor or a provider
            scores in its place); a DDP model is measured through its `.module`.
    """
    if isinstance(learner, LearnerSide):
        return learner
    learner, train_model = unwrap_ddp(learner), unwrap_ddp(train_model)
    if prefetch not in (0, 1):
        raise ValueError(f"resolve_learner: prefetch must be 0 or 1, got {prefetch=}")
    if isinstance(learner, Actor):
        return LearnerSide(learner, role="actor", actor=learner, trained=train_model)
    if isinstance(learner, WeightSync):
        live = learner.learner
        return LearnerSide(learner, sync=learner, trained=train_model or live,
                           scores_training_forward=train_model in (None, live), read_ahead=prefetch)
    if isinstance(learner, nn.Module):
        same = train_model in (None, learner)
        if prefetch:
            sync = WeightSync(learner)  # pushed by Prefetch at every hand-out
            return LearnerSide(sync, sync=sync, owns_sync=True, trained=train_model or learner,
                               scores_training_forward=same, read_ahead=1)
        return LearnerSide(ModelProvider(learner), trained=train_model or learner, scores_training_forward=same)
    return LearnerSide(as_provider(learner, "learner"), trained=train_model, read_ahead=prefetch)
