"""Your own shards: webdataset tar files (as img2dataset writes them) and Parquet tables (image bytes + columns,
as Hugging Face and DataComp export them), read into the samples a task trains on.

`expand(urls)` turns a recipe's `data.train` / `data.curated` / `data.eval` (a brace pattern such as
`shards/{00000..00999}.tar`, a glob, or a list; local or s3://) into shard URLs, refusing a pattern that
matches nothing. `load(urls, reader)` reads them in order through `curate.files` (S3 with bounded timeouts)
and decodes each sample with a `SampleReader`: the field map (`data.fields`) picks the members, the image is
decoded by Pillow and transformed by the recipe's `data.transforms` (torchvision ops), else the model's own
preprocessing, else resized and centre-cropped to `data.image_size`; the caption tokenised by the model's tokenizer.

A sample that does not decode either fails naming its shard and key (`data.on_corrupt: fail`, the default)
or is skipped and counted, with its key, in `reader.skipped` (`skip`). A first sample that has none of a
field's members is always an error naming the members it does have: that is a field map that does not fit
the data, not a corrupt sample.
"""

from __future__ import annotations

import difflib
import functools
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from curate.files import filesystem, read_bytes, remote_errors

from .extras import needs_extra

__all__ = ["SampleReader", "ShardsError", "expand", "load", "named_transforms", "resize_crop"]

log = logging.getLogger("curate.data")


class ShardsError(ValueError):
    """Shards that cannot be read as the recipe says; the message names the shard (and key) and the fix."""


def expand(urls: str | Sequence[str], storage_options: dict | None = None, *, what: str = "data.train") -> list[str]:
    """The shard URLs of a brace pattern (`train-{000000..000099}.tar`), a glob (`train-*.tar`) or a list of
    either, in order. A pattern whose first or last shard is not there is refused naming it (checking every
    shard of a million-shard pattern would be a million requests; a shard missing in between fails when read)."""
    from webdataset.shardlists import expand_urls

    parts = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for part in parts:
        part = os.fspath(part)
        if any(c in part for c in "*?["):
            fs, path = filesystem(part, storage_options)
            with remote_errors(part, storage_options, "listing"):
                found = sorted(fs.glob(path))
            if not found:
                raise ShardsError(f"{what}: the pattern {part!r} matches no file; check the path (and "
                                  "data.storage_options for s3://)")
            prefix = part[:part.index("://") + 3] if "://" in part else ""
            out.extend(prefix + name if prefix and not name.startswith(prefix) else name for name in found)
            continue
        expanded = expand_urls(part)
        for url in dict.fromkeys([expanded[0], expanded[-1]]):
            fs, path = filesystem(url, storage_options)
            with remote_errors(url, storage_options, "listing"):
                there = fs.exists(path)
            if not there:
                if len(expanded) == 1:
                    problem = "it does not exist"
                elif url == expanded[0]:
                    problem = f"the pattern {part!r} matches nothing there"
                else:
                    problem = f"the last of the {len(expanded)} shards {part!r} lists: the range runs past the data"
                raise ShardsError(f"{what}: no shard {url!r} ({problem}); check the path and the brace range, "
                                  "e.g. shards/train-{000000..000009}.tar for 10 shards")
        out.extend(expanded)
    if not out:
        raise ShardsError(f"{what}: no shard URLs in {urls!r}; give a brace pattern, a glob or a list")
    return out


def resize_crop(image, size: int) -> torch.Tensor:
    """(3, size, size) float32 in [0, 1]: the shorter side resized to `size` (bicubic), then centre-cropped, as
    torchvision's Resize + CenterCrop + ToTensor do. For models that bring no preprocessing of their own."""
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    target = (max(size, round(width * scale)), max(size, round(height * scale)))
    resized = image.resize(target, Image.Resampling.BICUBIC)
    left, top = (resized.size[0] - size) // 2, (resized.size[1] - size) // 2
    pixels = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / np.float32(255)
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


