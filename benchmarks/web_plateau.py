"""What a web run on its plateau has not learnt, and what its trained batches hold.

Runs efficiency.py's web runs (the same `run`, recipe, world and cached reference as its grid) for the given
methods and seeds and prints, every 500 steps, zero-shot accuracy and each attribute's (tens, units, colour:
`task_web`'s evaluation) and the learner's sigmoid logit scale and bias, then, over the trained batches of steps
[--from, --steps), per pair: how many other images of its batch share its tens and colour but not its units
(negatives only the units digit tells apart) and how many show its very concept.

`--drop-noisy` removes the stream's noisy pairs by the world's labels (an oracle), `--drop-noise KIND` one kind of
them (misaligned captions, their near or far misses, or junk alt-text; repeat it for more); `--drop-share F`, their
control, a random share F; `--aligned-share F` keeps the share F that the cached reference finds best aligned
(`curate.alignment_filter`, what `curate curate-set --aligned-share F` does), the oracle's deployable form.

`--never-select KIND` keeps that kind of noise in the stream, so in every superbatch the learner and the reference
score, but never lets selection keep it (its score is -inf): of the two roles a noisy pair has, a negative in the
scoring of the others and a pair trained on, it removes the second, where `--drop-noise KIND` removes both.
`--hide-noise KIND` removes the first: every pair of that kind may be selected, but each pair is scored (its
per-example sigmoid losses, both models) against the superbatch without that kind (only a pair of the kind sees
itself). Both are probes of a per-example (`sample`) method on the sigmoid loss.

`--uniform-share F` runs the methods with `uniform_share=F` (`curate.JointSelect`): F of each selected batch drawn
uniformly from the superbatch (the stream's own mix: its head, its repeats, its noise), the rest by the method.

    .venv/bin/python benchmarks/web_plateau.py --task web_distinct --methods uniform_x1,easy_reference --seeds 0,1
    .venv/bin/python benchmarks/web_plateau.py --methods learnability_sample --seeds 0,2,4 --uniform-share 0.25
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


def _efficiency():
    spec = importlib.util.spec_from_file_location("efficiency", HERE / "efficiency.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["efficiency"] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _mix_uniform(task: str, methods: list[str], share: float) -> None:
    for name in methods:
        EFF.METHODS[task][name] = {**EFF.METHODS[task][name], "uniform_share": share}


def _run(job):
    method, seed = job
    from pipelines import train, web

    labels: list = []
    named: list = []  # per trained batch: the concept each caption names (-1: junk alt-text)
    count = train._count  # the loop's per-batch tally: the trained batch passes through it

    def tally(totals, batch):
        labels.append(batch["label"].clone())
        named.append(_named_concepts(batch))
        return count(totals, batch)

    train._count = tally
    from pipelines.task_web import WebTask

    evaluate = WebTask.evaluate

    def with_logits(self, model, *args):  # the learner's sigmoid temperature and bias beside its accuracy
        bias = getattr(model, "logit_bias", None)
        return {**evaluate(self, model, *args), "logit_scale": model.logit_scale.exp().item(),
                "logit_bias": None if bias is None else bias.item(), **_learnability_map(model)}

    WebTask.evaluate = with_logits
    sets = [f"{ARGS.task}.train.steps={ARGS.steps}", *ARGS.set]
    result = EFF.run(ARGS.task, method, seed, ARGS.work, DATA, sets, SAMPLES, TEST)
    hard, same = [], []
    for batch in labels[ARGS.start:]:
        a = web.concept_attributes(batch)
        shares = (a["tens"][:, None] == a["tens"][None]) & (a["colour"][:, None] == a["colour"][None])
        hard.append(float((shares & (a["units"][:, None] != a["units"][None])).sum(1).float().mean()))
        same.append(float(((batch[:, None] == batch[None]).sum(1) - 1).float().mean()))
    return result, statistics.fmean(hard), statistics.fmean(same), _misnamed(labels[ARGS.start:], named[ARGS.start:])


def _named_concepts(batch: dict) -> torch.Tensor:
    """The concept each caption of `batch` names (its tokens are one of the world's captions), -1 for junk alt-text
    (which names none)."""
    from pipelines import data, web

    if not _CAPTIONS:
        captions = [(c, web.concept_caption(c, t)) for c in range(web.N_CONCEPTS) for t in range(len(web.TEMPLATES))]
        tokens = data.tokenize([caption for _, caption in captions], batch["text"].shape[1])
        _CAPTIONS.update({tuple(row): c for (c, _), row in zip(captions, tokens.tolist(), strict=True)})
    return torch.tensor([_CAPTIONS.get(tuple(row), -1) for row in batch["text"].tolist()])


_CAPTIONS: dict[tuple, int] = {}


def _misnamed(labels: list[torch.Tensor], named: list[torch.Tensor]) -> dict:
    """Over the misaligned pairs (a caption naming a concept not the image's): how many there are per batch, and the
    shares whose caption shares the image's tens digit, units digit or colour."""
    from pipelines import web

    label, said = torch.cat(labels), torch.cat(named)
    mis = (said >= 0) & (said != label)
    image, caption = web.concept_attributes(label[mis]), web.concept_attributes(said[mis])
    out = {"per_batch": float(mis.sum()) / len(labels)}
    return out | {k: float((image[k] == caption[k]).float().mean()) for k in ("tens", "units", "colour")}


# which pairs and which negatives the learnability score (learner loss - reference loss) rewards, per pair; a
# negative kind is named by the one attribute in which it differs from the pair's image
_GROUPS = ("head", "tail", "noisy", "duplicate")
_NEGATIVES = {"units_only": "units", "tens_only": "tens", "colour_only": "colour"}


def _pair_losses(model, probe: dict) -> torch.Tensor:
    from curate.losses import sigmoid_pair_losses
    from pipelines.models import eval_mode

    with eval_mode(model):
        u = model.encode_image(probe["image"], normalize=True)
        v = model.encode_text(probe["text"], normalize=True)
        return sigmoid_pair_losses(u, v, model.logit_scale.exp(), model.logit_bias)


@torch.no_grad()
def _learnability_map(learner) -> dict:
    """Learnability on a fixed superbatch of the stream (PROBE: its first --map rows) at the learner's state,
    against the reference's losses on it (REFERENCE_LOSSES, computed once): the mean over the positive pairs of
    each kind of sample, and over the clean negatives that differ from their image in one attribute only
    (`units_only`: same tens and colour), against all clean negatives (`negative`)."""
    from pipelines import web

    if not ARGS.map:
        return {}
    gain = _pair_losses(learner, PROBE) - REFERENCE_LOSSES
    diagonal = gain.diagonal()
    noisy, duplicate = PROBE["is_noisy"].bool(), PROBE["is_duplicate"].bool()
    clean = ~noisy & ~duplicate
    kinds = {"head": clean & ~PROBE["is_tail"].bool(), "tail": clean & PROBE["is_tail"].bool(), "noisy": noisy,
             "duplicate": duplicate}
    out = {f"gain_{k}": float(diagonal[m].mean()) for k, m in kinds.items()}
    same = {k: v[:, None] == v[None] for k, v in web.concept_attributes(PROBE["label"]).items()}
    both = (clean[:, None] & clean[None]) & ~torch.eye(len(clean), dtype=torch.bool)
    out["gain_negative"] = float(gain[both].mean())
    for name, differs in _NEGATIVES.items():
        mask = both & ~same[differs]
        for shared in _NEGATIVES.values():
            if shared != differs:
                mask &= same[shared]
        out[f"gain_{name}"] = float(gain[mask].mean())
    return out


def _rows(batch: dict, keep: torch.Tensor) -> dict:
    index = keep.nonzero().flatten().tolist()
    return {k: v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in index] for k, v in batch.items()}


# kinds of noise: a misaligned caption names another concept than its image's, a near miss one that shares its tens
# digit, units digit or colour with the image (about 30% of them), a far miss one that shares none; junk names none
NOISE_KINDS = ("misaligned", "misaligned_near", "misaligned_far", "junk")


def _noise_of_kind(batch: dict, kind: str) -> torch.Tensor:
    """Which rows of `batch` are noise of `kind` (NOISE_KINDS), read from the concept each caption names
    (`_named_concepts`; misaligned and junk match the world's labels row for row on 50k rows of each world)."""
    from pipelines import web

    named = _named_concepts(batch)
    if kind == "junk":
        return named < 0
    misaligned = (named >= 0) & (named != batch["label"])
    if kind == "misaligned":
        return misaligned
    image, caption = web.concept_attributes(batch["label"]), web.concept_attributes(named)
    near = (image["tens"] == caption["tens"]) | (image["units"] == caption["units"]) | (
        image["colour"] == caption["colour"])
    return misaligned & (near if kind == "misaligned_near" else ~near)


class _Masked:
    """A joint gain whose logits are -inf on the masked rows."""

    def __init__(self, gain, mask: torch.Tensor):
        self.gain, self.mask = gain, mask

    def first(self) -> torch.Tensor:
        return self.gain.first().masked_fill(self.mask, float("-inf"))

    def add(self, chunk: torch.Tensor) -> torch.Tensor:
        return self.gain.add(chunk).masked_fill(self.mask, float("-inf"))


def _never_select(kind: str) -> None:
    """Selection never keeps noise of `kind`; the superbatch still holds it, so the models score it as a negative
    of every other pair (the probe patches `JointSelect._pick`, where the method draws)."""
    from curate.joint_select import JointSelect

    pick = JointSelect._pick

    def masked(self, scored, gain, score, k, generator, entropies, given):
        mask = _noise_of_kind(scored.batch, kind).to(score.device)
        gain = None if gain is None else _Masked(gain, mask)
        return pick(self, scored, gain, score.float().masked_fill(mask, float("-inf")), k, generator, entropies, given)

    JointSelect._pick = masked


def _hide_noise(kind: str) -> None:
    """Each pair's per-example losses (learner and reference) over the superbatch without noise of `kind`: the
    pairs of the kind stay candidates, scored against the rest and themselves (patches `JointSelect._pick`)."""
    from curate.joint_select import JointSelect
    from curate.losses import sigmoid_pair_losses

    pick = JointSelect._pick

    def losses(s, hide: torch.Tensor) -> torch.Tensor:
        """Per-example sigmoid losses, ½(Σ_j ℓ_ij + Σ_j ℓ_ji), over the j not hidden, and i itself."""
        pairs = sigmoid_pair_losses(s.image_emb, s.text_emb, s.scale, s.bias)
        own = torch.eye(len(hide), dtype=torch.bool, device=hide.device)
        return ((pairs * (~hide[None, :] | own)).sum(1) + (pairs * (~hide[:, None] | own)).sum(0)) / 2

    def hidden(self, scored, gain, score, k, generator, entropies, given):
        assert gain is None and scored.learner.kind == "sigmoid", "--hide-noise probes a per-example sigmoid method"
        mask = _noise_of_kind(scored.batch, kind).to(score.device)
        none = torch.zeros_like(mask)
        assert torch.allclose(scored.rule(losses(scored.learner, none), losses(scored.reference, none)),
                              score, atol=1e-3), "the probe's losses must be the scorer's over the whole superbatch"
        score = scored.rule(losses(scored.learner, mask), losses(scored.reference, mask))
        return pick(self, scored, gain, score, k, generator, entropies, given)

    JointSelect._pick = hidden


def _aligned(samples: list[dict], share: float) -> list[dict]:
    """The stream's rows on efficiency.py's key list of the best-aligned `share` (`aligned_keys`, which its `_a70`
    arms train on), in the same order; prints what the filter dropped by kind of sample (the world's labels, which
    the filter never reads)."""
    # in a child process: Polars' threads in this one would deadlock the workers forked from it
    with mp.get_context("fork").Pool(1) as pool:
        kept_keys, cutoff = pool.apply(_alignment, (share,))
    kept = set(kept_keys)
    out = [_rows(chunk, torch.tensor([key in kept for key in chunk["__key__"]])) for chunk in samples]
    for name, rows in (("stream", samples), ("kept", out)):
        flags = {k: torch.cat([c[k] for c in rows]).float() for k in ("is_noisy", "is_duplicate", "is_tail")}
        clean = (1 - flags["is_noisy"]) * (1 - flags["is_duplicate"])
        print(f"{name}: {len(flags['is_noisy'])} pairs, noisy {flags['is_noisy'].mean():.3f}, duplicate "
              f"{flags['is_duplicate'].mean():.3f}, clean tail {(clean * flags['is_tail']).mean():.3f}", flush=True)
    print(f"aligned share {share}: image-text cosine cutoff {cutoff:.3f}", flush=True)
    return out


def _alignment(share: float) -> tuple[list[str], float]:
    import polars as pl

    from curate.curation import read_keys

    path = EFF.aligned_keys(ARGS.task, share, ARGS.work, DATA, ARGS.set)
    return read_keys(path), float(pl.read_parquet_metadata(path)["cutoff"])


def main() -> None:
    global ARGS, EFF, DATA, SAMPLES, TEST, PROBE, REFERENCE_LOSSES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="web_distinct", choices=["web", "web_distinct"])
    parser.add_argument("--methods", default="uniform_x1,easy_reference,learnability_sample,jest")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel processes (one torch thread each)")
    parser.add_argument("--from", dest="start", type=int, default=500, help="first step of the batch statistics")
    parser.add_argument("--uniform-share", type=float, default=0.0,
                        help="this share of each selected batch drawn uniformly from the superbatch")
    parser.add_argument("--map", type=int, default=0, metavar="N",
                        help="at each evaluation, the learnability of the stream's first N pairs by kind of sample "
                             "and of negative (a superbatch's worth: 640 at batch 128)")
    parser.add_argument("--drop-noisy", action="store_true",
                        help="remove the stream's noisy pairs (an intervention: does the noise a rule keeps hold it?)")
    parser.add_argument("--drop-noise", choices=NOISE_KINDS, action="append", default=[],
                        help="remove one kind of the stream's noise (repeat for more): misaligned captions (they name "
                             "another concept), only their near misses (sharing the image's tens, units or colour) or "
                             "far misses (sharing none), or junk alt-text (it names none)")
    parser.add_argument("--never-select", choices=NOISE_KINDS, default=None,
                        help="keep one kind of noise in the stream (scored, a negative of the others) but never select "
                             "it for training")
    parser.add_argument("--hide-noise", choices=NOISE_KINDS, default=None,
                        help="score every pair against the superbatch without one kind of noise (which stays a "
                             "candidate): the kind is no negative in the others' scores")
    parser.add_argument("--drop-share", type=float, default=0.0,
                        help="remove this share of the stream's pairs at random (--drop-noisy's control: 0.3)")
    parser.add_argument("--aligned-share", type=float, default=0.0, metavar="F",
                        help="train on the share F of the stream whose cached reference image and text embeddings "
                             "agree best (curate.alignment_filter, as `curate curate-set --aligned-share F`)")
    parser.add_argument("--set", action="append", default=[], metavar="TASK.KEY=VALUE",
                        help="efficiency.py's --set: a recipe override (the learner's batch size or lr)")
    parser.add_argument("--data", default="/tmp/curate-bench/data-2m", help="efficiency.py's --data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/curate-bench/work-2m"), help="efficiency.py's --work")
    ARGS = parser.parse_args()
    EFF = _efficiency()
    DATA = Path(f"{ARGS.data}-{ARGS.task}")
    if not (DATA / "manifest.json").is_file():
        raise SystemExit(f"web_plateau: no world at {DATA}; run efficiency.py --tasks {ARGS.task} first")
    EFF.check_world(DATA, ARGS.task, EFF.WORLDS[ARGS.task])
    SAMPLES, TEST = EFF.load_task(ARGS.task, ARGS.work, DATA, [])
    if ARGS.drop_noisy:  # an intervention: the stream without its noisy pairs, in the same order otherwise
        SAMPLES = [_rows(chunk, ~chunk["is_noisy"].bool()) for chunk in SAMPLES]
    for kind in ARGS.drop_noise:  # which kind of noise matters: misaligned captions (near or far misses) or junk
        SAMPLES = [_rows(chunk, ~_noise_of_kind(chunk, kind)) for chunk in SAMPLES]
    if ARGS.never_select:
        _never_select(ARGS.never_select)
    if ARGS.hide_noise:
        _hide_noise(ARGS.hide_noise)
    if ARGS.drop_share:  # its control: as many rows dropped at random, so the order changes as much, noise kept
        g = torch.Generator().manual_seed(0)
        SAMPLES = [_rows(chunk, torch.rand(len(chunk["label"]), generator=g) >= ARGS.drop_share)
                   for chunk in SAMPLES]
    if ARGS.aligned_share:  # the offline filter a user runs with curate-set, applied to the stream's keys
        SAMPLES = _aligned(SAMPLES, ARGS.aligned_share)
    if ARGS.map:
        from pipelines import tasks

        recipe = EFF.recipe_for(ARGS.task, 0, ARGS.work, DATA, ARGS.set)
        reference = tasks.load_model(recipe.reference_path, recipe, recipe.reference_model)[0]
        PROBE = {k: v[:ARGS.map] for k, v in SAMPLES[0].items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            REFERENCE_LOSSES = _pair_losses(reference, PROBE)
    if ARGS.uniform_share:
        _mix_uniform(ARGS.task, ARGS.methods.split(","), ARGS.uniform_share)
    jobs = [(m, int(s)) for m in ARGS.methods.split(",") for s in ARGS.seeds.split(",")]
    # forked after loading: the workers share the samples. One run per worker: a worker copies the pages of the
    # samples its run touches (refcounts), and kept for many runs each held 15-16 GB of the 24 at 20 runs
    # before the fork: the workers inherit the caption table `_named_concepts` builds here
    base = _misnamed([SAMPLES[0]["label"]], [_named_concepts(SAMPLES[0])])
    print("the stream's misaligned captions (first part) share the image's " + ", ".join(
        f"{k} {base[k]:.3f}" for k in ("tens", "units", "colour")), flush=True)
    with mp.get_context("fork").Pool(ARGS.jobs, maxtasksperchild=1) as pool:
        for result, hard, same, misnamed in pool.imap(_run, jobs):
            mix = f" with {ARGS.uniform_share:.0%} uniform" if ARGS.uniform_share else ""
            print(f"{result['method']}{mix} seed {result['seed']}: per pair, {hard:.2f} units-only negatives and "
                  f"{same:.2f} images of its concept (steps {ARGS.start}-{ARGS.steps}); noisy kept "
                  f"{statistics.fmean(h['noisy_kept'] for h in result['history']):.2f}; misaligned per batch "
                  f"{misnamed['per_batch']:.2f}, sharing the image's " + ", ".join(
                      f"{k} {misnamed[k]:.3f}" for k in ("tens", "units", "colour")))
            for h in result["history"]:
                if h["step"] % 500 == 0 or h is result["history"][-1]:
                    print(f"  step {h['step']:5d}: accuracy {h['accuracy']:.3f}, tens {h['tens_accuracy']:.3f}, "
                          f"units {h['units_accuracy']:.3f}, colour {h['colour_accuracy']:.3f}, "
                          f"tail {h['tail_accuracy']:.3f}, logit scale {h['logit_scale']:.2f}, "
                          f"bias {h['logit_bias']:.2f}")
                    if ARGS.map:
                        print("    learnability, positives: " + ", ".join(
                            f"{k} {h[f'gain_{k}']:.2f}" for k in _GROUPS) + "; negatives: " + ", ".join(
                            f"{k} {h[f'gain_{k}']:.3f}" for k in ("negative", *_NEGATIVES)))


if __name__ == "__main__":
    main()
