"""bf16 scoring: a bf16 WeightSync snapshot of an fp32 learner, and `autocast=`; fp32 scores, near-fp32 selections.

The selection bound: bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2% per op), so a small model's
scores move by ~1e-3 (classifier losses) to ~1e-2 (embeddings), far less than their spread across a superbatch;
only candidates scored within that error of the k-th best can swap in or out, a few of them, so ≥ 80% of a
selection must survive (measured on these models: 97-100%).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

import curate
from curate.rules import get_rule
from curate.scorers import score_model
from curate.selection import SigmoidGain, SoftmaxGain

from .conftest import make_pairs, make_samples, tiny_clip

BF16 = torch.bfloat16
MIN_OVERLAP = 0.8


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    return len(set(a.tolist()) & set(b.tolist())) / len(a)


def _classifier(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))


def _forward_dtypes(model):
    """The dtypes of the outputs of `model`'s Linear layers, recorded as they forward."""
    seen: set[torch.dtype] = set()
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            layer.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    return seen


def _bf16_scores(model, batch, make_scorer, micro_batch_size):
    """fp32 scores, and bf16 ones two ways: from a bf16 WeightSync snapshot, and under autocast."""
    fp32 = score_model(model, batch, make_scorer(), micro_batch_size)
    sync = curate.WeightSync(model, dtype=BF16)
    assert {p.dtype for p in sync.module.parameters()} == {BF16}
    snapshot_dtypes = _forward_dtypes(sync.module)
    snapshot = sync.scores(batch, make_scorer(), micro_batch_size)
    autocast_dtypes = _forward_dtypes(model)
    autocast = score_model(model, batch, make_scorer(autocast=BF16), micro_batch_size)
    assert snapshot_dtypes == autocast_dtypes == {BF16}  # both forwards really ran in bf16
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # autocast leaves the model as it is
    return fp32, {"WeightSync(dtype=bf16)": snapshot, "autocast=bf16": autocast}


def test_bf16_classifier_scores_are_fp32_near_fp32_and_select_nearly_the_same():
    batch = default_collate(make_samples(512))
    learner, reference = _classifier(0), _classifier(1)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    for _ in range(30):  # a reference that fits the data, so learnability is not the learner's loss plus noise
        optimizer.zero_grad()
        F.cross_entropy(reference(batch["input"]), batch["target"]).backward()
        optimizer.step()
    fp32, bf16 = _bf16_scores(learner, batch, curate.ClassificationScorer, 128)
    ref = score_model(reference, batch, curate.ClassificationScorer(), 128).loss
    k = 128
    for how, scores in bf16.items():
        assert scores.loss.dtype == torch.float32
        torch.testing.assert_close(scores.loss, fp32.loss, atol=1e-2, rtol=1e-2)
        for rule, learner_loss, fp32_score in (("hard_learner", scores.loss, fp32.loss),
                                               ("learnability", scores.loss - ref, fp32.loss - ref)):
            overlap = _overlap(curate.topk(learner_loss, k), curate.topk(fp32_score, k))
            print(f"classifier {how} {rule}: top-{k} of {len(ref)} overlap with fp32 = {overlap:.3f}")
            assert overlap >= MIN_OVERLAP, f"{how} {rule}: only {overlap:.0%} of the fp32 top-{k} selected"


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_bf16_contrastive_scores_are_fp32_near_fp32_and_select_nearly_the_same(loss):
    batch = default_collate(make_pairs(128))
    model = tiny_clip(loss)
    fp32, bf16 = _bf16_scores(model, batch, lambda **kw: curate.ContrastiveScorer(loss=loss, **kw), 64)
    k, rule = 32, get_rule("hard_learner")

    def joint(scores):  # JEST over the learner's scores, with the same Gumbel noise for every precision
        gain = (SigmoidGain(scores, None, rule) if loss == "sigmoid"
                else SoftmaxGain(scores, None, rule, scores.loss, None))
        return curate.joint(gain, k, n_chunks=4, generator=torch.Generator().manual_seed(0))

    for how, scores in bf16.items():
        assert scores.image_emb.dtype == scores.text_emb.dtype == scores.loss.dtype == torch.float32
        torch.testing.assert_close(scores.image_emb, fp32.image_emb, atol=2e-2, rtol=0)
        torch.testing.assert_close(scores.text_emb, fp32.text_emb, atol=2e-2, rtol=0)
        assert (scores.scale, scores.bias) == pytest.approx((fp32.scale, fp32.bias), rel=1e-2)
        for method, selected, reference in (("topk", curate.topk(scores.loss, k), curate.topk(fp32.loss, k)),
                                            ("joint", joint(scores), joint(fp32))):
            overlap = _overlap(selected, reference)
            print(f"{loss} CLIP {how} {method}: {k} of {len(fp32.loss)} overlap with fp32 = {overlap:.3f}")
            assert overlap >= MIN_OVERLAP, f"{how} {method}: only {overlap:.0%} of the fp32 selection selected"


def test_pushes_round_the_learners_weights_into_the_bf16_snapshot():
    batch = default_collate(make_samples(32))
    model = _classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sync = curate.WeightSync(model, dtype=BF16).attach(optimizer)
    optimizer.zero_grad()
    F.cross_entropy(model(batch["input"]), batch["target"]).backward()
    optimizer.step()  # pushes
    assert sync.version == 1
    for name, tensor in sync.module.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name].to(BF16)), name
    weights = lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values())  # noqa: E731
    assert weights(sync.module) == weights(model) // 2


def test_dtype_casts_the_inputs_when_the_models_first_parameter_is_not_its_input_layers():
    class Tempered(nn.Module):  # an fp32 temperature registered before the bf16 layer the input enters
        def __init__(self):
            super().__init__()
            self.temperature = nn.Parameter(torch.ones(()))
            self.linear = nn.Linear(8, 3).to(BF16)

        def forward(self, x):
            return self.linear(x) / self.temperature

    batch = default_collate(make_samples(8))
    with pytest.raises(RuntimeError, match="dtype"):  # inputs cast to the first parameter's fp32
        score_model(Tempered(), batch, curate.ClassificationScorer(), 8)
    scores = score_model(Tempered(), batch, curate.ClassificationScorer(dtype=BF16), 8)
    assert scores.loss.dtype == torch.float32 and scores.loss.isfinite().all()


def test_precision_arguments_must_be_floating_dtypes():
    with pytest.raises(ValueError, match=r"autocast must be a floating-point torch.dtype .* got autocast='bf16'"):
        curate.ClassificationScorer(autocast="bf16")
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        curate.ContrastiveScorer(dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        curate.WeightSync(nn.Linear(2, 2), dtype=torch.int64)
    assert repr(curate.ContrastiveScorer(autocast=BF16)) == (
        "ContrastiveScorer(image_key='image', text_key='text', loss='sigmoid', autocast=torch.bfloat16)")
