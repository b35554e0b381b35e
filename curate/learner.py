"""The learner side, resolved once: what scores in the learner's place, how stale it is, what training costs.

`resolve_learner` turns whatever is passed as `learner=` (an `nn.Module`, a model wrapped in
DistributedDataParallel, a `WeightSync`, an ACL `Actor`, or any `ScoreProvider`) into one `LearnerSide`, so
the stages never switch on its type: the Score stage scores with `provider` and names its FLOPs `role`; a
prefetch thread scores from `sync`; `TrainActor` trains `actor`; the ledger measures `trained`'s forward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import torch
from torch import nn

from .actor import Actor
from .scorers import ModelProvider, ScoreProvider, Scorer, model_device
from .sync import WeightSync, check_unsharded

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
        scores_training_forward: `provider` runs `trained`'s own training forward, so the ledger's measurement
            of the scoring forward is also the training forward's (no second measuring forward).
    """

    provider: ScoreProvider
    role: str = "learner"
    sync: WeightSync | None = None
    owns_sync: bool = False
    actor: Actor | None = None
    trained: nn.Module | None = None
    scores_training_forward: bool = False

    @property
    def live(self) -> bool:
        """It forwards the module the optimizer rewrites in place: not safe to score from a background thread."""
        return isinstance(self.provider, ModelProvider)

    @property
    def in_order(self) -> bool:
        """It is trained and scores in order in one thread (an actor): reading ahead adds no lag."""
        return self.actor is not None

    @property
    def device(self) -> torch.device | None:
        """Where its scoring model lives (None: a provider without a model, e.g. a ScoreCache)."""
        for name in ("model", "module"):  # ModelProvider and Actor; WeightSync
            model = getattr(self.provider, name, None)
            if isinstance(model, nn.Module):
                return model_device(model)
        return None

    @property
    def staleness(self) -> int:
        """Optimizer steps its weights lag the learner's by (a WeightSync's; a sync made here is pushed every batch)."""
        return self.sync.staleness if self.sync is not None else 0


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


def resolve_learner(learner, *, prefetch: int = 0, train_model: nn.Module | None = None,
                    train_scorer: Scorer | None = None) -> LearnerSide:
    """The `LearnerSide` of `learner=` (see the module docstring).

    Args:
        learner: an `nn.Module` (or DDP model), `WeightSync`, `Actor`, `ScoreProvider`, or an already resolved
            `LearnerSide` (returned as is, after checking it fits the other arguments). A sharded model (FSDP,
            FSDP2, DeepSpeed) is a ValueError: score it through a `WeightSync` of a full copy, or an `Actor`.
        prefetch: 1 when superbatches are scored in a background thread: a plain module is then scored from a
            `WeightSync` copy made here (the live one is rewritten by the optimizer meanwhile).
        train_model: the model trained on the batches, when it is not the learner (an actor or a provider
            scores in its place); a DDP model is measured through its `.module`.
        train_scorer: the training forward, when it is not the scoring one (e.g. Flexi-JEST's patch dropout
            scores a cheaper pass): the ledger then measures the training forward apart.
    """
    if prefetch not in (0, 1):
        raise ValueError(f"resolve_learner: prefetch must be 0 or 1, got {prefetch=}")
    train_model = unwrap_ddp(train_model)
    if isinstance(learner, LearnerSide):
        if prefetch and learner.live:
            raise ValueError("resolve_learner: this LearnerSide scores the live module, which a prefetch thread must "
                             "not read while the optimizer rewrites it; resolve it with prefetch=1")
        if train_model is not None and train_model is not learner.trained:
            raise ValueError("resolve_learner: train_model differs from the LearnerSide's trained model; pass it to "
                             "the resolve_learner call that made the side")
        return replace(learner, scores_training_forward=False) if train_scorer is not None else learner
    learner = unwrap_ddp(learner)
    check_unsharded(learner, "resolve_learner")
    own_forward = train_scorer is None  # the scoring forward is the training one unless told otherwise
    if isinstance(learner, Actor):
        return LearnerSide(learner, role="actor", actor=learner, trained=train_model)
    if isinstance(learner, WeightSync):
        live = learner.learner
        trained = live if train_model is None else train_model
        return LearnerSide(learner, sync=learner, trained=trained,
                           scores_training_forward=own_forward and trained is live)
    if isinstance(learner, nn.Module):
        trained = learner if train_model is None else train_model
        same = own_forward and trained is learner
        if prefetch:
            sync = WeightSync(learner)  # pushed by Prefetch at every hand-out
            return LearnerSide(sync, sync=sync, owns_sync=True, trained=trained, scores_training_forward=same)
        return LearnerSide(ModelProvider(learner), trained=trained, scores_training_forward=same)
    return LearnerSide(as_provider(learner, "learner"), trained=train_model)
