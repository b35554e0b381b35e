"""Users' own shards and models in every job, end to end from YAML through the `curate` CLI: JPEG webdataset shards
(local and on S3) with an open_clip ViT built from a custom config, Parquet shards with a torchvision classifier,
a factory model, precompute killed and rerun, and every way the data or the model can fail to fit the recipe."""

import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from pipelines import tasks
from pipelines.cli import main
from pipelines.recipe import load_recipe

from .conftest import make_bucket

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TINY_VIT = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32,
                           "mlp_ratio": 2.0},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                         "mlp_ratio": 2.0}}


def _jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _samples(split: str, n: int, seed: int, noise: float = 0.0) -> list[dict]:
    """Digit images as 32×32 JPEGs with a caption naming the digit (junk for a `noise` share) and its class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        j = rng.randrange(len(digits.target))
        label = int(digits.target[j])
        image = Image.fromarray((digits.images[j] * 16).clip(0, 255).astype(np.uint8)).resize((32, 32))
        caption = f"a photo of the digit {NAMES[label]}" if rng.random() >= noise else f"IMG_{rng.randrange(9999)}.jpg"
        rows.append({"__key__": f"{split}-{i:05d}", "jpg": _jpeg(np.asarray(image)), "txt": caption, "cls": label})
    return rows


def _write_tar(path: Path, rows: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for row in rows:
            for field in ("jpg", "txt", "cls"):
                data = row[field] if isinstance(row[field], bytes) else str(row[field]).encode()
                info = tarfile.TarInfo(f"{row['__key__']}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _write_parquet(path: Path, rows: list[dict]) -> None:
    pl.DataFrame({"id": [r["__key__"] for r in rows], "image": [r["jpg"] for r in rows],
                  "label": [r["cls"] for r in rows]}).write_parquet(path)


def _shards(root: Path, fmt: str, counts: dict[str, tuple[int, int]]) -> dict[str, str]:
    """Writes split → (shards, samples per shard); returns split → brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    patterns = {}
    for s, (split, (n_shards, per)) in enumerate(counts.items()):
        for k in range(n_shards):
            rows = _samples(f"{split}{k}", per, seed=100 * s + k, noise=0.3 if split == "train" else 0.0)
            path = root / f"{split}-{k:06d}.{'tar' if fmt == 'webdataset' else 'parquet'}"
            (_write_tar if fmt == "webdataset" else _write_parquet)(path, rows)
        last = f"{n_shards - 1:06d}"
        ext = "tar" if fmt == "webdataset" else "parquet"
        patterns[split] = f"{root}/{split}-{{000000..{last}}}.{ext}" if n_shards > 1 else f"{root}/{split}-000000.{ext}"
    return patterns


SPLITS = {"train": (4, 40), "curated": (1, 60), "eval": (1, 40)}


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> dict[str, str]:
    return _shards(tmp_path_factory.mktemp("tars"), "webdataset", SPLITS)


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, str]:
    return _shards(tmp_path_factory.mktemp("tables"), "parquet", SPLITS)


@pytest.fixture(scope="module")
def vit_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-vit.json"
    path.write_text(json.dumps(TINY_VIT))
    return path


def _clip_recipe(out: Path, patterns: dict[str, str], config: Path, **data) -> dict:
    return {"name": "byo_clip_test",
            "data": {"format": "webdataset", "task": "contrastive", **patterns, **data},
            "model": {"kind": "open_clip", "config": str(config), "loss": "sigmoid"},
            "reference": {"steps": 5, "batch_size": 16},
            "cache": {"path": str(out / "cache"), "batch_size": 32},
            "selection": {"rule": "learnability", "method": "joint", "filter_ratio": 0.8, "n_chunks": 4,
                          "shuffle_buffer": 0},
            "eval": {"classnames": list(NAMES), "templates": ["a photo of the digit {}"]},
            "train": {"steps": 4, "batch_size": 8, "eval_every": 2, "out": str(out)}}


