"""The Score stage: attaches learner and reference scores to every superbatch."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torchdata.nodes import BaseNode

from .batch import batch_size_of
from .flops import FlopLedger
from .rules import RULES, Rule, get_rule, needs_learner, needs_reference
from .scorers import Scores, score_model

__all__ = ["Score", "Scored", "ScoreProvider"]


@runtime_checkable
class ScoreProvider(Protocol):
    """Anything that scores a batch without being an nn.Module (a ScoreCache, a WeightSync snapshot)."""

    def scores(self, batch: dict, scorer: Any) -> Scores: ...


@dataclass
class Scored:
    """A superbatch with what selection needs: both models' scores and the rule that combines them."""

    batch: dict
    learner: Scores | None
    reference: Scores | None
    rule: Rule
    size: int

    @property
    def score(self) -> Tensor:
        """Per-example score (B,): rule(learner loss, reference loss); zeros when neither model is used."""
        if self.learner is None and self.reference is None:
            return torch.zeros(self.size)
        return self.rule(
            None if self.learner is None else self.learner.loss,
            None if self.reference is None else self.reference.loss,
        )

    @property
    def keys(self) -> list:
        return list(self.batch.get("__key__", range(self.size)))


class Score(BaseNode):
    """Scores each superbatch with the learner and the reference.

    Args:
        source: node of collated superbatches (`Superbatch`).
        learner: the model being trained (nn.Module), or a `ScoreProvider`. Not needed by rules that
            do not use it (`easy_reference`, `uniform`).
        reference: the frozen reference (nn.Module) or a `ScoreProvider` such as a `ScoreCache`.
        scorer: computes one model's `Scores` from a batch (`ClassificationScorer`, `ContrastiveScorer`).
        rule: a name from `curate.RULES` or a function `rule(learner, reference)`.
        micro_batch_size: samples per forward pass; bounds activation memory at large superbatches.
            Passed on to providers whose `scores` takes a `micro_batch_size` keyword (WeightSync, Actor).
        score_transform: applied to the superbatch before the scoring forwards only (the selected samples
            are trained on as they came), e.g. downsampled images for cheaper scoring (Flexi-JEST):
            `lambda batch: {**batch, "image": F.avg_pool2d(batch["image"], 2)}`. It may change each
            sample but must keep all of them, in order, and the fields a ScoreCache reads (`__key__`).
        count_flops: measure each model's forward FLOPs on the first superbatch (`curate.flops`).

    Non-finite losses or embeddings raise a ValueError naming the samples' keys: a NaN score would
    otherwise silently decide what is trained on.
    """

    def __init__(self, source: BaseNode, learner=None, reference=None, scorer=None, rule: str | Rule = "learnability",
                 micro_batch_size: int = 1024, score_transform: Callable[[dict], dict] | None = None,
                 count_flops: bool = True):
        super().__init__()
        self.rule = get_rule(rule) if isinstance(rule, str) else rule
        if needs_learner(self.rule) and learner is None:
            raise ValueError(f"Score: rule {_name(rule)!r} needs a learner; pass learner=model")
        if needs_reference(self.rule) and reference is None:
            raise ValueError(
                f"Score: rule {_name(rule)!r} needs a reference; pass reference=model or a ScoreCache, "
                "or use rule='hard_learner' / 'uniform'"
            )
        builtin = self.rule in RULES.values()
        # a built-in rule scores only with the models it reads; a custom rule gets whatever is given
        learner = learner if needs_learner(self.rule) or not builtin else None
        reference = reference if needs_reference(self.rule) or not builtin else None
        if (learner is not None or reference is not None) and scorer is None:
            raise ValueError("Score: scorer is required, e.g. curate.ClassificationScorer(input_key, target_key)")
        for name, model in (("learner", learner), ("reference", reference)):
            if model is not None and not isinstance(model, nn.Module | ScoreProvider):
                raise TypeError(f"Score: {name} must be an nn.Module or have .scores(batch, scorer), "
                                f"got {type(model).__name__}")
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ValueError(f"Score: micro_batch_size must be a positive int, got {micro_batch_size=}")
        if score_transform is not None and not callable(score_transform):
            raise TypeError(f"Score: score_transform must be a function batch -> batch, got {score_transform!r}")
        self.source, self.scorer, self.micro_batch_size = source, scorer, micro_batch_size
        self.learner, self.reference = learner, reference
        self.score_transform, self.count_flops = score_transform, count_flops
        self.counts = {"scored": 0, "score_seconds": 0.0}
        self.ledger = FlopLedger()

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        self.source.reset(None if initial_state is None else initial_state["source"])
        if initial_state is not None:
            self.counts = dict(initial_state["counts"])
            self.ledger.load(initial_state.get("ledger"))

    def _scores(self, role: str, model, batch: dict, n: int) -> Scores | None:
        if model is None:
            return None
        if isinstance(model, nn.Module):
            fn = lambda: score_model(model, batch, self.scorer, self.micro_batch_size)  # noqa: E731
        elif "micro_batch_size" in inspect.signature(model.scores).parameters:
            fn = lambda: model.scores(batch, self.scorer, micro_batch_size=self.micro_batch_size)  # noqa: E731
        else:
            fn = lambda: model.scores(batch, self.scorer)  # noqa: E731
        return self.ledger.run(role, n, fn) if self.count_flops else fn()

    def _transform(self, batch: dict, n: int) -> dict:
        fn = lambda: self.score_transform(batch)  # noqa: E731
        out = self.ledger.run("score_transform", n, fn) if self.count_flops else fn()
        if not isinstance(out, dict):
            raise TypeError(f"Score: score_transform must return a batch dict, got {type(out).__name__}")
        for name, value in out.items():
            if isinstance(value, Tensor) and value.ndim:
                rows = value.shape[0]
            else:
                rows = len(value) if isinstance(value, list | tuple) else n
            if rows != n:
                raise ValueError(f"Score: score_transform changed the batch size: field {name!r} has {rows} rows but "
                                 f"the superbatch has {n}; it may change each sample (e.g. downsample images) but "
                                 "must keep all of them, in order")
        return out

    def next(self) -> Scored:
        batch = next(self.source)
        self._check_keys(batch)
        start = time.perf_counter()
        n = batch_size_of(batch)
        scoring = batch if self.score_transform is None else self._transform(batch, n)
        learner = self._scores("learner", self.learner, scoring, n)
        reference = self._scores("reference", self.reference, scoring, n)
        if learner is not None and reference is not None:
            reference = reference.to(learner.image_emb.device if learner.contrastive else learner.loss.device)
        for name, scores in (("learner", learner), ("reference", reference)):
            if scores is not None:
                self._check_finite(name, scores, batch)
        self.counts["scored"] += n
        self.counts["score_seconds"] += time.perf_counter() - start
        return Scored(batch, learner, reference, self.rule, n)

    def _check_keys(self, batch: dict) -> None:
        for key in getattr(self.scorer, "keys", ()):
            if key not in batch:
                raise ValueError(
                    f"Score: the scorer reads field {key!r} but the samples have fields {sorted(batch)}; "
                    f"set the scorer's keys to match, e.g. {type(self.scorer).__name__}(...)"
                )

    @staticmethod
    def _check_finite(name: str, scores: Scores, batch: dict) -> None:
        bad = scores.nonfinite()
        if bad.any():
            idx = bad.nonzero().flatten().tolist()
            keys = [batch["__key__"][i] for i in idx] if "__key__" in batch else idx
            raise ValueError(
                f"Score: the {name} produced NaN/inf losses or embeddings for {len(idx)} samples "
                f"(keys {keys[:10]}{'...' if len(keys) > 10 else ''}); check those inputs and the model"
            )

    def get_state(self) -> dict:
        return {"source": self.source.state_dict(), "counts": dict(self.counts), "ledger": self.ledger.state()}

    def stats(self) -> dict:
        return dict(self.counts)


def _name(rule) -> str:
    return rule if isinstance(rule, str) else getattr(rule, "__name__", repr(rule))
