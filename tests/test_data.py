"""pipelines.data: the embedded digits shards (generation, determinism, noise, splits) and their loaders."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.data import (
    CAPTION_TEMPLATES,
    DIGIT_NAMES,
    _read_shards,
    class_prompts,
    load_digits,
    load_pairs,
    make_digits,
    shard_urls,
    tokenize,
)

from .conftest import make_bucket

SIZES = {"train": 1200, "curated": 300, "test": 300}
ROOT = Path(__file__).resolve().parents[1]


def make(out: Path, **options) -> dict:
    kwargs = {"n_train": SIZES["train"], "n_curated": SIZES["curated"], "n_test": SIZES["test"], "shard_size": 500}
    return make_digits(out, **{**kwargs, **options})


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("digits")
    return root, make(root, seed=0)


def tar_samples(path: Path) -> list[dict]:
    """Reference reader: Python's tarfile, grouped by key as webdataset documents it."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, field = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[field] = tar.extractfile(member).read()
    return list(samples.values())


def all_samples(root: Path, dataset: str, split: str) -> list[dict]:
    return [s for url in shard_urls(root, dataset, split) for s in tar_samples(Path(url))]


def test_manifest_counts_and_shards(made):
    root, manifest = made
    assert json.loads((root / "manifest.json").read_text()) == manifest
    assert manifest["image_size"] == 16 and manifest["seed"] == 0
    assert sum(manifest["source_pools"].values()) == 1797
    for dataset in ("pairs", "digits"):
        for split, n in SIZES.items():
            entry = manifest[dataset]["splits"][split]
            assert entry["count"] == n
            assert len(entry["shards"]) == -(-n // 500)
            assert [s["count"] for s in entry["shards"]] == [min(500, n - i) for i in range(0, n, 500)]
            for shard in entry["shards"]:
                assert (root / shard["path"]).stat().st_size == shard["bytes"]
            assert sum(len(tar_samples(root / s["path"])) for s in entry["shards"]) == n
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_same_seed_gives_byte_identical_shards(made, tmp_path):
    root, manifest = made
    again = make(tmp_path / "again", seed=0)
    assert again == manifest
    for path in root.rglob("*.tar"):
        assert (tmp_path / "again" / path.relative_to(root)).read_bytes() == path.read_bytes(), path
    other = make(tmp_path / "other", seed=1)
    first = lambda m: m["pairs"]["splits"]["train"]["shards"][0]["sha256"]  # noqa: E731
    assert first(other) != first(manifest)


def test_keys_unique_everywhere(made):
    root, _ = made
    keys = [s["__key__"] for d in ("pairs", "digits") for split in SIZES for s in all_samples(root, d, split)]
    assert len(keys) == len(set(keys)) == 2 * sum(SIZES.values())


def test_splits_disjoint_by_source_image(made):
    root, manifest = made
    for dataset in ("pairs", "digits"):
        sources = {split: {json.loads(s["json"])["source"] for s in all_samples(root, dataset, split)}
                   for split in SIZES}
        assert not sources["train"] & sources["curated"]
        assert not sources["train"] & sources["test"]
        assert not sources["curated"] & sources["test"]
        for split, used in sources.items():  # balanced draws use every source image of a pool
            assert len(used) == min(manifest["source_pools"][split], SIZES[split])


def test_pair_noise_kinds_are_exact_and_what_they_say(made):
    root, manifest = made
    train = all_samples(root, "pairs", "train")
    meta = [json.loads(s["json"]) for s in train]
    kinds = Counter(m["noise"] for m in meta)
    n_noisy = round(0.4 * SIZES["train"])
    assert kinds == {"clean": SIZES["train"] - n_noisy, "misaligned": round(0.5 * n_noisy),
                     "junk": round(0.3 * n_noisy), "duplicate": round(0.2 * n_noisy)}
    assert manifest["pairs"]["splits"]["train"]["noise_counts"] == dict(kinds)
    assert all(m["is_noisy"] == (m["noise"] != "clean") for m in meta)
    by_key = {s["__key__"]: s for s in train}
    for sample, m in zip(train, meta, strict=True):
        caption = sample["txt"].decode()
        said = {d for d in range(10) for t in CAPTION_TEMPLATES if t.format(name=DIGIT_NAMES[d], digit=d) == caption}
        if m["noise"] == "clean":
            assert m["label"] in said
        elif m["noise"] == "misaligned":
            assert said and m["label"] not in said
        elif m["noise"] == "junk":
            assert not said
        else:
            original = by_key[m["duplicate_of"]]
            assert json.loads(original["json"])["noise"] == "clean" and original["txt"] == sample["txt"]
            diff = np.load(io.BytesIO(sample["npy"])).astype(int) - np.load(io.BytesIO(original["npy"])).astype(int)
            assert 0 < np.abs(diff).mean() < 6  # the same image with tiny noise (std 4 of 255)
    for split in ("curated", "test"):
        assert manifest["pairs"]["splits"][split]["noisy"] == 0


def test_label_noise_flips_exactly_to_other_classes(made):
    root, manifest = made
    train = all_samples(root, "digits", "train")
    target = np.array([int(s["cls"]) for s in train])
    meta = [json.loads(s["json"]) for s in train]
    label = np.array([m["label"] for m in meta])
    noisy = np.array([m["is_noisy"] for m in meta])
    assert np.array_equal(noisy, target != label)
    assert noisy.sum() == round(0.3 * SIZES["train"]) == manifest["digits"]["splits"]["train"]["noisy"]
    offsets = Counter(((target - label) % 10)[noisy].tolist())  # flips are uniform over the 9 other classes
    assert set(offsets) <= set(range(1, 10)) and max(offsets.values()) < 3 * min(offsets.values())
    for split in ("curated", "test"):
        clean = all_samples(root, "digits", split)
        assert all(int(s["cls"]) == json.loads(s["json"])["label"] for s in clean)
    assert sorted(Counter(label.tolist())) == list(range(10))


def test_fast_tar_reader_matches_tarfile(made):
    root, _ = made
    for url in shard_urls(root, "pairs", "curated") + shard_urls(root, "digits", "train")[:1]:
        ours = [{k: v for k, v in s.items() if k != "__url__"} for s in _read_shards([{"url": url}], {})]
        assert ours == tar_samples(Path(url))


def test_reader_handles_long_names_and_rejects_corruption(tmp_path):
    path = tmp_path / "long.tar"
    name = "d" * 120 + "/sample-1"  # > 100 characters: stored in a pax header (or ustar prefix)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for field, data in (("json", b'{"label": 1}'), ("txt", b"\xc3\xa9t\xc3\xa9")):
            info = tarfile.TarInfo(f"{name}.{field}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert list(_read_shards([{"url": str(path)}], {})) == [
        {"__key__": name, "__url__": str(path), "json": b'{"label": 1}', "txt": "été".encode()}]
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF  # inside the first header: tar checksums cover headers, not file data
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum|truncated"):
        list(_read_shards([{"url": str(tmp_path / "bad.tar")}], {}))


def test_load_pairs_fields(made):
    root, manifest = made
    samples = list(load_pairs(shard_urls(root, "pairs", "train")))
    assert [s["__key__"] for s in samples] == [f"pairs-train-{i:06d}" for i in range(SIZES["train"])]
    raw = all_samples(root, "pairs", "train")
    for sample, ref in zip(samples[:50], raw[:50], strict=True):
        assert set(sample) == {"__key__", "image", "text", "caption", "label", "is_noisy", "noise"}
        assert sample["image"].shape == (3, 16, 16) and sample["image"].dtype == torch.float32
        pixels = np.load(io.BytesIO(ref["npy"]))
        for channel in sample["image"]:
            assert torch.equal(channel, torch.from_numpy(pixels.astype(np.float32) / 255))
        assert sample["text"].dtype == torch.int64 and sample["text"].shape == (16,)
        assert sample["caption"] == ref["txt"].decode()
        assert torch.equal(sample["text"], tokenize(sample["caption"])[0])
        meta = json.loads(ref["json"])
        assert [sample[k] for k in ("label", "is_noisy", "noise")] == [meta[k] for k in ("label", "is_noisy", "noise")]
    assert sum(s["is_noisy"] for s in samples) == manifest["pairs"]["splits"]["train"]["noisy"]
    batch = torch.utils.data.default_collate(samples[:8])
    assert batch["image"].shape == (8, 3, 16, 16) and batch["text"].shape == (8, 16)
    one = next(iter(load_pairs(shard_urls(root, "pairs", "test"), context_length=8, channels=1)))
    assert one["image"].shape == (1, 16, 16) and one["text"].shape == (8,)


def test_load_digits_fields_and_patterns(made):
    root, _ = made
    pattern = str(root / "digits/train-{000000..000002}.tar")
    samples = list(load_digits(pattern))
    assert [s["__key__"] for s in samples] == [s["__key__"] for s in load_digits(shard_urls(root, "digits", "train"))]
    assert [s["__key__"] for s in samples] == [s["__key__"] for s in load_digits(pattern)]  # re-iterable, same order
    sample = samples[0]
    assert set(sample) == {"__key__", "image", "target", "label", "is_noisy", "noise"}
    assert sample["image"].shape == (1, 16, 16) and 0 <= sample["image"].min() and sample["image"].max() <= 1
    assert all(s["is_noisy"] == (s["target"] != s["label"]) for s in samples)


def test_loader_errors_name_the_problem(made, tmp_path):
    root, _ = made
    with pytest.raises(ValueError, match="no .txt file"):
        next(iter(load_pairs(shard_urls(root, "digits", "test"))))
    with pytest.raises(ValueError, match="no shard URLs"):
        load_digits([])
    with pytest.raises(ValueError, match="channels"):
        load_digits(shard_urls(root, "digits", "test"), channels=0)
    with pytest.raises(ValueError, match="split="):
        shard_urls(root, "digits", "validation")
    shard = root / manifest_path(root, "digits", "test")
    (tmp_path / "cut.tar").write_bytes(shard.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="truncated"):
        list(load_digits(str(tmp_path / "cut.tar")))


def manifest_path(root: Path, dataset: str, split: str) -> str:
    return json.loads((root / "manifest.json").read_text())[dataset]["splits"][split]["shards"][0]["path"]


def test_make_digits_validates(tmp_path):
    with pytest.raises(ValueError, match="pair_noise"):
        make_digits(tmp_path, pair_noise=1.5)
    with pytest.raises(ValueError, match="noise_mix"):
        make_digits(tmp_path, noise_mix={"misaligned": 0.5, "typo": 0.5})
    with pytest.raises(ValueError, match="image_size"):
        make_digits(tmp_path, image_size=4)
    assert not list(tmp_path.iterdir())


def test_rerun_replaces_shards_and_removes_stale_ones(tmp_path):
    small = {"n_train": 600, "n_curated": 50, "n_test": 50}
    make_digits(tmp_path, shard_size=100, **small)
    manifest = make_digits(tmp_path, shard_size=400, **small)
    assert sorted(p.name for p in (tmp_path / "pairs").glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]
    count = sum(1 for _ in load_pairs(shard_urls(tmp_path, "pairs", "train")))
    assert count == manifest["pairs"]["splits"]["train"]["count"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_killed_run_leaves_no_partial_shard(tmp_path):
    """A real subprocess killed mid-write: every *.tar present is complete, and there is no manifest."""
    script = (f"from pipelines.data import make_digits; make_digits({str(tmp_path)!r}, n_train=12000, n_curated=10,"
              f" n_test=10, shard_size=1000)")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "pairs").glob("train-*.tar")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    shards = list(tmp_path.rglob("*.tar"))
    assert shards, "the run was killed before writing any shard; raise n_train"
    for shard in shards:
        assert len(tar_samples(shard)) == 1000
    assert not (tmp_path / "manifest.json").exists()


def test_s3_loading_matches_local(made, s3_server):
    """Shards and manifest served by a real (moto) S3 server, read through fsspec/s3fs."""
    root, _ = made
    fs = make_bucket(s3_server, "digits")
    for path in [root / "manifest.json", *(root / "pairs").glob("*.tar")]:
        fs.put_file(str(path), f"digits/data/{path.relative_to(root).as_posix()}")
    urls = shard_urls("s3://digits/data", "pairs", "train", storage_options=s3_server)
    assert urls == [u.replace(str(root), "s3://digits/data") for u in shard_urls(root, "pairs", "train")]
    remote = list(load_pairs(urls, storage_options=s3_server))
    local = list(load_pairs(shard_urls(root, "pairs", "train")))
    assert [s["__key__"] for s in remote] == [s["__key__"] for s in local]
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
               for a, b in zip(remote, local, strict=True))
    pattern = "s3://digits/data/pairs/curated-{000000..000000}.tar"
    assert len(list(load_pairs(pattern, storage_options=s3_server))) == SIZES["curated"]


