"""The Score stage: scores only what the rule reads, without grad, in micro-batches; bad input named."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curate
from curate.stage import chain

from .conftest import linear_models, make_samples


def _kwargs(**over):
    learner, reference = linear_models()
    base = dict(learner=learner, reference=reference, scorer=curate.ClassificationScorer(), batch_size=8)
    base.update(over)
    return base


def test_score_runs_without_grad_and_restores_train_mode():
    data = make_samples(64)
    learner, reference = linear_models()
    learner.train()
    reference.eval()
    modes = []
    learner.register_forward_hook(lambda m, i, o: modes.append((m.training, torch.is_grad_enabled())))
    batch = next(iter(curate.pipeline(data, learner=learner, reference=reference,
                                      scorer=curate.ClassificationScorer(), batch_size=8, filter_ratio=0.5,
                                      micro_batch_size=5, shuffle_buffer=0)))
    assert len(batch["__key__"]) == 8
    assert modes and all(m == (False, False) for m in modes)
    assert len(modes) == math.ceil(16 / 5)  # forwarded in micro-batches
    assert learner.training and not reference.training


def test_missing_scorer_key_names_the_key_and_the_fields():
    p = curate.pipeline(make_samples(40), **_kwargs(scorer=curate.ClassificationScorer(input_key="pixels")))
    fields = r"field 'pixels' but the samples have fields \['__key__', 'input', 'target'\]"
    with pytest.raises(ValueError, match=fields):
        next(iter(p))


def test_nan_losses_name_the_samples():
    data = make_samples(40)
    data[3]["input"] = torch.full((8,), float("nan"))
    p = curate.pipeline(data, shuffle_buffer=0, **_kwargs())
    with pytest.raises(ValueError, match=r"learner produced NaN/inf .* 1 samples \(keys \['s00003'\]\)"):
        next(iter(p))


def test_pipeline_works_without_keys_and_nan_errors_give_positions():
    data = [{"input": s["input"], "target": s["target"]} for s in make_samples(40)]
    batches = list(curate.pipeline(data, shuffle_buffer=0, filter_ratio=0.5, **_kwargs()))
    assert sum(len(b["input"]) for b in batches) == 20
    data[5]["input"] = torch.full((8,), float("inf"))
    with pytest.raises(ValueError, match=r"keys \[5\]"):
        next(iter(curate.pipeline(data, shuffle_buffer=0, filter_ratio=0.5, **_kwargs())))


def test_nonfinite_contrastive_scores_name_the_model_and_the_samples():
    """The NaN guard covers embeddings and the logit scale too, for the reference as for the learner."""
    from .conftest import make_pairs, tiny_clip

    data = make_pairs(16)
    data[2]["image"] = torch.full_like(data[2]["image"], float("nan"))
    common = dict(scorer=curate.ContrastiveScorer(), batch_size=8, filter_ratio=0.5, shuffle_buffer=0)
    p = curate.pipeline(data, learner=tiny_clip(), reference=tiny_clip(seed=1), **common)
    with pytest.raises(ValueError, match=r"learner produced NaN/inf .* 1 samples \(keys \['p00002'\]\)"):
        next(iter(p))
    reference = tiny_clip(seed=1)
    with torch.no_grad():
        reference.logit_scale.fill_(float("inf"))
    p = curate.pipeline(make_pairs(16), learner=tiny_clip(), reference=reference, **common)
    with pytest.raises(ValueError, match=r"reference produced NaN/inf .* 16 samples"):
        next(iter(p))


def test_ignore_index_and_out_of_range_targets_stop_the_pipeline_naming_the_samples():
    """A target of -100 scores 0 (cross_entropy's ignore_index), which would be read as learnt: refused, through
    the pipeline and the scorer's micro-batches, with the sample's key; without keys, its position."""
    data = make_samples(40)
    data[7]["target"] = torch.tensor(-100)
    p = curate.pipeline(data, shuffle_buffer=0, micro_batch_size=5, **_kwargs())
    with pytest.raises(curate.scorers.TargetError, match=r"ignore_index\) for 1 samples \(keys \['s00007'\]\)"):
        next(iter(p))
    data = [{"input": s["input"], "target": s["target"]} for s in make_samples(40)]
    data[6]["target"] = torch.tensor(3)
    p = curate.pipeline(data, shuffle_buffer=0, micro_batch_size=5, **_kwargs())
    where = r"outside \[0, 3\): \[3\] for 1 samples \(positions in the micro-batch \[1\]\).*rows 5-9\]"
    with pytest.raises(curate.scorers.TargetError, match=where):
        next(iter(p))


class Counting(nn.Linear):
    def __init__(self, *args):
        super().__init__(*args)
        self.rows = 0

    def forward(self, x):
        self.rows += len(x)
        return super().forward(x)


@pytest.mark.parametrize("rule, learner_rows, reference_rows", [
    ("learnability", 40, 40), ("hard_learner", 40, 0), ("easy_reference", 0, 40), ("uniform", 0, 0)])
def test_only_the_models_the_rule_reads_are_scored(rule, learner_rows, reference_rows):
    torch.manual_seed(0)
    learner, reference = Counting(8, 3), Counting(8, 3)
    node = curate.Superbatch(curate.Source(make_samples(40)), 40)
    score = curate.Score(node, learner, reference, curate.ClassificationScorer(), rule, count_flops=False)
    scored = next(iter(curate.Pipeline(score)))
    assert (learner.rows, reference.rows) == (learner_rows, reference_rows)
    x = torch.stack([s["input"] for s in make_samples(40)])
    y = torch.stack([s["target"] for s in make_samples(40)])
    with torch.no_grad():
        losses = {name: F.cross_entropy(model(x), y, reduction="none") for name, model in
                  (("learner", learner), ("reference", reference))}
    expected = {"learnability": losses["learner"] - losses["reference"], "hard_learner": losses["learner"],
                "easy_reference": -losses["reference"], "uniform": torch.zeros(40)}[rule]
    torch.testing.assert_close(scored.score, expected)
    assert scored.keys == [s["__key__"] for s in make_samples(40)]


def test_a_scorer_must_say_what_it_reads_and_what_kind_of_scores_it_gives():
    class NoKind:
        keys = ("input",)

        def __call__(self, model, batch):
            return curate.ModelScores.of_losses(torch.zeros(len(batch["input"])))

    with pytest.raises(TypeError, match=r"scorer must be a curate.Scorer \(keys, kind"):
        curate.Score(curate.Source([]), nn.Linear(8, 3), scorer=NoKind(), rule="hard_learner")


def test_the_learner_side_is_resolved_once_at_construction():
    learner, _ = linear_models()
    score = curate.Score(curate.Source([]), learner, scorer=curate.ClassificationScorer(), rule="hard_learner")
    assert isinstance(score.learner, curate.LearnerSide) and score.learner.provider.model is learner
    assert chain(score)[-1] is score
