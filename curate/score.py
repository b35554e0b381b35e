"""The Score stage: attaches learner and reference scores to every superbatch."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torchdata.nodes import BaseNode

from .batch import BatchDict, batch_size_of
from .flops import FlopLedger
from .learner import LearnerSide, as_provider, resolve_learner
from .rules import Rule, RuleFn, as_rule
from .scorers import ModelScores, ScoreProvider, Scorer
from .stage import LAST, MAX, SUM, Counter, Stage

__all__ = ["Score", "ScoredSuperbatch"]

log = logging.getLogger("curate.score")


@dataclass
class ScoredSuperbatch:
    """A superbatch with what selection needs: both models' scores and the rule that combines them. `uniform`: a
    superbatch of the selection warmup, not scored, whose batch is drawn uniformly (`Score`'s `warmup`)."""

    batch: BatchDict
    learner: ModelScores | None
    reference: ModelScores | None
    rule: Rule
    size: int
    uniform: bool = False

    @property
    def score(self) -> Tensor:
        """Per-example score (B,): rule(learner loss, reference loss); zeros when neither model is scored."""
        if self.learner is None and self.reference is None:
            return torch.zeros(self.size)
        return self.rule(
            None if self.learner is None else self.learner.loss,
            None if self.reference is None else self.reference.loss,
        )

    @property
    def keys(self) -> list:
        """The samples' `__key__`s (their positions when they have none)."""
        return list(self.batch.get("__key__", range(self.size)))

    @property
    def contrastive(self) -> bool:
        return any(s is not None and s.contrastive for s in (self.learner, self.reference))


class Score(Stage[ScoredSuperbatch]):
    """Scores each superbatch with the learner and the reference (only those the rule reads).

    Args:
        source: node of collated superbatches (`Superbatch`).
        learner: the model being trained (nn.Module, or DDP model), a `WeightSync`, an ACL `Actor`, any
            `ScoreProvider`, or a `LearnerSide` from `curate.resolve_learner`. Not needed by rules that do not
            read it (`easy_reference`, `uniform`).
        reference: the frozen reference (nn.Module) or a `ScoreProvider` such as a `ScoreCache`.
        scorer: computes one model's scores from a batch (`ClassificationScorer`, `ContrastiveScorer`, or
            any `curate.Scorer`).
        rule: a name from `curate.RULES`, a `curate.Rule`, or a function `rule(learner, reference)` (which then
            reads the models that are given).
        micro_batch_size: samples per forward pass; bounds activation memory at large superbatches.
        score_transform: applied to the superbatch before the scoring forwards only (the selected samples
            are trained on as they came), e.g. downsampled images for cheaper scoring (Flexi-JEST):
            `lambda batch: {**batch, "image": F.avg_pool2d(batch["image"], 2)}`. It may change each
            sample but must keep all of them, in order, and the fields a ScoreCache reads (`__key__`).
        count_flops: measure each model's forward FLOPs on the first superbatch scored (`curate.flops`).
        warmup: the first `warmup` superbatches of the run (counted over epochs and resumes) are not scored: they
            pass on marked `uniform`, and `JointSelect` draws their batches uniformly. Selection then starts from
            a learner that has seen the stream's own mix (see `curate.pipeline`'s `selection_warmup`).

    Non-finite losses or embeddings raise a ValueError naming the samples' keys: a NaN score would
    otherwise silently decide what is trained on.
    """

    counters = {"score_seconds": Counter(MAX, 0.0)}  # a DDP job is as slow as its slowest rank
    gauges = {"flops_per_sample": LAST, "scoring_flops": SUM, "sync": LAST, "_staleness": LAST, "_in_order": LAST}

    def __init__(self, source: BaseNode, learner=None, reference=None, scorer: Scorer | None = None,
                 rule: str | Rule | RuleFn = "learnability", micro_batch_size: int = 1024,
                 score_transform: Callable[[BatchDict], BatchDict] | None = None, count_flops: bool = True,
                 warmup: int = 0):
        super().__init__(source)
        self.rule = as_rule(rule, learner=learner is not None, reference=reference is not None)
        if self.rule.uses_learner and learner is None:
            raise ValueError(f"Score: rule {self.rule.name!r} needs a learner; pass learner=model")
        if self.rule.uses_reference and reference is None:
            raise ValueError(
                f"Score: rule {self.rule.name!r} needs a reference; pass reference=model or a ScoreCache, "
                "or use rule='hard_learner' / 'uniform'"
            )
        if self.rule.uses_models and scorer is None:
            raise ValueError("Score: scorer is required, e.g. curate.ClassificationScorer(input_key, target_key)")
        if scorer is not None and not (callable(scorer) and hasattr(scorer, "keys") and hasattr(scorer, "kind")):
            raise TypeError(f"Score: scorer must be a curate.Scorer (keys, kind, __call__(model, batch)), got "
                            f"{type(scorer).__name__}")
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ValueError(f"Score: micro_batch_size must be a positive int, got {micro_batch_size=}")
        if score_transform is not None and not callable(score_transform):
            raise TypeError(f"Score: score_transform must be a function batch -> batch, got {score_transform!r}")
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"Score: warmup must be a non-negative int (superbatches not scored), got {warmup=}")
        # a model the rule does not read is never scored
        self.learner: LearnerSide | None = resolve_learner(learner) if self.rule.uses_learner else None
        self.reference: ScoreProvider | None = (as_provider(reference, "reference") if self.rule.uses_reference
                                                else None)
        self.scorer, self.micro_batch_size = scorer, micro_batch_size
        self.score_transform, self.count_flops = score_transform, count_flops
        self.ledger = FlopLedger()
        self.warmup = warmup
        self._superbatches = 0  # of the run, over epochs: a new epoch's reset(None) keeps it
        self.superbatches_per_epoch: int | None = None  # set by Pipeline when it knows the epoch's length
        self._fresh = True  # nothing drawn and no state loaded: set_epoch may count the epochs before as trained

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        if initial_state is not None:
            self._fresh = False
            self.ledger.load(initial_state["ledger"])
            # states saved before the warmup existed carry no count; they load only into warmup=0 (the config hash)
            self._superbatches = initial_state.get("superbatches", 0)

    def set_epoch(self, epoch: int) -> None:
        """A fresh pipeline (nothing drawn, no state loaded) started at `epoch` (open_clip's resume) has trained
        `epoch` whole epochs before: the warmup counts them, when the epoch's length is known (else it counts from
        here, logged). A pipeline already under way keeps its own count: an epoch the loop cut short counts only
        the batches it drew."""
        super().set_epoch(epoch)
        if not (self._fresh and self.warmup and epoch):
            return
        if self.superbatches_per_epoch is not None:
            self._superbatches = epoch * self.superbatches_per_epoch
        else:
            log.warning("Score: set_epoch(%d) without a state and an epoch of unknown length: the selection warmup "
                        "of %d batches starts again; give the pipeline batches_per_epoch= to count the epochs before",
                        epoch, self.warmup)

    def _scores(self, role: str, provider: ScoreProvider | None, batch: BatchDict, n: int) -> ModelScores | None:
        if provider is None:
            return None
        scorer = self.scorer
        assert scorer is not None, "Score: __init__ requires a scorer when the rule reads a model"
        fn = lambda: provider.scores(batch, scorer, self.micro_batch_size)  # noqa: E731
        return self.ledger.run(role, n, fn) if self.count_flops else fn()

    def _transform(self, transform: Callable[[BatchDict], BatchDict], batch: BatchDict, n: int) -> BatchDict:
        fn = lambda: transform(batch)  # noqa: E731
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

    def next(self) -> ScoredSuperbatch:
        batch = next(self.source)
        self._check_keys(batch)
        self._fresh = False
        self._superbatches += 1
        n = batch_size_of(batch)
        if self._superbatches <= self.warmup:
            return ScoredSuperbatch(batch, None, None, self.rule, n, uniform=True)
        start = time.perf_counter()
        scoring = batch if self.score_transform is None else self._transform(self.score_transform, batch, n)
        side = self.learner
        learner = self._scores(side.role, side.provider, scoring, n) if side is not None else None
        reference = self._scores("reference", self.reference, scoring, n)
        if learner is not None and reference is not None:
            like = learner.image_emb if learner.contrastive else learner.loss
            assert like is not None, "contrastive scores are built with embeddings"
            reference = reference.to(like.device)
        for name, scores in (("learner", learner), ("reference", reference)):
            if scores is not None:
                self._check_finite(name, scores, batch)
        self.counts["score_seconds"] += time.perf_counter() - start
        return ScoredSuperbatch(batch, learner, reference, self.rule, n)

    def _check_keys(self, batch: BatchDict) -> None:
        for key in getattr(self.scorer, "keys", ()):
            if key not in batch:
                raise ValueError(
                    f"Score: the scorer reads field {key!r} but the samples have fields {sorted(batch)}; "
                    f"set the scorer's keys to match, e.g. {type(self.scorer).__name__}(...)"
                )

    @staticmethod
    def _check_finite(name: str, scores: ModelScores, batch: BatchDict) -> None:
        bad = scores.nonfinite()
        if bad.any():
            idx = bad.nonzero().flatten().tolist()
            keys = [batch["__key__"][i] for i in idx] if "__key__" in batch else idx
            raise ValueError(
                f"Score: the {name} produced NaN/inf losses or embeddings for {len(idx)} samples "
                f"(keys {keys[:10]}{'...' if len(keys) > 10 else ''}); check those inputs and the model"
            )

    def get_state(self) -> dict:
        return {**super().get_state(), "ledger": self.ledger.state(), "superbatches": self._superbatches}

    @property
    def measures_training_forward(self) -> bool:
        """The learner's scoring forward is the training forward (a live learner, scored on the batch as it is
        trained): the ledger's training FLOPs per sample are its measured scoring FLOPs. Not with a warmup, whose
        batches are trained before that forward is first measured."""
        return (self.learner is not None and self.learner.scores_training_forward and self.score_transform is None
                and not self.warmup)

    def stats(self) -> dict:
        out = super().stats()
        if self.count_flops:
            out["flops_per_sample"] = per_sample = dict(self.ledger.per_sample)
            out["scoring_flops"] = sum(self.ledger.total(role) for role in per_sample)
            if self.measures_training_forward and self.learner is not None and self.learner.role in per_sample:
                per_sample["train"] = per_sample[self.learner.role]
        if self.learner is not None:
            out["_staleness"], out["_in_order"] = self.learner.staleness, self.learner.in_order
            if self.learner.sync is not None:
                out["sync"] = self.learner.sync.stats()
        return out

    @staticmethod
    def derive(totals: dict) -> dict:
        """The learner's lag, and the FLOP ledger's totals: does selection pay for itself (`curate.flops`)?

        `score_lag_steps`: optimizer steps between the weights that scored a superbatch and the weights its batch
        trains: the WeightSync's staleness, plus one for a prefetch thread's read-ahead (not for an actor, trained
        and scored in order in that thread). Training FLOPs: 3 × the trained model's forward (forward + backward)
        per sample kept; `flops_overhead` = (scoring + actor training) / training; `break_even_step_saving` =
        1 + overhead: selection saves compute only if it needs fewer steps than uniform training by more.
        """
        out = {"prefetch": totals.get("prefetch", 0)}
        if "_staleness" in totals:
            out["score_lag_steps"] = totals["_staleness"] + (0 if totals["_in_order"] else out["prefetch"])
        if "scoring_flops" in totals:  # the ledger is on
            forward = totals["flops_per_sample"].get("train")
            training = None if forward is None else 3 * forward * totals.get("kept", 0)
            scoring, actor = totals["scoring_flops"], totals.get("actor_training_flops", 0.0)
            overhead = (scoring + actor) / training if training else None
            out |= {"actor_training_flops": actor, "training_flops": training, "flops_overhead": overhead,
                    "break_even_step_saving": None if overhead is None else 1 + overhead}
        return out