def named_transforms(specs: Sequence, *, probes: int = 16) -> Callable:
    """The transform a recipe's `data.transforms` names: torchvision.transforms.v2 ops applied in order to the
    image as a float32 tensor in [0, 1] (so Resize, CenterCrop, Normalize, ... all apply), e.g.
    `[{Resize: {size: 256}}, {CenterCrop: {size: 224}}, {Normalize: {mean: [...], std: [...]}}]`; a bare name
    takes no arguments.

    Random ops are refused: every job must see the same pixels each time it reads a sample (the cache's scores
    belong to them, and a resumed run replays them), so augmentation belongs in the training step. Random is
    measured, not guessed from the name: the transform is run on one probe image under `probes` seeds.
    """
    with needs_extra("data.transforms"):
        from torchvision.transforms import v2

    ops = []
    for spec in specs:
        name, kwargs = (spec, {}) if isinstance(spec, str) else _single(spec)
        op = getattr(v2, name, None)
        if not (isinstance(op, type) and issubclass(op, v2.Transform)):
            known = [n for n, o in vars(v2).items() if isinstance(o, type) and issubclass(o, v2.Transform)]
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"data.transforms: {name!r} is not a transform of torchvision.transforms.v2{hint}")
        try:
            ops.append(op(**kwargs))
        except (TypeError, ValueError) as error:
            raise ValueError(f"data.transforms: {name}({_kwargs(kwargs)}) fails: {error}; see "
                             f"torchvision.transforms.v2.{name} for its arguments") from None
    transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), *ops])
    from PIL import Image

    probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    with torch.random.fork_rng(devices=[]):
        outputs = []
        for seed in range(probes):
            torch.manual_seed(seed)
            outputs.append(transform(probe))
    if any(not torch.equal(outputs[0], other) for other in outputs[1:]):
        raise ValueError(f"data.transforms: {[_label(spec) for spec in specs]} gives other pixels each time it is "
                         "applied (a random op): curate must read the same sample the same way in every job, for the "
                         "cache's scores and exact resume; keep deterministic ops here and augment in the training "
                         "step")
    return transform


def _single(spec) -> tuple[str, dict]:
    if not (isinstance(spec, dict) and len(spec) == 1):
        raise ValueError(f"data.transforms: each entry is a name or {{Name: {{argument: value}}}}, got {spec!r}")
    ((name, kwargs),) = spec.items()
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"data.transforms: {name}'s arguments must be a mapping, got {kwargs!r}")
    return str(name), dict(kwargs or {})


