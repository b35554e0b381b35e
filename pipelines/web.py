"""The embedded "web" world: a long-tailed stream of compositional image-text pairs, made in code from
scikit-learn's bundled digits (no download), with the properties the data-selection papers rely on.

A *concept* is a coloured two-digit number: (tens, units, colour), 10 × 10 × 6 = 600 concepts. An image shows the
number handwritten in its colour across a 16×16 RGB frame (each digit a different source digit), over a
background the caption does not name (black, grey or striped: web images vary in ways their alt-text never
says); its caption names the number and the colour in one of several phrasings. Two concepts that differ in one
attribute (37 and 38, 37 and 47, a red 37 and a blue 37) are hard negatives of each other.

Why numbers and not more easy attributes: a contrastive learner learns only the features it needs to tell a
pair from its in-batch negatives, and drops the others (feature suppression, Chen et al. 2021). In version 1 of
this world a concept was (digit, colour, quadrant, background): 72 easy combinations told almost every in-batch
negative apart, and every model, curated or not, learnt them and never the digit's shape (probes of the towers
read the digit at chance after 1200 steps), which capped zero-shot accuracy at 0.1. Here the number carries
6.6 of the concept's 9.2 bits: with 6 colours, a sixth of a batch shares a pair's colour and only the digits
tell them apart, so every attribute is needed and learnable within a run's budget (`benchmarks/web_probe.py`
checks it before any method runs).

- **train** is a *stream*: no pair repeats (every image is a fresh random view of fresh source digits, so a run
  that reads fewer samples than the stream holds scores each at most once). Concepts follow a Zipf law (exponent
  1, over a seeded random ranking of the concepts), the shape of concept frequencies in web-scale pretraining
  data. Of the stream, `NOISE` is: 20% misaligned (the caption of another concept), 10% junk alt-text, 15%
  near-duplicates of a recent clean pair of a head concept (the most frequent 5%: the same caption and the same
  view with faint pixel noise: redundant, not wrong). The rest is clean, and its rarer half of concepts (the
  *tail*) is the learnable value a uniform sampler under-trains.
- **what the tail is made of** (`tail`, `TAILS`): in the default world ("shared") the ranking is random, so a rare
  concept is a rare combination of common parts (every digit and colour is at least 3.9% of the stream; at most
  29% of a value's occurrences are in the tail: `web_probe.py --marginals`), and a learner that has learnt the
  head has learnt the tail's features. Web data's rare concepts also have rare features; the "distinct" world has
  that one property and is otherwise the same (the Zipf law, the noise, the splits): its tail is the numbers
  50-99, whose tens digits (each 2% of the stream) and numbers (0.2% each) the head never shows.
- **curated** is small, clean and balanced (every concept equally often), for the reference model.
- **test** is clean and balanced, from source digits neither other split uses; evaluation is zero-shot over all
  600 concept prompts (`concept_prompts`).

These parameters were fixed from those properties (and from what web data looks like), before any method ran
on the world; they are not tuned to a method's result.

The stream is made in blocks of `BLOCK` samples, each from its own generator (seed, split, block), so the first
n samples are the same whatever n, and one block's samples are drawn together (vectorised). Samples are written
as the pairs task's shards (`.npy` image (3, 16, 16) uint8, `.txt` caption, `.json` metadata: concept, its
attributes, the unnamed background, frequency rank, `tail`, `is_noisy`, `is_duplicate`, `noise` kind,
`duplicate_of`, the two source digits).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from curate.files import write_json
from curate.seeding import make_generator

from .data import DIGIT_NAMES, JUNK_TEXTS, _field, _image, _npy, _pipeline, _source_pools, _tokens
from .extras import needs_extra
from .shard_writers import write_tar

__all__ = ["BACKGROUNDS", "BLOCK", "COLOURS", "CONTEXT_LENGTH", "HEAD_SHARE", "N_CONCEPTS", "NOISE", "TAIL_RANK",
           "TAILS", "TEMPLATES", "VERSION", "ZIPF_EXPONENT", "attribute_shares", "concept_attributes",
           "concept_caption", "concept_ranks", "concept_prompts", "concept_probabilities", "load_web", "make_web",
           "web_rows"]

VERSION = 2  # 1: (digit, colour, quadrant, background) concepts, whose easy attributes suppressed the digit
COLOURS = {"red": (1.0, 0.15, 0.15), "green": (0.15, 0.9, 0.15), "blue": (0.25, 0.4, 1.0),
           "yellow": (1.0, 0.95, 0.1), "magenta": (1.0, 0.15, 0.95), "cyan": (0.1, 0.95, 1.0)}
BACKGROUNDS = ("black", "grey", "striped")  # a nuisance: drawn uniformly per image, never named
N_CONCEPTS = len(DIGIT_NAMES) ** 2 * len(COLOURS)
ZIPF_EXPONENT = 1.0
NOISE = {"misaligned": 0.20, "junk": 0.10, "duplicate": 0.15}  # shares of the train stream; the rest is clean
HEAD_SHARE = 0.05  # near-duplicates copy concepts among the most frequent 5%
TAIL_RANK = N_CONCEPTS // 2  # the tail: the rarer half of the concepts, frequency rank >= this
# What the tail is made of. "shared": a random ranking of all concepts, so a tail concept's parts (its digits, its
# colour) are the head's too. "distinct": the tail is the numbers 50-99 (tens digit 5-9, every colour), the head the
# numbers 0-49, each ranked at random within its half; a tail concept is a number the head never shows.
TAILS = ("shared", "distinct")
BLOCK = 4096
CONTEXT_LENGTH = 20  # the longest caption is 13 BPE tokens with start and end
IMAGE_SIZE = 16
TEMPLATES = (
    "the number {number} in {colour}",
    "{colour} digits {tens} {units}",
    "a {colour} {tens_name} {units_name}",
    "handwritten {number} in {colour} ink",
    "{colour} {number}",
    "a photo of the number {tens_name} {units_name} written in {colour}",
)


def concept_attributes(concept: torch.Tensor) -> dict[str, torch.Tensor]:
    """tens, units, number and colour of concept ids (c = (tens·10 + units)·6 + colour, number = c // 6)."""
    number = concept // len(COLOURS)
    return {"tens": number // 10, "units": number % 10, "number": number, "colour": concept % len(COLOURS)}


@functools.lru_cache(maxsize=N_CONCEPTS * len(TEMPLATES))  # every sample's caption is one of these
def concept_caption(concept: int, template: int = 0) -> str:
    a = {k: int(v) for k, v in concept_attributes(torch.tensor(concept)).items()}
    return TEMPLATES[template].format(number=f"{a['tens']}{a['units']}", tens=a["tens"], units=a["units"],
                                      tens_name=DIGIT_NAMES[a["tens"]], units_name=DIGIT_NAMES[a["units"]],
                                      colour=list(COLOURS)[a["colour"]])


def concept_prompts(context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Zero-shot prompts (N_CONCEPTS, context_length): row c is concept c in the first template."""
    return torch.stack([_tokens(concept_caption(c), context_length) for c in range(N_CONCEPTS)])


def concept_probabilities(seed: int = 0, tail: str = "shared") -> torch.Tensor:
    """The train stream's concept distribution: Zipf over a seeded ranking of the concepts; `tail` (`TAILS`) says
    which concepts the ranking puts in the rarer half."""
    g = make_generator(seed, "web", "ranks")
    if tail == "shared":  # any concept at any rank
        order = torch.randperm(N_CONCEPTS, generator=g)
    elif tail == "distinct":  # the numbers 0-49 first, 50-99 last, each half in a random order
        concepts = torch.arange(N_CONCEPTS)
        low = concept_attributes(concepts)["tens"] < len(DIGIT_NAMES) // 2
        head, rest = concepts[low], concepts[~low]
        order = torch.cat([head[torch.randperm(len(head), generator=g)], rest[torch.randperm(len(rest), generator=g)]])
    else:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    rank = torch.empty(N_CONCEPTS, dtype=torch.long)
    rank[order] = torch.arange(N_CONCEPTS)
    weights = (rank + 1.0).double() ** -ZIPF_EXPONENT
    return (weights / weights.sum()).float()


def concept_ranks(seed: int = 0, tail: str = "shared") -> torch.Tensor:
    """Each concept's frequency rank in the train stream (0: the most frequent)."""
    return torch.argsort(torch.argsort(concept_probabilities(seed, tail), descending=True, stable=True), stable=True)


def attribute_shares(seed: int = 0, tail: str = "shared") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per concept attribute (tens, units, number, colour): each value's share of the train stream's concept
    distribution (exact, before noise), and the share of those occurrences that are tail concepts (`TAIL_RANK`):
    whether a rare concept is made of rare parts (`TAILS`)."""
    p, ranks = concept_probabilities(seed, tail), concept_ranks(seed, tail)
    in_tail = p * (ranks >= TAIL_RANK)
    out = {}
    for name, values in concept_attributes(torch.arange(N_CONCEPTS)).items():
        share = torch.zeros(int(values.max()) + 1, dtype=p.dtype).index_add_(0, values, p)
        out[name] = share, torch.zeros_like(share).index_add_(0, values, in_tail) / share
    return out


def _glyph(digits: torch.Tensor, centre_x: float, generator: torch.Generator) -> torch.Tensor:
    """Random views (N, 1, 16, 16) of 8×8 source digits, each filling most of its half of the frame."""
    n = len(digits)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * (10 * torch.pi / 180)
    zoom = 0.85 + 0.15 * torch.rand(n, generator=generator)
    sx, sy = 2 / zoom, (IMAGE_SIZE / 14) / zoom  # output → input: a half's width, 14 of the 16 rows
    centre = torch.tensor([centre_x, 0.0]) + (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 / IMAGE_SIZE)
    cos, sin = torch.cos(angle), torch.sin(angle)
    linear = torch.stack([torch.stack([cos * sx, -sin * sx], 1), torch.stack([sin * sy, cos * sy], 1)], 1)
    theta = torch.cat([linear, -(linear @ centre[:, :, None])], 2)  # input = L (output - centre)
    grid = F.affine_grid(theta, [n, 1, IMAGE_SIZE, IMAGE_SIZE], align_corners=False)
    return F.grid_sample(digits[:, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def render(tens: torch.Tensor, units: torch.Tensor, colour: torch.Tensor, background: torch.Tensor,
           generator: torch.Generator) -> torch.Tensor:
    """Random views of two-digit numbers from 8×8 source digits (tens, units: (N, 8, 8)): (N, 3, 16, 16) uint8.

    Each digit fills most of its half of the frame (zoom 0.85–1.0, rotated ±10°, shifted ±1 pixel), in the
    number's colour (each channel ±0.08), over its background (black, grey 0.45, or 2-pixel stripes of 0 and
    0.45; brightness ±0.05), with gaussian pixel noise of a per-image std in [0, 0.04].
    """
    n = len(colour)
    mask = torch.maximum(_glyph(tens, -0.5, generator), _glyph(units, 0.5, generator))  # (n, 1, H, W)
    rgb = torch.tensor(list(COLOURS.values()))[colour]
    rgb = (rgb + (torch.rand(n, 3, generator=generator) * 2 - 1) * 0.08).clamp(0, 1)
    stripes = ((torch.arange(IMAGE_SIZE) // 2) % 2).float() * 0.45
    backgrounds = torch.stack([torch.zeros(IMAGE_SIZE, IMAGE_SIZE), torch.full((IMAGE_SIZE, IMAGE_SIZE), 0.45),
                               stripes[:, None].expand(IMAGE_SIZE, IMAGE_SIZE)])
    ground = backgrounds[background][:, None] + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * 0.05
    out = mask * rgb[:, :, None, None] + (1 - mask) * ground
    out = out + torch.rand(n, 1, 1, 1, generator=generator) * 0.04 * torch.randn(out.shape, generator=generator)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)


def _by_digit(labels: torch.Tensor, pool: torch.Tensor) -> list[torch.Tensor]:
    return [pool[labels[pool] == d] for d in range(len(DIGIT_NAMES))]


def _sources(digit: torch.Tensor, by_digit: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """A source image of each digit, uniformly from the pool's images of that digit."""
    sizes = torch.tensor([len(p) for p in by_digit])
    pick = (torch.rand(len(digit), generator=generator) * sizes[digit]).long()
    starts = torch.cumsum(sizes, 0) - sizes
    return torch.cat(by_digit)[starts[digit] + pick]


def web_rows(split: str, start: int, stop: int, *, seed: int = 0, tail: str = "shared") -> list[dict]:
    """Samples [start, stop) of a split as shard rows (`__key__`, `npy`, `txt`, `json`); `tail`: see `TAILS`."""
    images, labels, pools = _source_pools(seed)
    by_digit = _by_digit(labels, pools[split])
    rows: list[dict] = []
    for block in range(start // BLOCK, (stop - 1) // BLOCK + 1 if stop > start else start // BLOCK):
        made = _block(split, block, seed, tail, images, by_digit)
        rows += made[max(start - block * BLOCK, 0):stop - block * BLOCK]
    return rows


def _block(split: str, block: int, seed: int, tail: str, images: torch.Tensor,
           by_digit: list[torch.Tensor]) -> list[dict]:
    g = make_generator(seed, "web", split, block)
    n, first = BLOCK, block * BLOCK
    probabilities, ranks = concept_probabilities(seed, tail), concept_ranks(seed, tail)
    if split == "train":
        counts = {kind: round(share * n) for kind, share in NOISE.items()}  # exact per block: rates are exact
        n_base = n - counts["duplicate"]
        concept = torch.multinomial(probabilities, n_base, replacement=True, generator=g)
    else:  # balanced: sample i shows concept i mod 600 (the reference's training shuffles)
        counts, n_base = {"misaligned": 0, "junk": 0, "duplicate": 0}, n
        concept = torch.arange(first, first + n) % N_CONCEPTS
    a = concept_attributes(concept)
    source = torch.stack([_sources(a["tens"], by_digit, g), _sources(a["units"], by_digit, g)], 1)  # (n_base, 2)
    background = torch.randint(len(BACKGROUNDS), (n_base,), generator=g)
    pixels = render(images[source[:, 0]], images[source[:, 1]], a["colour"], background, g)
    template = torch.randint(len(TEMPLATES), (n_base,), generator=g)
    perm = torch.randperm(n_base, generator=g)
    n_mis, n_junk = counts["misaligned"], counts["junk"]
    misaligned, junk, clean = perm[:n_mis], perm[n_mis:n_mis + n_junk], perm[n_mis + n_junk:]
    said = concept.clone()  # the concept the caption names: another one (as often as the stream has it) if misaligned
    other = torch.multinomial(probabilities, n_mis, replacement=True, generator=g) if n_mis else said[:0]
    same = other == concept[misaligned]
    other[same] = (other[same] + torch.randint(1, N_CONCEPTS, (int(same.sum()),), generator=g)) % N_CONCEPTS
    said[misaligned] = other
    captions = [concept_caption(c, t) for c, t in zip(said.tolist(), template.tolist(), strict=True)]
    kind = ["clean"] * n_base
    for i in misaligned.tolist():
        kind[i] = "misaligned"
    junk_text, junk_n = torch.randint(len(JUNK_TEXTS), (n_junk,), generator=g), torch.randint(10000, (n_junk,),
                                                                                             generator=g)
    for i, j, number in zip(junk.tolist(), junk_text.tolist(), junk_n.tolist(), strict=True):
        captions[i], kind[i] = JUNK_TEXTS[j].format(n=number), "junk"
    # Near-duplicates: clean pairs of head concepts again, the same caption, faint pixel noise (std 3/255).
    n_dup = counts["duplicate"]
    head = clean[ranks[concept[clean]] < round(HEAD_SHARE * N_CONCEPTS)]
    copied = head[torch.randint(len(head), (n_dup,), generator=g)] if n_dup else head[:0]
    noise = 3.0 * torch.randn(n_dup, *pixels.shape[1:], generator=g)
    pixels = torch.cat([pixels, (pixels[copied].float() + noise).clamp(0, 255).round().to(torch.uint8)])
    base = torch.cat([torch.arange(n_base), copied])
    # spreads the duplicates through the block; a balanced split keeps its order (any 600 in a row: every concept)
    order = torch.randperm(n, generator=g) if split == "train" else torch.arange(n)
    position = torch.empty(n, dtype=torch.long)
    position[order] = torch.arange(n)
    attributes = {**{k: v.tolist() for k, v in a.items()}, "background": background.tolist()}
    concept_list, rank_list, source_list = concept.tolist(), ranks[concept].tolist(), source.tolist()
    rows = []
    for out, i in enumerate(order.tolist()):
        b = int(base[i])
        duplicate = i >= n_base
        meta = {"concept": concept_list[b], "rank": rank_list[b], "tail": rank_list[b] >= TAIL_RANK,
                **{k: v[b] for k, v in attributes.items()}, "source": source_list[b],
                "noise": "duplicate" if duplicate else kind[b], "is_duplicate": duplicate,
                "is_noisy": kind[b] != "clean",  # unlearnable: misaligned or junk (a duplicate copies a clean pair)
                "duplicate_of": _key(split, first + int(position[b])) if duplicate else None}
        rows.append({"__key__": _key(split, first + out), "npy": _npy(pixels[i]), "txt": captions[b].encode(),
                     "json": json.dumps(meta, sort_keys=True).encode()})
    return rows


def _key(split: str, i: int) -> str:
    return f"web-{split}-{i:08d}"


def make_web(out_dir: str | os.PathLike, *, seed: int = 0, n_train: int = 1_000_000, n_curated: int = 24_000,
             n_test: int = 2_400, shard_size: int = 20_000, tail: str = "shared") -> dict:
    """Write the web world's shards under `out_dir/web/` and `out_dir/manifest.json`; return the manifest.

    Args:
        n_train: how many samples of the stream to write (a run that trains S steps on superbatches of B reads
            S·B: give at least that many and no pair is scored twice). The default holds 3000 steps of superbatch
            320 (960k), `recipes/web_jest.yaml`'s run: every run leaves its plateau (the units digit) by then.
        n_curated, n_test: balanced splits (multiples of 600 keep every concept exactly equally often). The
            default curated split gives the reference 40 clean pairs a concept (7200, i.e. 12, left it at half the
            accuracy uniform reaches in 3000 steps).
        tail: what the stream's rare concepts are made of (`TAILS`): "shared", the head's parts (the default world),
            or "distinct", numbers the head never shows. Only the ranking differs: the balanced splits show the
            same images and captions either way, their `tail` flags follow the ranking.
    """
    with needs_extra("make_web"):
        import sklearn.datasets  # noqa: F401
        import webdataset  # noqa: F401
    sizes = {"train": n_train, "curated": n_curated, "test": n_test}
    if tail not in TAILS:
        raise ValueError(f"make_web: tail must be one of {TAILS}, got {tail!r}")
    for name, n in {**{f"n_{k}": v for k, v in sizes.items()}, "shard_size": shard_size}.items():
        if n < 1:
            raise ValueError(f"make_web: {name} must be a positive int, got {name}={n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # no manifest while shards change
    _, _, pools = _source_pools(seed)
    manifest: dict = {
        "version": 1, "seed": seed, "image_size": IMAGE_SIZE, "format": "npy",
        "image_format": "npy uint8 (3, H, W)", "source": "sklearn.datasets.load_digits",
        "source_pools": {k: len(v) for k, v in pools.items()},
        "web": {"version": VERSION, "concepts": N_CONCEPTS, "zipf_exponent": ZIPF_EXPONENT, "noise": NOISE,
                "head_share": HEAD_SHARE, "tail": tail, "context_length": CONTEXT_LENGTH,
                "fields": ["npy", "txt", "json"], "splits": {}},
    }
    for split, n in sizes.items():
        rows = web_rows(split, 0, n, seed=seed, tail=tail)
        shards = write_tar(rows, out / "web", split, shard_size)
        metas = [json.loads(row["json"]) for row in rows]
        kinds: dict[str, int] = {}
        for meta in metas:
            kinds[meta["noise"]] = kinds.get(meta["noise"], 0) + 1
        manifest["web"]["splits"][split] = {
            "count": n, "noise_counts": dict(sorted(kinds.items())),
            "concepts": len({meta["concept"] for meta in metas}),
            "tail_share": sum(meta["tail"] for meta in metas) / n, "shards": shards}
    write_json(out / "manifest.json", manifest, indent=1)
    return manifest


def _decode(sample: dict, *, context_length: int) -> dict:
    meta = json.loads(_field(sample, "json", "load_web"))
    caption = _field(sample, "txt", "load_web").decode()
    return {"__key__": sample["__key__"], "image": _image(_field(sample, "npy", "load_web"), 3),
            "text": _tokens(caption, context_length).clone(), "caption": caption, "label": meta["concept"],
            "number": meta["number"], "background": meta["background"], "is_tail": meta["tail"],
            "is_noisy": meta["is_noisy"], "is_duplicate": meta["is_duplicate"], "noise": meta["noise"]}


def load_web(urls: str | Sequence[str], *, context_length: int = CONTEXT_LENGTH, storage_options: dict | None = None):
    """Web-world pairs as a re-iterable webdataset pipeline, in shard order. Each sample: `__key__`, `image`
    float32 (3, 16, 16) in [0, 1], `text` token ids, `caption`, `label` (the concept), `number` (0-99), the
    unnamed `background`, and the diagnostics `is_tail`, `is_noisy`, `is_duplicate`, `noise` (selection never
    reads them)."""
    return _pipeline(urls, functools.partial(_decode, context_length=context_length), storage_options)
