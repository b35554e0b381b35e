"""Shared test helpers: data made in code, tiny real models, and the one resume harness."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

torch.set_num_threads(1)  # tiny models: one thread is fastest and avoids oversubscription


def make_samples(n: int, dim: int = 8, n_classes: int = 3, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.randint(n_classes, (n,), generator=g)
    return [{"__key__": f"s{i:05d}", "input": x[i], "target": y[i]} for i in range(n)]


def linear_models(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A learner and a reference for 8-dim inputs, 3 classes (make_samples), the same for the same seed."""
    torch.manual_seed(seed)
    return nn.Linear(8, 3), nn.Linear(8, 3)


def tiny_clip(loss: str = "sigmoid", embed_dim: int = 16, image_size: int = 8, vocab_size: int = 64,
              context_length: int = 6, seed: int = 0) -> nn.Module:
    """A real open_clip CLIP built from a config (no download), small enough for CPU tests."""
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=embed_dim,
        vision_cfg={"layers": 1, "width": 32, "head_width": 16, "patch_size": 4, "image_size": image_size},
        text_cfg={"context_length": context_length, "vocab_size": vocab_size, "width": 32, "heads": 2, "layers": 1},
        init_logit_bias=-10.0 if loss == "sigmoid" else None,
    )
    return model.eval()


def make_pairs(n: int, image_size: int = 8, vocab_size: int = 64, context_length: int = 6, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, image_size, image_size, generator=g)
    texts = torch.randint(1, vocab_size, (n, context_length), generator=g)
    return [{"__key__": f"p{i:05d}", "image": images[i], "text": texts[i]} for i in range(n)]


def roundtrip(state: dict) -> dict:
    """A state dict as a checkpoint would give it back: through torch.save and a weights-only load."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same_stream(a: list, b: list) -> None:
    assert len(a) == len(b), f"streams differ in length: {len(a)} != {len(b)}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert_same_item(x, y, where=f"item {i}")


class MapDataset(Dataset):
    """A map-style dataset over a list, for DataLoader and StatefulDataLoader sources (importable by workers)."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def assert_same_item(x, y, where: str = "") -> None:
    if isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys(), f"{where}: fields differ {x.keys()} vs {y.keys()}"
        for k in x:
            assert_same_item(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, torch.Tensor):
        assert torch.equal(x, y), f"{where}: tensors differ"
    elif isinstance(x, list | tuple):
        assert type(x) is type(y) and len(x) == len(y), f"{where}: {type(x).__name__} of {len(x)} vs {y!r:.80}"
        for i, (a, b) in enumerate(zip(x, y, strict=True)):
            assert_same_item(a, b, f"{where}[{i}]")
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):  # e.g. a ScoredSuperbatch and its ModelScores
        assert type(x) is type(y), f"{where}: {type(x).__name__} != {type(y).__name__}"
        for field in dataclasses.fields(x):
            assert_same_item(getattr(x, field.name), getattr(y, field.name), f"{where}.{field.name}")
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"