def _kwargs(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _label(spec) -> str:
    return spec if isinstance(spec, str) else next(iter(spec))


@dataclass
class SampleReader:
    """Decodes a raw sample (webdataset members or a Parquet row: name → bytes / value) into the task's fields.

    Output: `__key__`, `image` (the transform's tensor), and for a contrastive task `text` (token ids) plus
    `label` when the label member is there; for classification `target` and `label` (both the class). A
    boolean `is_noisy` in the sample's .json (as `curate data` writes) is carried for the noisy_kept metric;
    selection never reads it.

    Args:
        task: "contrastive" or "classification".
        image, text, label: member names, alternatives separated by ';' (the first present is taken).
        transform: PIL image (RGB) → tensor.
        tokenizer: list of captions → (N, L) token ids (contrastive).
        on_corrupt: "fail" or "skip".
    """

    task: str
    image: str
    text: str
    label: str
    transform: Callable
    tokenizer: Callable | None = None
    on_corrupt: str = "fail"
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (shard, key, reason)
    _checked: set = field(default_factory=set)

    def __post_init__(self):
        self.images = _names(self.image)
        self.texts = _names(self.text)
        self.labels = _names(self.label)
        self.needed = {"image": self.images, **({"text": self.texts} if self.task == "contrastive" else
                                               {"label": self.labels})}

    def __call__(self, raw: dict) -> dict | None:
        url, key = raw.get("__url__", "?"), raw["__key__"]
        if url not in self._checked:  # the first sample of each shard: does the field map fit at all?
            self._check_fields(raw, url)
            self._checked.add(url)
        try:
            return self._decode(raw, key)
        except Exception as error:  # anything a damaged sample raises: Pillow, UTF-8, int(), the transform
            reason = f"{type(error).__name__}: {error}"
            if self.on_corrupt == "fail":
                raise ShardsError(f"{url}: sample {key!r} does not decode ({reason}); fix or remove it, or set "
                                  "data.on_corrupt: skip to skip and count such samples") from error
            self.skipped.append((url, key, reason))
            log.warning("skipped corrupt sample %r of %s (%s)", key, url, reason)
            return None

    def _check_fields(self, raw: dict, url: str) -> None:
        members = sorted(k for k in raw if not k.startswith("__"))
        for name, options in self.needed.items():
            if not any(option in raw for option in options):
                raise ShardsError(f"data.fields.{name}: {';'.join(options)!r} matches no member of the first sample "
                                  f"({raw['__key__']!r}) of {url}; its members are {members}: set data.fields.{name} "
                                  "to the one that holds it")

    def _decode(self, raw: dict, key: str) -> dict:
        from PIL import Image

        out: dict = {"__key__": key}
        data = _first(raw, self.images, "image")
        with Image.open(io.BytesIO(data)) as image:
            out["image"] = self.transform(image.convert("RGB"))
        label = next((raw[name] for name in self.labels if raw.get(name) is not None), None)
        if self.task == "contrastive":
            caption = _text(_first(raw, self.texts, "text"))
            assert self.tokenizer is not None
            out["text"] = self.tokenizer([caption])[0]
            out["caption"] = caption
            if label is not None:
                out["label"] = _class(label)
        else:
            if label is None:
                raise ValueError(f"no {'/'.join(self.labels)} member")
            out["target"] = out["label"] = _class(label)
        meta = raw.get("json")
        if meta is not None:
            noisy = json.loads(meta).get("is_noisy") if isinstance(meta, bytes | str) else None
            if isinstance(noisy, bool):
                out["is_noisy"] = noisy
        return out


def _names(spec: str) -> list[str]:
    return [name.strip().lower() for name in spec.split(";") if name.strip()]


def _first(raw: dict, names: list[str], what: str):
    for name in names:
        if raw.get(name) is not None:
            return raw[name]
    raise ValueError(f"no {what} member ({';'.join(names)})")


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _class(value) -> int:
    number = int(_text(value).strip()) if isinstance(value, bytes | str) else int(value)
    if number < 0:
        raise ValueError(f"label {number} is negative")
    return number


def load(urls: Sequence[str], reader: SampleReader, *, format: str, key: str = "__key__",
         storage_options: dict | None = None) -> Iterable[dict]:
    """The decoded samples of `urls`, in order, as a re-iterable webdataset pipeline (`format`: webdataset |
    parquet; `key`: a Parquet table's key column)."""
    with needs_extra("reading your own shards"):
        import PIL  # noqa: F401
        import webdataset as wds

    options = storage_options or {}
    if format == "webdataset":
        from .data import _read_shards

        read = functools.partial(_read_shards, storage_options=options)
    elif format == "parquet":
        read = functools.partial(_read_parquet, key=key, storage_options=options)
    else:
        raise ValueError(f"data.format: expected webdataset or parquet, got {format!r}")
    return wds.DataPipeline(wds.SimpleShardList(list(urls)), read, functools.partial(_decoded, reader=reader))


def _decoded(raws: Iterable[dict], reader: SampleReader) -> Iterator[dict]:
    for raw in raws:
        sample = reader(raw)
        if sample is not None:
            yield sample


def _read_parquet(sources: Iterable[dict], key: str, storage_options: dict) -> Iterator[dict]:
    """Webdataset stage: Parquet URLs in, rows out as raw samples ({"__key__", "__url__", column: value})."""
    import polars as pl

    for source in sources:
        url = source["url"]
        data = read_bytes(url, storage_options)  # storage errors are curate.files' (named, bounded on S3)
        try:
            table = pl.read_parquet(io.BytesIO(data))
        except pl.exceptions.PolarsError as error:
            raise ShardsError(f"{url}: not a readable Parquet file ({type(error).__name__}: {error}); the shard is "
                              "damaged, regenerate it") from None
        if key not in table.columns:
            raise ShardsError(f"data.fields.key: {key!r} is not a column of {url}; its columns are {table.columns}: "
                              "set data.fields.key to the column that holds each sample's key")
        table = table.rename({column: column.lower() for column in table.columns if column != key})
        for row in table.iter_rows(named=True):
            if row[key] is None:
                raise ShardsError(f"{url}: a row has no {key!r}; every sample needs a key")
            yield {**row, "__key__": str(row[key]), "__url__": url}