def test_class_prompts_and_no_network(monkeypatch):
    """A fresh tokenizer works with every socket connection refused: its BPE vocab ships in the wheel."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network touched")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    data_module = sys.modules["pipelines.data"]
    data_module._tokenizer.cache_clear()
    data_module._tokens.cache_clear()
    prompts = class_prompts()
    assert prompts.shape == (10, 16) and prompts.dtype == torch.int64
    assert len({tuple(row) for row in prompts.tolist()}) == 10
    assert torch.equal(prompts[7], tokenize("a photo of the digit seven")[0])
    assert torch.equal(class_prompts("handwritten {digit}", context_length=12),
                       tokenize([f"handwritten {d}" for d in range(10)], 12))
    eot = prompts.argmax(1)  # open_clip pools text at the end-of-text token, the largest id
    assert (prompts[torch.arange(10), eot] == 49407).all() and (prompts[:, 0] == 49406).all()


# ---------------------------------------------------------------- the same samples in the shapes of your own data


@pytest.fixture(scope="module")
def exported(tmp_path_factory, made) -> Path:
    root = tmp_path_factory.mktemp("exported")
    make(root, seed=0, format="webdataset")
    make(root, seed=0, format="parquet")
    return root


def _jpeg_pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        return np.asarray(image)


@pytest.mark.parametrize("dataset", ["pairs", "digits"])
def test_jpeg_tar_and_parquet_exports_hold_the_npy_datasets_samples(made, exported, dataset):
    """Read with real webdataset and polars: the same keys, members and images (up to JPEG loss), both formats
    in one directory, each with its own manifest."""
    import polars as pl
    import webdataset as wds

    root, _ = made
    for split in SIZES:
        npy = {s["__key__"]: s for s in all_samples(root, dataset, split)}
        tars = sorted(str(p) for p in (exported / dataset).glob(f"{split}-*.tar"))
        from_tar = {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False)}
        tables = sorted((exported / dataset).glob(f"{split}-*.parquet"))
        rows = pl.concat([pl.read_parquet(t) for t in tables]).to_dicts()
        assert len(tars) == len(tables) == -(-SIZES[split] // 500)
        assert list(from_tar) == [row["__key__"] for row in rows] == list(npy)
        for row in rows:
            original, tar = npy[row["__key__"]], from_tar[row["__key__"]]
            meta = json.loads(original["json"])
            assert tar["json"] == original["json"] and row["json"] == original["json"].decode()
            assert tar["cls"] == original.get("cls", b"%d" % meta["label"]) and row["cls"] == int(tar["cls"])
            if dataset == "pairs":
                assert tar["txt"] == original["txt"] and row["txt"] == original["txt"].decode()
            assert tar["jpg"] == row["jpg"]
            pixels = np.load(io.BytesIO(original["npy"])).astype(np.float32)
            decoded = _jpeg_pixels(tar["jpg"]).astype(np.float32)
            assert decoded.shape == (*pixels.shape, 3) and np.abs(decoded.mean(-1) - pixels).mean() < 4
    for fmt in ("webdataset", "parquet"):
        manifest = json.loads((exported / f"manifest-{fmt}.json").read_text())
        shards = manifest[dataset]["splits"]["train"]["shards"]
        assert manifest["format"] == fmt and all((exported / shard["path"]).exists() for shard in shards)
    assert not (exported / "manifest.json").exists()  # not the demo's data: its recipes say how to make theirs


def test_exports_are_deterministic_and_a_rerun_removes_stale_shards(exported, tmp_path):
    for fmt, suffix in (("webdataset", "tar"), ("parquet", "parquet")):
        make(tmp_path, seed=0, format=fmt, shard_size=250)
        make(tmp_path, seed=0, format=fmt)  # 500 a shard: half as many
        for path in (exported / "digits").glob(f"*.{suffix}"):
            assert (tmp_path / "digits" / path.name).read_bytes() == path.read_bytes()
        assert sorted(p.name for p in (tmp_path / "digits").glob(f"*.{suffix}")) == \
            sorted(p.name for p in (exported / "digits").glob(f"*.{suffix}"))


def test_npy_and_jpeg_tar_shards_share_names_so_writing_one_drops_the_others_manifest(tmp_path):
    small = {"n_train": 100, "n_curated": 20, "n_test": 20}
    make_digits(tmp_path, **small)
    make_digits(tmp_path, format="parquet", **small)
    make_digits(tmp_path, format="webdataset", **small)
    assert sorted(p.name for p in tmp_path.glob("manifest*.json")) == ["manifest-parquet.json",
                                                                       "manifest-webdataset.json"]
    with pytest.raises(ValueError, match="format must be one of"):
        make_digits(tmp_path, format="jpeg")
