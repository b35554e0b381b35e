"""pipelines.models: tiny CLIP/SigLIP, CNN and MLP builders, model_hash, zero-shot accuracy."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from curate import ClassificationScorer, ContrastiveScorer
from curate.scorers import score_model
from pipelines.data import (
    CAPTION_TEMPLATES,
    DIGIT_NAMES,
    ZERO_SHOT_TEMPLATE,
    load_digits,
    load_pairs,
    make_digits,
    shard_urls,
    tokenize,
)
from pipelines.models import HashedEmbedding, mlp, model_hash, small_cnn, tiny_clip, zero_shot_accuracy

ROOT = Path(__file__).resolve().parents[1]
open_clip = pytest.importorskip("open_clip")


def collate(samples, *fields: str) -> dict:
    return default_collate([{k: s[k] for k in fields} for s in samples])


def pair_batch(n: int = 48, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(10, (n,), generator=g)
    templates = [CAPTION_TEMPLATES[i % len(CAPTION_TEMPLATES)] for i in range(n)]
    captions = [t.format(name=DIGIT_NAMES[y], digit=y) for t, y in zip(templates, labels.tolist(), strict=True)]
    return {"__key__": [f"k{i}" for i in range(n)], "image": torch.rand(n, 3, 16, 16, generator=g),
            "text": tokenize(captions), "label": labels}


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_tiny_clip_is_an_open_clip_model(loss):
    torch.manual_seed(0)
    model = tiny_clip(loss)
    assert isinstance(model, open_clip.model.CLIP)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    if loss == "sigmoid":  # SigLIP's initialisation
        assert model.logit_scale.exp().item() == pytest.approx(10.0) and model.logit_bias.item() == -10.0
    else:
        assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07) and model.logit_bias is None
    batch = pair_batch()
    image, text = model.encode_image(batch["image"]), model.encode_text(batch["text"])
    assert image.shape == text.shape == (48, 64)
    out = model(batch["image"], batch["text"])  # open_clip's forward works with the folded vocabulary
    assert torch.allclose(out[0], F.normalize(image, dim=-1), atol=1e-6)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_contrastive_scorer_matches_open_clip_loss(loss):
    torch.manual_seed(1)
    model = tiny_clip(loss)
    batch = pair_batch()
    scores = score_model(model, batch, ContrastiveScorer(loss=loss), micro_batch_size=16)
    assert scores.kind == loss and scores.image_emb.shape == (48, 64)
    assert torch.allclose(scores.image_emb.norm(dim=1), torch.ones(48), atol=1e-5)
    assert scores.scale == pytest.approx(model.logit_scale.exp().item())
    with torch.no_grad():
        image = model.encode_image(batch["image"], normalize=True)
        text = model.encode_text(batch["text"], normalize=True)
        if loss == "sigmoid":
            reference = open_clip.loss.SigLipLoss()(image, text, model.logit_scale.exp(), model.logit_bias)
        else:
            reference = open_clip.loss.ClipLoss()(image, text, model.logit_scale.exp())
    assert scores.loss.mean().item() == pytest.approx(reference.item(), rel=1e-4)


def test_hashed_embedding_keeps_caption_tokens_apart():
    words = [t.format(name=name, digit=d) for t in (*CAPTION_TEMPLATES, ZERO_SHOT_TEMPLATE)
             for d, name in enumerate(DIGIT_NAMES)]
    distinct = tokenize(words).unique()
    assert len((distinct % 4096).unique()) == len(distinct)  # no caption token shares a row
    model = tiny_clip(vocab_size=4096)
    assert isinstance(model.token_embedding, HashedEmbedding) and model.token_embedding.weight.shape == (4096, 64)
    ids = tokenize(words[:5])
    assert torch.equal(model.token_embedding(ids), model.token_embedding.weight[ids % 4096])
    assert type(tiny_clip(vocab_size=49408).token_embedding) is torch.nn.Embedding
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_clip(vocab_size=60_000)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_model_hash_is_stable_and_sensitive():
    """In a fresh process the same seed gives the same hash (and importing our modules loads no heavy extra)."""
    torch.manual_seed(0)
    model = tiny_clip()
    digest = model_hash(model)
    script = ("import sys, torch, pipelines.data, pipelines.models as m\n"
              "print(sorted({'open_clip', 'webdataset', 'sklearn'} & set(sys.modules)))\n"
              "torch.manual_seed(0); print(m.model_hash(m.tiny_clip()))")
    other = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert other.stdout.split("\n")[:2] == ["[]", digest], other.stderr
    copy = pickle.loads(pickle.dumps(model))  # picklable: torch.save, spawn workers, Ray
    assert model_hash(copy) == digest
    with torch.no_grad():
        weight = copy.visual.conv1.weight
        weight.view(-1)[3] = torch.nextafter(weight.view(-1)[3], torch.tensor(1.0))  # one ulp
    assert model_hash(copy) != digest
    assert model_hash(tiny_clip().double()) != model_hash(tiny_clip())
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    before = model_hash(net)
    net.train()(torch.randn(8, 4))  # only a buffer (running mean) changes
    assert model_hash(net) != before


@pytest.mark.parametrize("builder", [small_cnn, mlp])
@pytest.mark.parametrize("image_size", [16, 24])
def test_classifiers_with_classification_scorer(builder, image_size):
    torch.manual_seed(0)
    model = builder(10, image_size=image_size)
    batch = {"image": torch.rand(20, 1, image_size, image_size), "target": torch.randint(10, (20,))}
    scores = score_model(model, batch, ClassificationScorer("image", "target"), micro_batch_size=8)
    with torch.no_grad():
        reference = F.cross_entropy(model(batch["image"]), batch["target"], reduction="none")
    assert torch.allclose(scores.loss, reference, atol=1e-6)
    with pytest.raises(ValueError, match="image_size"):
        small_cnn(image_size=18)


def test_zero_shot_accuracy_matches_brute_force():
    torch.manual_seed(0)
    model = tiny_clip("softmax")
    batches = [pair_batch(32, seed) for seed in range(3)]
    accuracy = zero_shot_accuracy(model, batches)
    prompts = tokenize([ZERO_SHOT_TEMPLATE.format(name=name) for name in DIGIT_NAMES])
    with torch.no_grad():
        classes = F.normalize(model.encode_text(prompts), dim=-1)
        hits = [int(torch.argmax(F.normalize(model.encode_image(b["image"][i:i + 1]), dim=-1) @ classes.T)) == int(y)
                for b in batches for i, y in enumerate(b["label"])]
    assert accuracy == pytest.approx(sum(hits) / len(hits))
    assert model.training  # restored


def test_mlp_learns_clean_digits(tmp_path):
    make_digits(tmp_path, n_train=100, n_curated=1000, n_test=500, shard_size=1000)
    train = collate(load_digits(shard_urls(tmp_path, "digits", "curated")), "image", "target")
    test = collate(load_digits(shard_urls(tmp_path, "digits", "test")), "image", "label")
    torch.manual_seed(0)
    model = mlp(10, image_size=16)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(1000, (64,), generator=g)
        loss = F.cross_entropy(model(train["image"][idx]), train["target"][idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (model(test["image"]).argmax(1) == test["label"]).float().mean().item()
    assert accuracy > 0.7  # chance is 0.1; test images come from source digits never seen in training


@pytest.mark.slow
def test_tiny_clip_learns_zero_shot_digits(tmp_path):
    """300 SigLIP steps on clean train pairs: zero-shot accuracy on the held-out test split far above chance."""
    make_digits(tmp_path, n_train=3000, n_curated=10, n_test=1000, shard_size=1000)
    clean = [s for s in load_pairs(shard_urls(tmp_path, "pairs", "train")) if not s["is_noisy"]]
    train = collate(clean, "image", "text")
    test = collate(load_pairs(shard_urls(tmp_path, "pairs", "test")), "image", "label")
    torch.manual_seed(0)
    model = tiny_clip("sigmoid")
    before = zero_shot_accuracy(model, [test])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    siglip = open_clip.loss.SigLipLoss()
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(300):
        idx = torch.randint(len(train["text"]), (64,), generator=g)
        image = model.encode_image(train["image"][idx], normalize=True)
        text = model.encode_text(train["text"][idx], normalize=True)
        loss = siglip(image, text, model.logit_scale.exp(), model.logit_bias)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    accuracy = zero_shot_accuracy(model, [test])
    print(f"tiny_clip sigmoid: zero-shot {before:.3f} -> {accuracy:.3f} after 300 steps in {seconds:.1f}s")
    assert accuracy > 0.4  # chance is 0.1 (measured ~0.78 at this seed)