def check_resume(build, points: list[int], epochs: int = 2) -> list:
    """The shared resume harness (torchdata's `run_test_save_load_state` cases, through a real checkpoint).

    `build()` returns a fresh iterable with state_dict()/load_state_dict() (a curate.Pipeline or a torchdata
    Loader over a stage); each `iter()` is one epoch. The reference is `epochs` epochs of one uninterrupted
    build. Checkpoints are taken after p items for every p in `points` (counted across epochs), and always at
    the end of epoch 1 (after its last item, and after its StopIteration) and in the middle of epoch 2; each goes
    through torch.save and a weights-only load into a fresh build, which finishes the `epochs` epochs. Epoch by
    epoch, each `iter()` of the resumed build must give the reference's rest of that epoch, then its next epochs:
    a checkpoint after an epoch's last item resumes at the end of that epoch (an empty `iter()`, then the next
    epoch), one after its StopIteration in the next epoch, so a training loop's epoch count never shifts.
    Returns the first epoch's stream.
    """
    reference = build()
    per_epoch = [list(reference) for _ in range(epochs)]
    n1 = len(per_epoch[0])
    assert n1 > max(points), f"harness: an epoch of {n1} items is too short for {points=}"
    assert len(per_epoch[1]) >= 2, "harness: epoch 2 must have at least 2 items to resume inside it"
    cases = [(p, False) for p in points] + [(n1, False), (n1, True), (n1 + len(per_epoch[1]) // 2, False)]
    for p, after_stop in cases:
        first = build()
        it, head, epoch = iter(first), [], 0
        while len(head) < p:
            try:
                head.append(next(it))
            except StopIteration:  # the next epoch
                it, epoch = iter(first), epoch + 1
        if after_stop:
            assert next(it, None) is None, "harness: the epoch went on past its reference length"
        state = roundtrip(first.state_dict())
        second = build()
        second.load_state_dict(state)
        where = f"resumed after {p} items{' and the end of the epoch' if after_stop else ''}"
        done = len(head) - sum(len(e) for e in per_epoch[:epoch])  # items of `epoch` before the checkpoint
        expected = [per_epoch[epoch][done:]] + per_epoch[epoch + 1:]
        if after_stop:
            expected = per_epoch[epoch + 1:]
        for i, rest in enumerate(expected):
            got = list(second)
            assert len(got) == len(rest), (f"{where}: iter() {i} of the resumed build gave {len(got)} items, the "
                                           f"reference's epoch {epoch + i + 1} has {len(rest)} left"
                                           + (" (it resumed into the next epoch)" if not rest else ""))
            for j, (x, y) in enumerate(zip(got, rest, strict=True)):
                assert_same_item(x, y, where=f"{where}, iter() {i}, item {j}")
        if hasattr(second, "stats"):  # a Pipeline: what it counted comes back with the state too
            assert _timeless(second.stats()) == _timeless(reference.stats()), f"{where}: stats differ"
    return per_epoch[0]


def run_test_save_load_state(node, midpoint: int) -> None:
    """torchdata's own resume test (`test/nodes/utils.py::run_test_save_load_state` in pytorch/data, which the
    torchdata wheel does not ship), ported case for case: one node, reused by every Loader as there; states from
    the epoch start, `midpoint` items in and the end of epoch 0 (after its StopIteration); the results compared
    with `assert_same_stream` (torch tensors in them) instead of unittest's assertEqual, and the states passed
    through a real checkpoint (`roundtrip`)."""
    from torchdata.nodes import Loader

    x = Loader(node)
    initial_state_dict = roundtrip(x.state_dict())
    it = iter(x)
    results = [next(it) for _ in range(midpoint)]
    state_dict = roundtrip(x.state_dict())
    results.extend(it)
    state_dict_0_end = roundtrip(x.state_dict())
    results_1 = list(x)  # epoch 1

    x.load_state_dict(state_dict)  # restoring from the midpoint: the rest of epoch 0, then epoch 1
    assert_same_stream(list(x), results[midpoint:])
    assert_same_stream(list(x), results_1)

    x.load_state_dict(initial_state_dict)  # from the beginning after a resume: epochs 0 and 1 again
    assert_same_stream(list(x), results)
    assert_same_stream(list(x), results_1)

    x = Loader(node, restart_on_stop_iteration=False)  # from the end of epoch 0, not restarting: nothing
    x.load_state_dict(state_dict_0_end)
    assert_same_stream(list(x), [])

    x = Loader(node)  # from the end of epoch 0, restarting: epoch 1
    x.load_state_dict(state_dict_0_end)
    assert_same_stream(list(x), results_1)


def _timeless(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k not in ("score_seconds", "sync")}  # wall clock; the sync's pushes


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto's server) on 127.0.0.1, port 0, for the session: its s3fs storage options."""
    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {"key": "test", "secret": "test",
           "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}}
    server.stop()


def make_bucket(storage_options: dict, name: str):
    """Create bucket `name` on the test server; returns an s3fs filesystem for it."""
    import boto3
    from s3fs import S3FileSystem

    boto3.client("s3", aws_access_key_id=storage_options["key"], aws_secret_access_key=storage_options["secret"],
                 **storage_options["client_kwargs"]).create_bucket(Bucket=name)
    return S3FileSystem(**storage_options)


@pytest.fixture
def samples():
    return make_samples(500)
