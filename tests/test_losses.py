import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from curate.losses import (
    cross_entropy_losses,
    sigmoid_example_losses,
    sigmoid_pair_losses,
    softmax_example_losses,
)

from .conftest import make_pairs, tiny_clip


def _features(n=37, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n, d, generator=g), dim=1)
    v = F.normalize(torch.randn(n, d, generator=g) + 0.5 * u, dim=1)
    return u, v


def _clip_outputs(loss):
    model = tiny_clip(loss)
    batch = make_pairs(23)
    images = torch.stack([s["image"] for s in batch])
    texts = torch.stack([s["text"] for s in batch])
    with torch.no_grad():
        u = model.encode_image(images, normalize=True)
        v = model.encode_text(texts, normalize=True)
        bias = model.logit_bias if model.logit_bias is not None else torch.tensor(0.0)
        return u, v, model.logit_scale.exp(), bias


@pytest.mark.parametrize("source", ["random", "open_clip"])
def test_sigmoid_pairs_sum_to_siglip(source):
    if source == "random":
        u, v = _features()
        scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    else:
        u, v, scale, bias = _clip_outputs("sigmoid")
    expected = SigLipLoss()(u, v, scale, bias)
    pairs = sigmoid_pair_losses(u, v, scale, bias)
    assert pairs.shape == (u.shape[0], u.shape[0])
    torch.testing.assert_close(pairs.sum() / u.shape[0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sigmoid_example_losses(u, v, scale, bias).mean(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", ["random", "open_clip"])
def test_softmax_examples_average_to_clip(source):
    if source == "random":
        u, v = _features()
        scale = torch.tensor(14.0)
    else:
        u, v, scale, _ = _clip_outputs("softmax")
    expected = ClipLoss()(u, v, scale)
    torch.testing.assert_close(softmax_example_losses(u, v, scale).mean(), expected, rtol=1e-5, atol=1e-5)


def test_pair_blocks_match_the_full_matrix():
    u, v = _features(n=20)
    full = sigmoid_pair_losses(u, v, 7.0, -3.0)
    rows, cols = torch.tensor([3, 0, 19]), torch.tensor([19, 3, 5, 0])
    torch.testing.assert_close(sigmoid_pair_losses(u, v, 7.0, -3.0, rows, cols), full[rows][:, cols])


def test_example_losses_are_blockwise_exact(monkeypatch):
    import curate.losses as losses

    u, v = _features(n=50)
    whole = (sigmoid_example_losses(u, v, 5.0, -2.0), softmax_example_losses(u, v, 5.0))
    monkeypatch.setattr(losses, "_BLOCK", 7)  # force several row blocks
    torch.testing.assert_close(sigmoid_example_losses(u, v, 5.0, -2.0), whole[0])
    torch.testing.assert_close(softmax_example_losses(u, v, 5.0), whole[1])


def test_cross_entropy_per_example():
    logits = torch.randn(9, 4)
    targets = torch.randint(4, (9,))
    losses = cross_entropy_losses(logits, targets)
    torch.testing.assert_close(losses.mean(), F.cross_entropy(logits, targets))
    assert losses.shape == (9,)