def _write(recipe: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _keys(cache: Path) -> list[str]:
    return pl.concat([pl.read_parquet(p) for p in sorted(cache.glob("part-*.parquet"))])["__key__"].to_list()


def _all_keys(split: str) -> set[str]:
    n_shards, per = SPLITS[split]
    return {f"{split}{k}-{i:05d}" for k in range(n_shards) for i in range(per)}


@pytest.mark.slow
def test_open_clip_vit_on_jpeg_webdataset_shards_every_job(tars, vit_config, tmp_path):
    out = tmp_path / "run"
    recipe = _write(_clip_recipe(out, tars, vit_config), tmp_path / "byo.yaml")
    assert main(["train-reference", recipe]) == 0
    info = json.loads((out / "reference" / "model.json").read_text())
    assert 0 <= info["test"]["accuracy"] <= 1 and "r1" in info["test"]
    for rank in (0, 1):  # two nodes, each scoring its half of the 4 shards
        assert main(["precompute", recipe, "--rank", str(rank), "--world-size", "2"]) == 0
        assert len(list((out / "cache").glob("part-*.parquet"))) == 2 * (rank + 1)
    assert sorted(_keys(out / "cache")) == sorted(_all_keys("train"))  # every train key scored once
    assert main(["inspect", str(out / "cache"), "--png", str(tmp_path / "scores.png")]) == 0
    assert (tmp_path / "scores.png").stat().st_size > 0
    assert main(["curate-set", recipe]) == 0
    kept = pl.read_parquet(out / "curated_keys.parquet")["__key__"].to_list()
    assert 0 < len(kept) <= 160 and set(kept) <= _all_keys("train")
    assert main(["run", recipe, "--compare", "uniform"]) == 0
    metrics = _metrics(out)
    assert {(m["run"], m["step"]) for m in metrics} == {(r, s) for r in ("learnability", "uniform") for s in (2, 4)}
    for record in metrics:
        assert 0 <= record["accuracy"] <= 1 and 0 <= record["r1"] <= 1 and record["noisy_kept"] is None
    assert metrics[-1]["pipeline"]["kept"] == 4 * 8


@pytest.mark.slow
def test_the_same_on_s3(tars, vit_config, tmp_path, s3_server):
    fs = make_bucket(s3_server, "own-shards")
    patterns = {}
    for split, pattern in tars.items():
        local = Path(pattern).parent
        for path in sorted(local.glob(f"{split}-*.tar")):
            fs.put(str(path), f"own-shards/shards/{path.name}")
        patterns[split] = pattern.replace(str(local), "s3://own-shards/shards")
    out = tmp_path / "run"
    recipe = _clip_recipe(out, patterns, vit_config, storage_options=s3_server)
    recipe["cache"]["path"] = "s3://own-shards/cache"
    recipe["prepare"] = True
    path = _write(recipe, tmp_path / "byo.yaml")
    assert main(["run", path]) == 0  # prepare: trains the reference, precomputes onto S3, then runs
    keys = [k for p in sorted(fs.glob("own-shards/cache/part-*.parquet"))
            for k in pl.read_parquet(io.BytesIO(fs.cat(p)))["__key__"].to_list()]
    assert sorted(keys) == sorted(_all_keys("train"))
    assert {m["step"] for m in _metrics(out)} == {2, 4}


def _classifier_recipe(out: Path, patterns: dict[str, str], **model) -> dict:
    return {"name": "byo_classifier_test",
            "data": {"format": "parquet", "task": "classification", **patterns, "image_size": 32,
                     "fields": {"image": "image", "label": "label", "key": "id"}},
            "model": {"kind": "torchvision", "name": "resnet18", "options": {"num_classes": 10}, **model},
            "reference": {"steps": 3, "batch_size": 16},
            "cache": {"path": str(out / "cache"), "batch_size": 32},
            "selection": {"rule": "learnability", "method": "topk", "filter_ratio": 0.8, "shuffle_buffer": 0},
            "train": {"steps": 2, "batch_size": 8, "eval_every": 1, "out": str(out)}, "prepare": True}


@pytest.mark.slow
def test_torchvision_classifier_on_parquet_with_rho_topk(tables, tmp_path):
    out = tmp_path / "run"
    assert main(["run", _write(_classifier_recipe(out, tables), tmp_path / "byo.yaml")]) == 0
    assert sorted(_keys(out / "cache")) == sorted(_all_keys("train"))
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2] and all(0 <= m["accuracy"] <= 1 for m in metrics)
    assert metrics[-1]["pipeline"]["kept"] == 2 * 8 and metrics[-1]["pipeline"]["seen"] == 2 * 40


