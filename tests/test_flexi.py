"""Flexi-JEST (pipelines.flexi): one open_clip ViT at two resolutions, mixed-resolution training, and the FLOP
ledger counting the low-resolution scoring forward and the mixed training forward at their own FLOPs."""

import copy
import functools
import pickle

import pytest
import torch
from open_clip.loss import SigLipLoss
from timm.layers import resample_abs_pos_embed
from torch.utils.data import default_collate

import curate
from curate.flops import forward_flops
from pipelines import flexi
from pipelines.recipe import FlexiConfig, ModelConfig
from pipelines.task_digits import DigitsTask
from pipelines.task_pairs import PairsTask

from .conftest import make_pairs, tiny_clip


def _flexible(image_size=16, seed=0):
    return flexi.make_flexible(tiny_clip(image_size=image_size, seed=seed))


def test_the_native_resolution_is_open_clips_forward_and_the_state_is_unchanged():
    plain, model = tiny_clip(image_size=16), _flexible()
    images = torch.randn(5, 3, 16, 16)
    assert type(model.visual) is flexi.FlexibleVisionTransformer
    torch.testing.assert_close(model.encode_image(images), plain.encode_image(images), rtol=0, atol=0)
    assert model.state_dict().keys() == plain.state_dict().keys()
    for module in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # WeightSync copies, Ray pickles
        torch.testing.assert_close(module.encode_image(images), plain.encode_image(images), rtol=0, atol=0)


def test_low_resolution_is_a_vit_built_for_that_size_with_timms_resized_positions():
    model = _flexible()  # 16×16 in 4×4 patches: a 4×4 grid
    positions = model.visual.positional_embedding.detach()
    resized = flexi.resize_positions(positions, (4, 4), (2, 2))
    torch.testing.assert_close(resized, resample_abs_pos_embed(positions[None], [2, 2], [4, 4])[0])
    small = tiny_clip(image_size=8)  # the same architecture made for 8×8 images, with the same weights
    state = {k: v for k, v in model.state_dict().items() if k != "visual.positional_embedding"}
    small.load_state_dict({**state, "visual.positional_embedding": resized})
    images = torch.randn(6, 3, 8, 8)
    torch.testing.assert_close(model.encode_image(images), small.encode_image(images))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model.encode_image(torch.randn(1, 3, 10, 10))


def test_training_at_low_resolution_reaches_the_native_positional_embeddings():
    model = _flexible().train()
    pairs = default_collate(make_pairs(8, image_size=16))
    task, cfg = PairsTask(), ModelConfig(kind="tiny_clip", loss="sigmoid")
    task.train_loss(model, pairs, cfg, torch.device("cpu"), flexi=FlexiConfig(downsample=2, train_share=1.0)).backward()
    assert model.visual.positional_embedding.grad[1:].abs().sum() > 0  # the grid part, through the resize


def test_mixed_resolution_rows_spread_evenly_and_the_loss_is_open_clips_over_them():
    assert flexi.low_res_rows(8, 0.5).tolist() == [False, True] * 4
    assert [int(flexi.low_res_rows(n, s).sum()) for n, s in ((10, 0.3), (7, 0.0), (7, 1.0), (64, 0.25))] == \
        [3, 0, 7, 16]
    model = _flexible()
    pairs = default_collate(make_pairs(8, image_size=16))
    mixed = flexi.encode_mixed(model, pairs["image"], 2, 0.5)
    for i in range(8):  # every row as if encoded alone at its resolution
        image = pairs["image"][i:i + 1]
        alone = model.encode_image(torch.nn.functional.avg_pool2d(image, 2) if i % 2 else image, normalize=True)
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    cfg = ModelConfig(kind="tiny_clip", loss="sigmoid")
    loss = PairsTask().train_loss(model, pairs, cfg, torch.device("cpu"), flexi=FlexiConfig(downsample=2))
    text = model.encode_text(pairs["text"], normalize=True)
    torch.testing.assert_close(loss, SigLipLoss()(mixed, text, model.logit_scale.exp(), model.logit_bias))


def test_the_ledger_counts_low_resolution_scoring_and_mixed_training_at_their_own_flops():
    model, n, kept = _flexible(), 40, 8
    data = make_pairs(n * 3, image_size=16)
    scorer = curate.ContrastiveScorer()
    mixed = flexi.MixedResolutionScorer(2, 0.5)
    pipe = curate.pipeline(data, learner=model, scorer=scorer, rule="hard_learner", method="joint", batch_size=kept,
                           superbatch_size=n, shuffle_buffer=0, score_transform=functools.partial(flexi.downsample,
                                                                                                 factor=2),
                           train_scorer=mixed)
    batches = list(pipe)
    stats = pipe.stats()
    superbatch = default_collate(data[:n])
    low = forward_flops(model, flexi.downsample(superbatch, 2), scorer) / n
    full = forward_flops(model, superbatch, scorer) / n
    assert stats["flops_per_sample"]["learner"] == pytest.approx(low)
    assert stats["flops_per_sample"]["train"] == pytest.approx(forward_flops(model, batches[0], mixed) / kept)
    assert low < stats["flops_per_sample"]["train"] < full  # a quarter of the patches; half the rows at full
    assert stats["scoring_flops"] == pytest.approx(low * len(data))
    assert stats["training_flops"] == pytest.approx(3 * stats["flops_per_sample"]["train"] * stats["kept"])


def test_flexi_needs_an_open_clip_vit_and_says_so():
    with pytest.raises(TypeError, match="image tower is a VisionTransformer"):
        flexi.make_flexible(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Flexi-JEST needs an image-text task"):
        DigitsTask().scorer(ModelConfig(kind="small_cnn"), flexi=FlexiConfig())
