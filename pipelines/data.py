"""Embedded default data: webdataset shards made from scikit-learn's bundled handwritten digits.

`make_digits(OUT)` writes two datasets, deterministic from one seed, with no download:

- `OUT/pairs/{train,curated,test}-NNNNNN.tar`: image-text pairs. The train split carries web noise
  (captions of another digit, junk alt-text, near-duplicate images); curated and test are clean.
- `OUT/digits/{train,curated,test}-NNNNNN.tar`: classification; train labels flipped at `label_noise`.
- `OUT/manifest.json`: splits, counts, noise rates, image size, seed, shard sizes and sha256.

`format="webdataset"` / `"parquet"` write the same samples as JPEG tar shards / Parquet tables
(`OUT/{pairs,digits}/{split}-NNNNNN.{tar,parquet}`, listed in `OUT/manifest-{webdataset,parquet}.json`), the
shapes of a user's own data, for the own-data recipes; both can live in one directory.

The 1797 source images are split into disjoint pools *before* augmentation, so no augmentation of a
test (or curated) image lands in train. Every sample keeps its `__key__`, the index of its source
image, and an `is_noisy` flag plus the `noise` kind, for diagnostics only (selection never reads them).
Images are uint8 `.npy` files, 16×16 by default: the sources are 8×8, so more pixels add no
information, while 16 leaves room for sub-pixel shifts and rotations and gives a ViT with 4×4 patches
17 tokens, which keeps a tiny CLIP step near 30 ms on one CPU core. Loading parses the tar stream and
the .npy header directly (~10× faster than `tarfile` + `np.load` for such tiny members).
"""

from __future__ import annotations

import ast
import functools
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from curate.files import filesystem, read_bytes, remote_errors, write_json
from curate.seeding import make_generator

from .extras import needs_extra
from .shard_writers import SUFFIX, as_jpeg, write_parquet, write_tar

__all__ = [
    "make_digits", "load_pairs", "load_digits", "shard_urls", "tokenize", "class_prompts", "augment",
    "DIGIT_NAMES", "CAPTION_TEMPLATES", "JUNK_TEXTS", "DEFAULT_NOISE_MIX", "SPLITS", "ZERO_SHOT_TEMPLATE",
]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ZERO_SHOT_TEMPLATE = "a photo of the digit {name}"
CONTEXT_LENGTH = 16  # the longest caption is 12 BPE tokens with start/end; 77 would be mostly padding

SPLITS = ("train", "curated", "test")
FORMATS = ("npy", "webdataset", "parquet")  # make_digits' shard formats
MANIFEST = {"npy": "manifest.json", "webdataset": "manifest-webdataset.json", "parquet": "manifest-parquet.json"}
# Fractions of the 1797 source images in each pool: train gets most, curated/test a clean fifth each.
SOURCE_FRACTIONS = {"train": 0.6, "curated": 0.2, "test": 0.2}
# How web noise divides among its kinds (misaligned captions dominate in scraped alt-text).
DEFAULT_NOISE_MIX = {"misaligned": 0.5, "junk": 0.3, "duplicate": 0.2}

CAPTION_TEMPLATES = (
    "a photo of the digit {name}", "handwritten {digit}", "the number {name} written in ink", "{name}", "{digit}",
    "a scan of a handwritten {digit}", "digit {digit} on a dark background", "a blurry picture of the number {name}",
    "a hand-drawn {name}", "my kid wrote the number {name}", "close-up of a {name} from a postal code",
    "the digit {digit}, handwriting sample", "a small pixelated {name}", "number {digit}",
    "scribbled {name} on a form", "a {name} drawn with a marker",
)
JUNK_TEXTS = (
    "IMG_{n:04d}.jpg", "DSC{n:05d}.JPG", "click here to subscribe", "image", "untitled-{n}", "thumbnail",
    "download free wallpapers hd", "photo by user{n}", "screenshot_{n:04d}.png", "best price guaranteed!!!",
    "spacer.gif", "follow us on instagram", "free shipping on all orders", "logo", "banner_{n}", "read more",
)