def small_classifier(width: int = 8, *, image_size: int):
    """A user's own model for a factory: it asks for the data's image size."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(16 * width, 10))


@pytest.mark.slow
def test_a_factory_model_on_parquet_shards(tables, tmp_path):
    out = tmp_path / "run"
    recipe = _classifier_recipe(out, tables)
    recipe["model"] = {"kind": "factory", "factory": "tests.test_own_data:small_classifier", "options": {"width": 4}}
    assert main(["run", _write(recipe, tmp_path / "byo.yaml"), "--compare", "uniform"]) == 0
    assert {m["run"] for m in _metrics(out)} == {"learnability", "uniform"}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_precompute_killed_and_rerun_on_own_shards_scores_every_key_once(tmp_path, vit_config):
    patterns = _shards(tmp_path / "shards", "webdataset", {"train": (12, 20), "curated": (1, 40), "eval": (1, 20)})
    out = tmp_path / "run"
    recipe = _clip_recipe(out, patterns, vit_config)
    recipe["cache"]["batch_size"] = 5
    path = _write(recipe, tmp_path / "byo.yaml")
    assert main(["train-reference", path]) == 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for target in (2, 6):  # killed once 2 and then 6 parts are whole
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "precompute", path], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while len(list((out / "cache").glob("part-*.parquet"))) < target and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        parts = len(list((out / "cache").glob("part-*.parquet")))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL and parts < 12, "the job finished before it was killed"
    assert main(["precompute", path]) == 0
    keys = _keys(out / "cache")
    expected = {f"train{k}-{i:05d}" for k in range(12) for i in range(20)}
    assert len(keys) == len(expected) and set(keys) == expected  # every key once
    assert not [p for p in (out / "cache").iterdir() if not p.name.endswith(".parquet")]


# ---------------------------------------------------------------------------------------------- bad input


def _fails(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_an_unknown_open_clip_model_lists_close_matches(tars, tmp_path, capsys):
    recipe = _clip_recipe(tmp_path, tars, Path("unused"))
    recipe["model"] = {"kind": "open_clip", "name": "ViT-B-23"}
    err = _fails(capsys, ["train-reference", _write(recipe, tmp_path / "r.yaml")])
    assert "ViT-B-23" in err and "ViT-B-32" in err


def test_a_field_map_that_matches_nothing_names_the_members_found(tars, vit_config, tmp_path, capsys):
    recipe = _clip_recipe(tmp_path, tars, vit_config)
    recipe["data"]["fields"] = {"text": "caption"}
    err = _fails(capsys, ["train-reference", _write(recipe, tmp_path / "r.yaml")])
    assert "data.fields.text" in err and "'caption'" in err and "['cls', 'jpg', 'txt']" in err


def test_a_url_pattern_that_matches_nothing_is_named(tars, vit_config, tmp_path, capsys):
    recipe = _clip_recipe(tmp_path, tars, vit_config)
    recipe["data"]["train"] = str(tmp_path / "nowhere" / "train-{000000..000009}.tar")
    err = _fails(capsys, ["precompute", _write(recipe, tmp_path / "r.yaml")])
    assert "data.train" in err and "nowhere/train-000000.tar" in err and "matches nothing" in err


def test_a_corrupt_sample_fails_naming_shard_and_key_or_is_skipped_and_counted(tmp_path, vit_config, capsys):
    rows = _samples("bad", 10, seed=5)
    rows[3]["jpg"] = b"\xff\xd8 not a jpeg"
    root = tmp_path / "shards"
    root.mkdir()
    _write_tar(root / "train-000000.tar", rows)
    patterns = {"train": str(root / "train-000000.tar"), "curated": str(root / "train-000000.tar"),
                "eval": str(root / "train-000000.tar")}
    out = tmp_path / "run"
    recipe = _clip_recipe(out, patterns, vit_config)
    err = _fails(capsys, ["train-reference", _write(recipe, tmp_path / "r.yaml")])
    assert "train-000000.tar" in err and "'bad-00003'" in err and "on_corrupt: skip" in err
    recipe["data"]["on_corrupt"] = "skip"
    path = _write(recipe, tmp_path / "r.yaml")
    assert main(["train-reference", path]) == 0
    assert main(["precompute", path]) == 0
    report = json.loads((out / "precompute_report.json").read_text())
    assert report["corrupt_samples_skipped"] == {str(root / "train-000000.tar"): ["bad-00003"]}
    assert sorted(_keys(out / "cache")) == sorted(r["__key__"] for r in rows if r["__key__"] != "bad-00003")


def test_a_cache_of_another_reference_is_refused(tables, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = _classifier_recipe(out, tables, options={"num_classes": 10})
    recipe["model"] = {"kind": "factory", "factory": "tests.test_own_data:small_classifier", "options": {"width": 4}}
    path = _write(recipe, tmp_path / "r.yaml")
    assert main(["run", path]) == 0  # reference, cache, run
    recipe["reference"]["steps"] = 4  # another reference: retrained over the first one, its cache left as it was
    recipe["prepare"] = False
    path = _write(recipe, tmp_path / "r.yaml")
    assert main(["train-reference", path]) == 0
    err = _fails(capsys, ["run", path])
    assert "reference_hash" in err and "curate precompute" in err


def test_a_given_reference_checkpoint_with_other_shapes_names_the_parameter(tables, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    weights = small_classifier(6, image_size=32).state_dict()
    save_file(weights, str(tmp_path / "ref.safetensors"))
    recipe = _classifier_recipe(tmp_path / "run", tables)
    recipe["model"] = {"kind": "factory", "factory": "tests.test_own_data:small_classifier", "options": {"width": 4}}
    recipe["reference"]["checkpoint"] = str(tmp_path / "ref.safetensors")
    err = _fails(capsys, ["precompute", _write(recipe, tmp_path / "r.yaml")])
    assert "'0.weight'" in err and "(6, 3, 3, 3)" in err and "(4, 3, 3, 3)" in err
    # the right shapes: the given reference scores the cache, no reference is trained
    torch.save({"state_dict": small_classifier(4, image_size=32).state_dict()}, tmp_path / "ref.pt")
    recipe["reference"]["checkpoint"] = str(tmp_path / "ref.pt")
    assert main(["precompute", _write(recipe, tmp_path / "r.yaml")]) == 0
    assert not (tmp_path / "run" / "reference").exists()
    assert sorted(_keys(tmp_path / "run" / "cache")) == sorted(_all_keys("train"))


def test_named_transforms_are_torchvisions_own_applied_in_order():
    from PIL import Image
    from torchvision.transforms import v2

    from pipelines.shards import named_transforms

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    spec = [{"Resize": {"size": 36}}, {"CenterCrop": {"size": 32}}, {"Normalize": {"mean": mean, "std": std}}]
    expected = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Resize(36), v2.CenterCrop(32),
                           v2.Normalize(mean, std)])(image)
    got = named_transforms(spec)(image)
    assert got.shape == (3, 32, 32) and got.dtype == torch.float32 and torch.equal(got, expected)
    gray = named_transforms(["Grayscale"])(image)  # a bare name: no arguments (on floats: no uint8 rounding)
    assert gray.shape == (1, 40, 50)
    assert torch.allclose(gray, v2.Grayscale()(v2.ToImage()(image)).float() / 255, atol=1 / 255)


@pytest.mark.parametrize(("spec", "message"), [
    (["Resise"], "'Resise' is not a transform of torchvision.transforms.v2; did you mean Resize"),
    ([{"CenterCrop": {"width": 3}}], "CenterCrop(width=3) fails"),
    ([{"Resize": {"size": 8}, "CenterCrop": {"size": 8}}], "each entry is a name or {Name: {argument: value}}"),
    ([{"Resize": {"size": 36}}, "RandomHorizontalFlip"], "gives other pixels each time it is applied"),
    ([{"GaussianBlur": {"kernel_size": 3}}], "gives other pixels each time"),  # random sigma by default
])
def test_named_transforms_refuse_unknown_misused_and_random_ops(spec, message):
    from pipelines.shards import named_transforms

    with pytest.raises(ValueError) as error:
        named_transforms(spec)
    assert message in str(error.value)


def test_a_torchvision_classifier_reads_through_the_recipes_transforms(tables, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = _classifier_recipe(out, tables)
    del recipe["data"]["image_size"]
    recipe["data"]["transforms"] = [{"Resize": {"size": 24}}, {"Normalize": {"mean": [0.5] * 3, "std": [0.25] * 3}}]
    path = _write(recipe, tmp_path / "byo.yaml")
    assert main(["run", path]) == 0
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    task = tasks.task_of(load_recipe(path))
    sample = next(iter(task.load(tables["eval"])))
    assert sample["image"].shape == (3, 24, 24) and float(sample["image"].min()) < 0  # normalised
    recipe["data"]["transforms"] = [{"Resize": {"size": 32}}]  # other pixels: the cache's scores are not theirs
    assert main(["run", _write(recipe, tmp_path / "other.yaml"), "--set", "prepare=false"]) == 2
    assert "dataset" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_precompute_on_own_shards_writes_the_local_backends_rows(tars, vit_config, tmp_path, monkeypatch):
    """Ray Data actors rebuild the open_clip model from a config path relative to the driver's directory, read
    the user's tar shards and write the same rows as the local backend."""
    ray = pytest.importorskip("ray")
    from pipelines.precompute import precompute
    from pipelines.train_reference import train_reference

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "vit.json").write_text(vit_config.read_text())
    frames = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        for backend in ("local", "ray"):
            recipe = _clip_recipe(tmp_path / backend, tars, Path("models/vit.json"))
            recipe["reference"]["path"] = str(tmp_path / "reference")
            loaded = load_recipe(_write(recipe, tmp_path / f"{backend}.yaml"))
            if backend == "local":
                train_reference(loaded, log=lambda *_: None)
            report = precompute(loaded, backend=backend, actors=2, cpus_per_actor=0.5, log=lambda *_: None)
            assert report["parts_written"] == 4 and report["rows"] == 160
            frames[backend] = pl.concat([pl.read_parquet(p) for p in sorted((tmp_path / backend / "cache").glob(
                "part-*.parquet"))]).sort("__key__")
    finally:
        ray.shutdown()
    assert frames["ray"].equals(frames["local"]) and frames["ray"]["__key__"].to_list() == sorted(_all_keys("train"))


@pytest.mark.slow
def test_acl_an_actor_samples_by_learnability_on_own_shards(tars, vit_config, tmp_path):
    """ACL on your own data: a small open_clip actor (a narrower config) trained online on the selected
    batches scores in the learner's place; selection samples by softmax over learnability."""
    small = {**TINY_VIT, "vision_cfg": {**TINY_VIT["vision_cfg"], "width": 32, "head_width": 16},
             "text_cfg": {**TINY_VIT["text_cfg"], "width": 32}}
    (tmp_path / "actor.json").write_text(json.dumps(small))
    out = tmp_path / "run"
    recipe = _clip_recipe(out, tars, vit_config)
    recipe["prepare"] = True
    recipe["selection"] = {**recipe["selection"], "method": "sample", "filter_ratio": 0.5,
                           "actor": {"model": {"kind": "open_clip", "config": str(tmp_path / "actor.json")}}}
    assert main(["run", _write(recipe, tmp_path / "acl.yaml")]) == 0
    last = _metrics(out)[-1]
    assert last["step"] == 4 and last["pipeline"]["actor_updates"] == 4 and last["pipeline"]["kept"] == 4 * 8
    assert last["pipeline"]["seen"] == 4 * 16
