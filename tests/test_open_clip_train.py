"""curate.integrations.open_clip against open_clip_train's real training loop: a tiny open_clip ViT from a custom
config (no weights) trained by `open_clip_train.train.train_one_epoch` on JEST-selected batches read from JPEG
webdataset shards; the loss falls, and an epoch resumed from the pipeline's state trains on the same batches."""

import argparse
import copy
import itertools

import pytest
import torch

import curate

open_clip = pytest.importorskip("open_clip")
oc = pytest.importorskip("curate.integrations.open_clip")
from open_clip_train.train import train_one_epoch  # noqa: E402

from pipelines.data import make_digits  # noqa: E402

CONTEXT = 16


def tiny_vit(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.CLIP(embed_dim=32, vision_cfg={"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                                    "head_width": 32, "mlp_ratio": 2.0},
                          text_cfg={"context_length": CONTEXT, "vocab_size": 49408, "width": 64, "heads": 2,
                                    "layers": 2, "mlp_ratio": 2.0}, output_dict=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    make_digits(root, n_train=640, n_curated=64, n_test=64, shard_size=160, format="webdataset")
    return sorted(str(path) for path in (root / "pairs").glob("train-*.tar"))


def _args(batch_size: int) -> argparse.Namespace:
    """The options train_one_epoch reads (open_clip_train.params' defaults for one CPU process)."""
    return argparse.Namespace(device="cpu", precision="fp32", accum_freq=1, distill=False, skip_scheduler=True,
                              grad_clip_norm=None, horovod=False, batch_size=batch_size, world_size=1, rank=0,
                              local_rank=0, log_every_n_steps=100, wandb=False, save_logs=False)


def _data(urls, model, reference):
    preprocess = open_clip.image_transform(32, is_train=False)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT)
    return {"train": oc.get_data(urls, preprocess, tokenizer, num_samples=640, batch_size=16, learner=model,
                                 reference=reference, scorer=curate.ContrastiveScorer(loss="softmax"),
                                 filter_ratio=0.5, method="joint", n_chunks=2, shuffle_buffer=64, seed=1)}


def _recorded(model) -> list:
    seen: list = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()) if m.training else None)
    return seen


def _loss_on(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        out = model(*batch)
        value = open_clip.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    model.train()
    return float(value)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_open_clip_train_one_epoch_trains_on_jest_batches_and_an_epoch_resumes_exactly(shards, tmp_path):
    reference = tiny_vit(7).eval()
    model = tiny_vit(0)
    data = _data(shards, model, reference)
    loader = data["train"].dataloader
    assert (loader.num_batches, loader.num_samples) == (20, 320)  # 640 samples / superbatch 32; 16 kept of each
    pairs = oc.webdataset_pairs(shards, open_clip.image_transform(32, is_train=False),
                                open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT))
    first = torch.utils.data.default_collate(list(itertools.islice(pairs, 128)))
    held_out = first["image"], first["text"]
    before = _loss_on(model, held_out)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    seen = _recorded(model)
    loss = open_clip.ClipLoss()
    train_one_epoch(model, data, loss, 0, optimizer, None, None, None, _args(16))
    assert len(seen) == 20 and all(images.shape == (16, 3, 32, 32) for images in seen)
    state = curate.save_state(tmp_path, data["train"].dataloader.pipe)  # after epoch 0, as open_clip checkpoints
    at_epoch_end = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    train_one_epoch(model, data, loss, 1, optimizer, None, None, None, _args(16))
    assert len(seen) == 40
    after = _loss_on(model, held_out)
    # 40 steps of a fresh tiny ViT: the loss falls from its initial value to about chance (log 128 = 4.85, where
    # it plateaus for the first few hundred steps); this checks that training runs on these batches, not what it learns
    assert after < before - 0.3, (before, after)

    # a fresh process: the model and optimizer of the epoch-0 checkpoint, the pipeline from its state file
    resumed = tiny_vit(0)
    resumed.load_state_dict(at_epoch_end[0])
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=2e-3)
    resumed_optimizer.load_state_dict(at_epoch_end[1])
    again = _recorded(resumed)
    resumed_data = _data(shards, resumed, reference)
    curate.load_state(tmp_path, resumed_data["train"].dataloader.pipe)
    assert state.endswith("pipeline-rank00000-of-00001.pt")
    train_one_epoch(resumed, resumed_data, loss, 1, resumed_optimizer, None, None, None, _args(16))
    assert len(again) == 20
    for got, want in zip(again, seen[20:], strict=True):
        assert torch.equal(got, want)


def test_data_info_needs_the_epochs_length_and_yields_image_text_tuples():
    samples = [{"__key__": f"k{i}", "image": torch.zeros(3, 4, 4), "text": torch.zeros(CONTEXT, dtype=torch.long)}
               for i in range(8)]
    with pytest.raises(ValueError, match="open_clip_train needs the number of batches per epoch"):
        oc.data_info(curate.pipeline(iter(samples), batch_size=4, filter_ratio=0, shuffle_buffer=0,
                                        rule="uniform", method="sample"))
    info = oc.data_info(curate.pipeline(samples, batch_size=4, filter_ratio=0, shuffle_buffer=0,
                                        rule="uniform", method="sample"))
    images, texts = next(iter(info.dataloader))
    assert images.shape == (4, 3, 4, 4) and texts.shape == (4, CONTEXT)
    assert (info.dataloader.num_batches, info.dataloader.num_samples) == (2, 8)
