"""The FLOP ledger against torch's FlopCounterMode and the analytic count (2·in·out per Linear per sample)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate
from torch.utils.flop_counter import FlopCounterMode

import curate
from curate.actor import Actor
from curate.batch import take
from curate.flops import forward_flops
from curate.scorers import score_model

from .conftest import make_samples, roundtrip, tiny_clip

B, b = 32, 8
SCORER = curate.ClassificationScorer()
LEDGER = ("flops_per_sample", "scoring_flops", "actor_training_flops", "training_flops", "flops_overhead",
          "break_even_step_saving")


def _torch_count(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _models():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)), nn.Linear(8, 3)


def test_ledger_matches_the_analytic_count_and_torchs_counter_for_an_mlp():
    data = make_samples(B * 5 + 12)  # a short last superbatch: samples are counted, not superbatches
    learner, reference = _models()
    pipe = curate.pipeline(data, batch_size=b, superbatch_size=B, learner=learner, reference=reference,
                           scorer=SCORER, rule="rho", method="topk", shuffle_buffer=0)
    list(pipe)
    stats = pipe.stats()
    learner_fwd, reference_fwd = 2 * (8 * 32 + 32 * 3), 2 * 8 * 3  # 2·in·out per Linear per sample
    x = torch.stack([s["input"] for s in data[:1]])
    assert learner_fwd == _torch_count(lambda: learner(x)) and reference_fwd == _torch_count(lambda: reference(x))
    assert stats["flops_per_sample"] == {"learner": learner_fwd, "reference": reference_fwd, "train": learner_fwd}
    assert stats["seen"] == len(data) and stats["kept"] == 5 * b + 3
    scoring, training = (learner_fwd + reference_fwd) * len(data), 3 * learner_fwd * stats["kept"]
    assert stats["scoring_flops"] == scoring and stats["training_flops"] == training
    assert stats["flops_overhead"] == pytest.approx(scoring / training)
    assert stats["break_even_step_saving"] == pytest.approx((training + scoring) / training)
    assert stats["actor_training_flops"] == 0


def test_ledger_survives_a_checkpoint():
    data = make_samples(B * 6)
    learner, reference = _models()

    def build():
        return curate.pipeline(data, batch_size=b, superbatch_size=B, learner=learner, reference=reference,
                               scorer=SCORER, rule="rho", method="topk", shuffle_buffer=0, prefetch=1)

    full = build()
    list(full)
    first = build()
    it = iter(first)
    for _ in range(3):
        next(it)
    second = build()
    second.load_state_dict(roundtrip(first.state_dict()))
    list(second)
    assert {k: second.stats()[k] for k in LEDGER} == {k: full.stats()[k] for k in LEDGER}


def test_contrastive_flops_count_attention_in_eval_mode_too():
    """torch's counter has no formula for the fused attention ops a ViT runs when scored (eval, no grad) or
    for CPU flash attention; the ledger adds them: 4·L²·width per attention layer (QKᵀ and AV)."""
    data = curate.batch.split_batch(default_collate([
        {"__key__": f"p{i}", "image": torch.randn(3, 8, 8), "text": torch.randint(1, 64, (6,))} for i in range(20)]))
    model, scorer = tiny_clip("sigmoid"), curate.ContrastiveScorer()
    pipe = curate.pipeline(data, batch_size=4, superbatch_size=20, learner=model, scorer=scorer,
                           rule="hard_learner", method="joint", n_chunks=2, shuffle_buffer=0)
    list(pipe)
    one = default_collate(data[:1])
    by_torch = _torch_count(lambda: (model.encode_image(one["image"]), model.encode_text(one["text"])))
    width, image_tokens, text_tokens = 32, (8 // 4) ** 2 + 1, 6  # one layer per tower, patch 4, a CLS token
    cores = 4 * image_tokens**2 * width + 4 * text_tokens**2 * width
    assert pipe.stats()["flops_per_sample"]["learner"] == by_torch + cores
    assert forward_flops(model, one, scorer) == by_torch + cores


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).mean((2, 3)))


def _images(n, size=16):
    g = torch.Generator().manual_seed(0)
    return [{"__key__": f"i{i}", "input": torch.randn(3, size, size, generator=g), "target": torch.tensor(i % 3)}
            for i in range(n)]


def _half_size(batch):
    return {**batch, "input": F.avg_pool2d(batch["input"], 2)}


def test_score_transform_scores_downsampled_and_the_ledger_shows_the_saving():
    data, model = _images(B * 3), ConvNet()
    pipe = curate.pipeline(data, batch_size=b, superbatch_size=B, learner=model, scorer=SCORER, rule="hard_learner",
                           method="topk", shuffle_buffer=0, score_transform=_half_size)
    keys = [batch["__key__"] for batch in pipe]
    batches = [x for x in curate.pipeline(data, batch_size=b, superbatch_size=B, learner=model, scorer=SCORER,
                                          rule="hard_learner", method="topk", shuffle_buffer=0,
                                          score_transform=_half_size)]
    assert batches[0]["input"].shape[-1] == 16  # trained on the samples as they came
    expected = []
    for start in range(0, len(data), B):
        superbatch = default_collate(data[start:start + B])
        loss = score_model(model, _half_size(superbatch), SCORER, 1024).loss
        expected.append(take(superbatch, torch.topk(loss, b).indices)["__key__"])
    assert keys == expected
    stats = pipe.stats()
    conv = lambda hw: 2 * 8 * hw * (3 * 3 * 3)  # noqa: E731  2 · out_channels · pixels · (in_channels · k · k)
    assert stats["flops_per_sample"]["learner"] == conv(8 * 8) + 2 * 8 * 3
    assert stats["flops_per_sample"]["train"] == conv(16 * 16) + 2 * 8 * 3
    assert stats["scoring_flops"] == (conv(64) + 48) * len(data)
    assert stats["training_flops"] == 3 * (conv(256) + 48) * 3 * b


def test_score_transform_must_keep_every_sample():
    data, model = _images(B), ConvNet()
    drop_half = lambda batch: {**batch, "input": batch["input"][: B // 2]}  # noqa: E731
    pipe = curate.pipeline(data, batch_size=b, superbatch_size=B, learner=model, scorer=SCORER,
                           rule="hard_learner", method="topk", shuffle_buffer=0, score_transform=drop_half)
    with pytest.raises(ValueError, match=r"changed the batch size: field 'input' has 16 rows but the superbatch "
                                         r"has 32"):
        next(iter(pipe))
    with pytest.raises(TypeError, match="score_transform must be a function"):
        curate.pipeline(data, batch_size=b, learner=model, scorer=SCORER, rule="hard_learner", score_transform="half")


def test_actor_ledger_counts_actor_scoring_training_and_the_learners_training():
    data = make_samples(B * 4)
    learner, _ = _models()
    torch.manual_seed(1)
    small = nn.Linear(8, 3)
    actor = Actor(small, torch.optim.SGD(small.parameters(), lr=0.1))
    first = default_collate(data[:b])
    by_torch = _torch_count(lambda: F.cross_entropy(small(first["input"]), first["target"]).backward())
    small.zero_grad()
    pipe = curate.pipeline(data, batch_size=b, superbatch_size=B, learner=actor, scorer=SCORER, rule="hard_learner",
                           method="topk", shuffle_buffer=0, train_model=learner)
    list(pipe)
    stats = pipe.stats()
    assert stats["flops_per_sample"] == {"actor": 48, "actor_train": by_torch / b, "train": 2 * (8 * 32 + 32 * 3)}
    assert stats["scoring_flops"] == 48 * len(data) and stats["actor_training_flops"] == by_torch / b * 4 * b
    assert stats["training_flops"] == 3 * 704 * 4 * b
    assert stats["break_even_step_saving"] < 1.2  # a proxy 15× smaller than the learner: selection is cheap
    without = curate.pipeline(data, batch_size=b, superbatch_size=B, learner=actor, scorer=SCORER,
                              rule="hard_learner", method="topk", shuffle_buffer=0)
    list(without)
    assert without.stats()["training_flops"] is None and without.stats()["flops_overhead"] is None


def test_count_flops_off():
    learner, _ = _models()
    pipe = curate.pipeline(make_samples(B), batch_size=b, superbatch_size=B, learner=learner, scorer=SCORER,
                           rule="hard_learner", method="topk", count_flops=False)
    list(pipe)
    assert not set(LEDGER) & set(pipe.stats())