def augment(images: torch.Tensor, size: int, generator: torch.Generator, *, max_noise: float = 0.06) -> torch.Tensor:
    """Random affine views of 8×8 digits, upscaled to `size`×`size` uint8.

    Each view gets a rotation of ±12°, a zoom so the digit fills 75–95% of the frame, a shift of up to
    ±8% of the frame, and gaussian pixel noise with a per-image std drawn from [0, max_noise]. One
    bilinear `grid_sample` does rotation, zoom, shift and upscaling together.

    Args:
        images: (N, 8, 8) float in [0, 1].
    """
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * (12 * torch.pi / 180)
    zoom = 0.75 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.16  # normalised coords span 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid maps output coords to input coords, so the inverse zoom makes the digit bigger.
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    out = F.grid_sample(images[:, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    noise_std = torch.rand(n, 1, 1, 1, generator=generator) * max_noise
    out = out + noise_std * torch.randn(out.shape, generator=generator)
    return (out[:, 0].clamp(0, 1) * 255).round().to(torch.uint8)


def _source_pools(seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    images = torch.from_numpy(digits.images).float() / 16.0
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(labels), generator=make_generator(seed, "sources"))
    n_train = round(SOURCE_FRACTIONS["train"] * len(order))
    n_curated = round(SOURCE_FRACTIONS["curated"] * len(order))
    pools = {"train": order[:n_train], "curated": order[n_train:n_train + n_curated],
             "test": order[n_train + n_curated:]}
    return images, labels, {k: v.sort().values for k, v in pools.items()}


def _draw(pool: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n source indices from `pool`, each used ⌊n/|pool|⌋ or one more times (balanced, shuffled)."""
    reps = pool.repeat(n // len(pool) + 1)[:n]
    return reps[torch.randperm(n, generator=generator)]


def _caption(template: str, label: int) -> str:
    return template.format(name=DIGIT_NAMES[label], digit=label)


def _make_pairs(split: str, n: int, noise: float, mix: dict[str, float], size: int, seed: int,
                images: torch.Tensor, labels: torch.Tensor, pool: torch.Tensor) -> list[dict]:
    g = make_generator(seed, "pairs", split)
    n_noisy = round(noise * n) if split == "train" else 0  # exact counts: rates are exact, not binomial
    counts = {kind: round(share * n_noisy) for kind, share in mix.items()}
    counts[list(mix)[-1]] += n_noisy - sum(counts.values())
    n_dup = counts.get("duplicate", 0)
    n_base = n - n_dup
    source = _draw(pool, n_base, g)
    pixels, label = augment(images[source], size, g), labels[source]
    randint = functools.partial(torch.randint, generator=g)
    template = randint(len(CAPTION_TEMPLATES), (n_base,)).tolist()
    perm, n_mis, n_junk = torch.randperm(n_base, generator=g), counts.get("misaligned", 0), counts.get("junk", 0)
    misaligned, junk, clean = perm[:n_mis], perm[n_mis:n_mis + n_junk], perm[n_mis + n_junk:]
    said = label.clone()  # the digit the caption names: another one, uniformly, when misaligned
    said[misaligned] = (label[misaligned] + randint(1, 10, (n_mis,))) % 10
    captions = [_caption(CAPTION_TEMPLATES[t], y) for t, y in zip(template, said.tolist(), strict=True)]
    kind = ["clean"] * n_base + ["duplicate"] * n_dup
    for i in misaligned.tolist():
        kind[i] = "misaligned"
    junk_text, junk_n = randint(len(JUNK_TEXTS), (n_junk,)), randint(10000, (n_junk,))
    for i, j, number in zip(junk.tolist(), junk_text.tolist(), junk_n.tolist(), strict=True):
        captions[i], kind[i] = JUNK_TEXTS[j].format(n=number), "junk"
    # Near-duplicates: clean samples again, with tiny pixel noise (std 4/255) and the same caption.
    base = torch.cat([torch.arange(n_base), clean[randint(len(clean), (n_dup,))]])
    copies = pixels[base[n_base:]].float() + 4.0 * torch.randn(n_dup, size, size, generator=g)
    pixels = torch.cat([pixels, copies.clamp(0, 255).round().to(torch.uint8)])
    order = torch.randperm(n, generator=g)  # spreads the duplicates through the split
    position = torch.empty(n, dtype=torch.long)
    position[order] = torch.arange(n)
    rows = []
    for out, i in enumerate(order.tolist()):
        b = int(base[i])
        meta = {"label": int(label[b]), "source": int(source[b]), "is_noisy": kind[i] != "clean", "noise": kind[i],
                "duplicate_of": _key("pairs", split, int(position[b])) if i >= n_base else None}
        rows.append({"__key__": _key("pairs", split, out), "npy": _npy(pixels[i]), "txt": captions[b].encode(),
                     "json": json.dumps(meta, sort_keys=True).encode()})
    return rows


def _make_digits(split: str, n: int, label_noise: float, size: int, seed: int,
                 images: torch.Tensor, labels: torch.Tensor, pool: torch.Tensor) -> list[dict]:
    g = make_generator(seed, "digits", split)
    source = _draw(pool, n, g)
    pixels = augment(images[source], size, g)
    label = labels[source]
    target = label.clone()
    flipped = torch.randperm(n, generator=g)[:round(label_noise * n)] if split == "train" else torch.empty(0).long()
    # A flip goes to one of the 9 *other* classes uniformly, so is_noisy <=> target != label.
    target[flipped] = (label[flipped] + torch.randint(1, 10, (len(flipped),), generator=g)) % 10
    rows = []
    for i in range(n):
        noisy = bool(target[i] != label[i])
        meta = {"label": int(label[i]), "source": int(source[i]), "is_noisy": noisy,
                "noise": "flip" if noisy else "clean"}
        rows.append({"__key__": _key("digits", split, i), "npy": _npy(pixels[i]), "cls": b"%d" % int(target[i]),
                     "json": json.dumps(meta, sort_keys=True).encode()})
    return rows


def _key(dataset: str, split: str, i: int) -> str:
    return f"{dataset}-{split}-{i:06d}"  # no dots: webdataset splits key and field at the first dot


def _npy(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, image.numpy(), allow_pickle=False)
    return buffer.getvalue()


def _with_class(row: dict) -> dict:
    """A pair with a `cls` member (the digit its image shows, from its metadata); a digit as it is."""
    return row if "cls" in row else {**row, "cls": b"%d" % json.loads(row["json"])["label"]}


def _split_summary(rows: list[dict], shards: list[dict]) -> dict:
    kinds: dict[str, int] = {}
    for row in rows:
        kind = json.loads(row["json"])["noise"]
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"count": len(rows), "noisy": len(rows) - kinds.get("clean", 0), "noise_counts": dict(sorted(kinds.items())),
            "shards": shards}


def make_digits(out_dir: str | os.PathLike, *, seed: int = 0, n_train: int = 20_000, n_curated: int = 2_000,
                n_test: int = 2_000, pair_noise: float = 0.4, noise_mix: dict[str, float] | None = None,
                label_noise: float = 0.3, image_size: int = 16, shard_size: int = 5_000, format: str = "npy") -> dict:
    """Write the digit pairs and noisy digits shards under `out_dir` and return the manifest.

    Args:
        out_dir: local directory (created if missing); existing shards of the same names are replaced.
        seed: every random choice derives from it; the same seed gives byte-identical shards.
        n_train, n_curated, n_test: samples per split (each of pairs and digits).
        pair_noise: fraction of noisy train pairs, divided among kinds by `noise_mix`.
        noise_mix: {"misaligned", "junk", "duplicate"} → share of the noisy pairs (sums to 1).
        label_noise: fraction of train digits whose target is flipped to another class.
        image_size: side of the square uint8 images (≥ 8; 16 by default: see the module docstring).
        shard_size: samples per shard.
        format: "npy" (tar shards of uint8 .npy images: what the demo recipes, data.format: digits, read),
            "webdataset" (tar shards of JPEG images, as img2dataset writes them) or "parquet" (tables of JPEG
            bytes and columns): the same samples and keys in the shapes of your own data, for data.format:
            webdataset / parquet recipes (recipes/byo_*.yaml). Those add a `cls` member (the digit shown) to
            the pairs too, for zero-shot evaluation.
    """
    if format not in FORMATS:
        raise ValueError(f"make_digits: format must be one of {list(FORMATS)}, got {format=}")
    with needs_extra("make_digits"):  # all, before any work: the shards are written after all rows are made
        import sklearn.datasets  # noqa: F401
        import webdataset  # noqa: F401
        if format != "npy":
            import PIL  # noqa: F401
    mix = dict(DEFAULT_NOISE_MIX if noise_mix is None else noise_mix)
    for name, rate in {"pair_noise": pair_noise, "label_noise": label_noise}.items():
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"make_digits: {name} must be in [0, 1), got {name}={rate}")
    if set(mix) - set(DEFAULT_NOISE_MIX) or abs(sum(mix.values()) - 1) > 1e-6 or min(mix.values()) < 0:
        raise ValueError(f"make_digits: noise_mix must map a subset of {sorted(DEFAULT_NOISE_MIX)} to "
                         f"non-negative shares summing to 1, got {noise_mix=}")
    if mix.get("duplicate", 0) * pair_noise >= 1 - pair_noise:
        raise ValueError(f"make_digits: too many duplicates for the clean originals, got {pair_noise=} {noise_mix=}")
    for name, n in {"n_train": n_train, "n_curated": n_curated, "n_test": n_test, "shard_size": shard_size}.items():
        if n < 1:
            raise ValueError(f"make_digits: {name} must be a positive int, got {name}={n}")
    if image_size < 8:
        raise ValueError(f"make_digits: image_size must be >= 8 (the source digits are 8×8), got {image_size=}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # No manifest while shards change: an interrupted re-run reads as "no dataset", never as a mix.
    # npy and webdataset shards share names (split-NNNNNN.tar): writing one invalidates the other's manifest.
    for other in FORMATS:
        if SUFFIX[other] == SUFFIX[format]:
            (out / MANIFEST[other]).unlink(missing_ok=True)
    images, labels, pools = _source_pools(seed)
    image = "npy" if format == "npy" else "jpg"
    sizes = {"train": n_train, "curated": n_curated, "test": n_test}
    manifest = {
        "version": 1, "seed": seed, "image_size": image_size, "format": format,
        "image_format": "npy uint8 (H, W)" if format == "npy" else "jpeg rgb",
        "source": "sklearn.datasets.load_digits", "source_pools": {k: len(v) for k, v in pools.items()},
        "pairs": {"pair_noise": pair_noise, "noise_mix": mix, "splits": {},
                  "fields": ["npy", "txt", "json"] if format == "npy" else ["jpg", "txt", "cls", "json"]},
        "digits": {"label_noise": label_noise, "fields": [image, "cls", "json"], "splits": {}},
    }
    for split in SPLITS:
        common = (image_size, seed, images, labels, pools[split])
        made = {"pairs": _make_pairs(split, sizes[split], pair_noise, mix, *common),
                "digits": _make_digits(split, sizes[split], label_noise, *common)}
        for dataset, rows in made.items():
            written = rows if format == "npy" else [as_jpeg(_with_class(row)) for row in rows]
            write = write_parquet if format == "parquet" else write_tar
            shards = write(written, out / dataset, split, shard_size)
            manifest[dataset]["splits"][split] = _split_summary(rows, shards)
    write_json(out / MANIFEST[format], manifest, indent=1)
    return manifest


# ----------------------------------------------------------------------------------------------- loading


def shard_urls(root: str | os.PathLike, dataset: str, split: str, *, storage_options: dict | None = None) -> list[str]:
    """The shard URLs of `dataset` ("pairs" | "digits") / `split` listed in `root/manifest.json` (local or s3://)."""
    root = str(root).rstrip("/")
    manifest = json.loads(read_bytes(f"{root}/manifest.json", storage_options))
    datasets = [name for name, value in manifest.items() if isinstance(value, dict) and "splits" in value]
    if dataset not in datasets or split not in manifest[dataset]["splits"]:
        raise ValueError(f"shard_urls: no {dataset=} {split=} in {root}/manifest.json; its datasets are {datasets}, "
                         f"splits {list(SPLITS)}; `curate data digits|web ROOT` makes them")
    return [f"{root}/{shard['path']}" for shard in manifest[dataset]["splits"][split]["shards"]]


@functools.lru_cache(maxsize=8)
def _tokenizer(context_length: int):
    with needs_extra("tokenizing captions"):
        from open_clip.tokenizer import SimpleTokenizer  # its BPE vocabulary ships inside the wheel
    return SimpleTokenizer(context_length=context_length)


@functools.lru_cache(maxsize=65536)
def _tokens(text: str, context_length: int) -> torch.Tensor:
    return _tokenizer(context_length)([text])[0]  # cached: captions repeat a lot and BPE is pure Python


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Token ids (N, context_length) from open_clip's CLIP BPE tokenizer (no network: the vocab is packaged)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    return torch.stack([_tokens(text, context_length) for text in texts])


def class_prompts(template: str = ZERO_SHOT_TEMPLATE, *, context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Zero-shot prompts (10, context_length), row c = `template` with the name (`{name}`) or digit (`{digit}`) of c."""
    return tokenize([_caption(template, c) for c in range(10)], context_length)


def _expand(urls: str | os.PathLike | Sequence[str]) -> list[str]:
    with needs_extra("loading shards"):
        from webdataset.shardlists import expand_urls

    parts = [urls] if isinstance(urls, str | os.PathLike) else list(urls)
    expanded = [url for part in parts for url in expand_urls(str(part))]
    if not expanded:
        raise ValueError(f"no shard URLs in {urls!r}; pass paths, a brace pattern or shard_urls(root, dataset, split)")
    return expanded


def _octal(field: bytes, url: str = "") -> int:
    try:
        return int(field.strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise ValueError(f"{url}: corrupt tar header (field {field!r} is not octal); regenerate the shard") from None


def _tar_members(stream, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in a tar stream, in order.

    Python's tarfile spends ~65 µs per member building TarInfo objects; shards of tiny members need
    ~3 µs. Handles ustar prefixes, pax `path` records and GNU long names; verifies header checksums.
    """
    long_name = None
    while True:
        header = stream.read(512)
        if len(header) < 512:  # a tar ends with zero blocks: EOF before them means a cut-off file
            raise ValueError(f"{url}: truncated tar file; the shard is incomplete, regenerate it")
        if header.count(0) == 512:
            return
        if _octal(header[148:156], url) != sum(header[:148]) + 256 + sum(header[156:]):  # 256: the field as spaces
            raise ValueError(f"{url}: bad tar header checksum; the shard is corrupt, regenerate it")
        size = int.from_bytes(header[125:136], "big") if header[124] & 0x80 else _octal(header[124:136], url)
        data = stream.read(size)
        if len(data) < size:
            raise ValueError(f"{url}: truncated tar member; the shard is incomplete, regenerate it")
        stream.read(-size % 512)
        kind = header[156:157]
        if kind == b"x":  # pax extended header: "LEN key=value\n" records, may override the next name
            for record in data.decode().splitlines():
                key, _, value = record.partition(" ")[2].partition("=")
                long_name = value if key == "path" else long_name
        elif kind == b"L":  # GNU long name
            long_name = data.rstrip(b"\0").decode()
        elif kind in (b"0", b"\0", b"7"):
            name = header[:100].rstrip(b"\0").decode()
            prefix = header[345:500].rstrip(b"\0").decode() if header[257:262] == b"ustar" else ""
            yield long_name or (f"{prefix}/{name}" if prefix else name), data
            long_name = None
        else:
            long_name = None  # directories, links, global headers: no sample data


def _read_shards(sources: Iterable[dict], storage_options: dict) -> Iterator[dict]:
    """Webdataset stage: shard URLs in, raw samples out ({"__key__", "__url__", ext: bytes}).

    Opens through `curate.files.filesystem`, so local paths and s3:// (s3fs) read the same way, S3 with bounded
    timeouts and a named error (`remote_errors`). Files group into a sample by key as webdataset does: the path
    up to the first dot of the file name; the rest is the field.
    """
    for source in sources:
        url, sample = source["url"], None
        fs, inner = filesystem(url, storage_options)
        with remote_errors(url, storage_options), fs.open(inner, "rb") as stream:
            for name, data in _tar_members(stream, url):
                dot = name.find(".", name.rfind("/") + 1)
                if dot < 0 or name.startswith("__"):
                    continue
                key, field = name[:dot], name[dot + 1:].lower()
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                if field in sample:
                    raise ValueError(f"{url}: sample {key!r} has two .{field} files; the shard is malformed")
                sample[field] = data
        if sample is not None:
            yield sample


def _field(sample: dict, name: str, loader: str) -> bytes:
    if name not in sample:
        raise ValueError(f"{loader}: sample {sample['__key__']!r} in {sample.get('__url__')} has no .{name} file "
                         f"(it has {sorted(k for k in sample if not k.startswith('__'))}); is this a shard written "
                         f"by `curate data digits` for that dataset?")
    return sample[name]


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...]]:
    meta = ast.literal_eval(header.decode("latin1"))
    if meta["fortran_order"] or np.dtype(meta["descr"]) != np.uint8:
        raise ValueError(f"expected a C-order uint8 .npy image (as `curate data digits` writes), got header {meta}")
    return np.dtype(meta["descr"]), tuple(meta["shape"])


def _image(data: bytes, channels: int) -> torch.Tensor:
    """(channels, H, W) float32 in [0, 1] from a uint8 .npy; the header is parsed once per distinct header
    (np.load re-parses it with `ast` every time, 5× slower than the whole decode here)."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError(f"expected a .npy image, got bytes starting {data[:10]!r}")
    width = 2 if data[6] == 1 else 4  # format 1.0 has a 2-byte header length, 2.0/3.0 four bytes
    start = 8 + width + int.from_bytes(data[8:8 + width], "little")
    dtype, shape = _npy_header(bytes(data[8 + width:start]))
    pixels = np.frombuffer(data, dtype, offset=start).reshape(shape).astype(np.float32) / np.float32(255)
    if pixels.ndim == 3:  # (C, H, W): a colour image, as the web world writes
        if len(pixels) != channels:
            raise ValueError(f"expected a .npy image of {channels} channels, got shape {shape}")
        return torch.from_numpy(pixels)
    return torch.from_numpy(np.repeat(pixels[None], channels, 0))  # numpy: 6× less overhead than torch ops here


def _decode_pair(sample: dict, *, context_length: int, channels: int) -> dict:
    meta = json.loads(_field(sample, "json", "load_pairs"))
    caption = _field(sample, "txt", "load_pairs").decode()
    return {"__key__": sample["__key__"], "image": _image(_field(sample, "npy", "load_pairs"), channels),
            "text": _tokens(caption, context_length).clone(), "caption": caption, "label": meta["label"],
            "is_noisy": meta["is_noisy"], "noise": meta["noise"]}


def _decode_digit(sample: dict, *, channels: int) -> dict:
    meta = json.loads(_field(sample, "json", "load_digits"))
    return {"__key__": sample["__key__"], "image": _image(_field(sample, "npy", "load_digits"), channels),
            "target": int(_field(sample, "cls", "load_digits")), "label": meta["label"],
            "is_noisy": meta["is_noisy"], "noise": meta["noise"]}


def _pipeline(urls, decode, storage_options: dict | None):
    with needs_extra("loading shards"):
        import webdataset as wds

    return wds.DataPipeline(wds.SimpleShardList(_expand(urls)),
                            functools.partial(_read_shards, storage_options=storage_options or {}), wds.map(decode))


def load_pairs(urls: str | Sequence[str], *, context_length: int = CONTEXT_LENGTH, channels: int = 3,
               storage_options: dict | None = None):
    """Digit pairs as a re-iterable webdataset pipeline of samples, in shard order.

    Each sample: `__key__`, `image` float32 (channels, H, W) in [0, 1], `text` int64 (context_length,)
    token ids, `caption` str, `label` (true digit), `is_noisy` bool, `noise` kind (diagnostics only).
    `urls`: paths, brace patterns ("OUT/pairs/train-{000000..000003}.tar") or s3:// URLs (read through
    fsspec; `storage_options` such as {"endpoint_url": ...} go to it). No worker/rank splitting here:
    give each worker its own URLs.
    """
    _check_loader("load_pairs", channels, context_length)
    return _pipeline(urls, functools.partial(_decode_pair, context_length=context_length, channels=channels),
                     storage_options)


def load_digits(urls: str | Sequence[str], *, channels: int = 1, storage_options: dict | None = None):
    """Noisy digits as a re-iterable webdataset pipeline of samples, in shard order.

    Each sample: `__key__`, `image` float32 (channels, H, W) in [0, 1], `target` int (the possibly
    flipped training label), `label` int (true class), `is_noisy` bool, `noise` kind. `urls` as `load_pairs`.
    """
    _check_loader("load_digits", channels, CONTEXT_LENGTH)
    return _pipeline(urls, functools.partial(_decode_digit, channels=channels), storage_options)


def _check_loader(name: str, channels: int, context_length: int) -> None:
    if channels < 1:
        raise ValueError(f"{name}: channels must be >= 1 (3 for tiny_clip, 1 for small_cnn), got {channels=}")
    if context_length < 3:
        raise ValueError(f"{name}: context_length must be >= 3 (start, a token, end), got {context_length=}")
