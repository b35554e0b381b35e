"""curate.scorers: the built-in scorers against torch / open_clip, score_model's micro-batches, ModelScores."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

import curate
from curate.losses import sigmoid_example_losses
from curate.scorers import ModelScores, score_model

from .conftest import make_pairs, make_samples, tiny_clip


def test_classification_scores_are_per_example_cross_entropy():
    torch.manual_seed(0)
    model, batch = nn.Linear(8, 3), default_collate(make_samples(10))
    scores = curate.ClassificationScorer()(model, batch)
    assert scores.kind == "example" and not scores.contrastive
    torch.testing.assert_close(scores.loss, F.cross_entropy(model(batch["input"]), batch["target"], reduction="none"))


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_contrastive_scores_are_open_clips_normalised_embeddings(loss):
    model, batch = tiny_clip(loss), default_collate(make_pairs(6))
    with torch.no_grad():  # as score_model calls it
        scores = curate.ContrastiveScorer(loss=loss)(model, batch)
        image = model.encode_image(batch["image"], normalize=True)
    torch.testing.assert_close(scores.image_emb, image)
    assert scores.kind == loss and scores.scale == pytest.approx(float(model.logit_scale.detach().exp()))
    assert scores.bias == (float(model.logit_bias.detach()) if loss == "sigmoid" else 0.0)
    if loss == "sigmoid":  # per-example losses, on demand, from the embeddings
        torch.testing.assert_close(scores.loss, sigmoid_example_losses(scores.image_emb, scores.text_emb,
                                                                       scores.scale, scores.bias))


def test_sigmoid_scoring_needs_a_logit_bias():
    with pytest.raises(ValueError, match="needs model.logit_bias"), torch.no_grad():
        curate.ContrastiveScorer(loss="sigmoid")(tiny_clip("softmax"), default_collate(make_pairs(2)))
    with pytest.raises(ValueError, match="loss must be 'sigmoid' or 'softmax'"):
        curate.ContrastiveScorer(loss="hinge")


def test_score_model_in_micro_batches_equals_one_forward_and_restores_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    batch = default_collate(make_samples(23))
    whole = score_model(model, batch, curate.ClassificationScorer(), 1024)
    parts = score_model(model, batch, curate.ClassificationScorer(), 5)
    torch.testing.assert_close(parts.loss, whole.loss)  # eval mode: dropout off, so deterministic
    assert model.training
    provided = curate.ModelProvider(model).scores(batch, curate.ClassificationScorer(), 7)
    torch.testing.assert_close(provided.loss, whole.loss)


def test_nonfinite_marks_the_bad_examples():
    losses = ModelScores.of_losses(torch.tensor([0.1, math.nan, math.inf, 2.0]))
    assert losses.nonfinite().tolist() == [False, True, True, False]
    emb = torch.eye(3)
    emb[1, 0] = math.nan
    assert ModelScores("sigmoid", emb, torch.eye(3), 1.0, 0.0).nonfinite().tolist() == [False, True, False]
    assert ModelScores("sigmoid", torch.eye(3), torch.eye(3), math.inf, 0.0).nonfinite().all()


# ---------------------------------------------------------------- bad targets


def _batch_with_targets(targets):
    batch = default_collate(make_samples(len(targets)))
    return {**batch, "target": targets}


@pytest.mark.parametrize("targets, match", [
    (torch.tensor([0, -100, 2, 1]), r"target -100 .*ignore_index.*keys \['s00001'\].*loss 0"),
    (torch.tensor([0, 3, 2, -1]), r"class indices outside \[0, 3\): \[3, -1\].*keys \['s00001', 's00003'\]"),
    (torch.tensor([0.0, 1.0, 2.0, 1.0]), r"is torch.float32, but class indices must be integers.*\.long\(\)"),
    (torch.tensor([[0], [1], [2], [1]]), r"shape \(4, 1\).*\(4,\) class indices or \(4, 3\) class probabilities"),
    (torch.tensor([[1.0, 1, 0], [0, 1, 0], [0, 0, 0], [0.2, 0.3, 0.5]]),
     r"rows must be probability distributions.*keys \['s00000', 's00002'\].*multi-label"),
    (torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [-0.5, 0.5, 1.0]]), r"distributions.*keys \['s00003'\]"),
    (torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [math.nan, 0.5, 0.5]]), r"distributions.*keys \['s00003'\]"),
])
def test_classification_refuses_targets_it_would_score_wrongly(targets, match):
    """−100 (cross_entropy's ignore_index) would score 0, as if learnt; out-of-range indices crash (a device-side
    assert on CUDA); float indices crash; rows that are not distributions (multi-hot) score nonsense."""
    torch.manual_seed(0)
    with pytest.raises(curate.scorers.TargetError, match=match):
        score_model(nn.Linear(8, 3), _batch_with_targets(targets), curate.ClassificationScorer(), 1024)


def test_classification_takes_soft_labels_and_any_integer_dtype():
    torch.manual_seed(0)
    model, batch = nn.Linear(8, 3), default_collate(make_samples(6))
    hard = score_model(model, batch, curate.ClassificationScorer(), 1024).loss
    for targets in (batch["target"].to(torch.int32), batch["target"].to(torch.uint8)):
        assert torch.equal(score_model(model, {**batch, "target": targets}, curate.ClassificationScorer(), 4).loss,
                           hard)
    one_hot = F.one_hot(batch["target"], 3).float()  # soft labels: a distribution over classes per example
    torch.testing.assert_close(score_model(model, {**batch, "target": one_hot}, curate.ClassificationScorer(),
                                           4).loss, hard)
    smooth = one_hot * 0.9 + 0.1 / 3
    logits = model(batch["input"])
    expected = -(smooth * logits.log_softmax(1)).sum(1)
    torch.testing.assert_close(score_model(model, {**batch, "target": smooth}, curate.ClassificationScorer(), 4).loss,
                               expected.detach())
    bf16 = score_model(model.to(torch.bfloat16), {**batch, "target": smooth}, curate.ClassificationScorer(), 4)
    assert bf16.loss.shape == (6,)  # soft labels rounded to bf16 with the inputs still count as distributions
