"""The `curate` command: argv in, jobs from `pipelines/` out.

    curate data digits OUT [--format npy|webdataset|parquet]   make the embedded datasets (in your data's shapes)
    curate data web OUT [--n-train N]   make the long-tailed compositional web world (pipelines/web.py)
    curate train-reference RECIPE       train the reference on the curated split
    curate precompute RECIPE            reference scores → Parquet cache
    curate curate-set RECIPE            reference embeddings → align → dedup → balance → curated key list
    curate run RECIPE [--compare RULE ...] [--resume | --resume-anyway] [--set key=value ...]
    curate inspect CACHE                summarise a score cache, histogram PNG

Only the standard library is imported here: arguments are parsed (and `--help` answered) before torch, the
recipe schema or any job module is imported (torch alone takes ~2 s and ~700 MB), so each command imports
its job inside its function.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import extras
from .recipe_keys import help_text

if TYPE_CHECKING:
    from .recipe import Recipe

__all__ = ["main", "prepare"]


def prepare(recipe: Recipe, log=print) -> None:
    """Make what a `prepare: true` recipe is missing: the data, the reference, the cache."""
    from . import tasks

    try:
        tasks.check_data(recipe)
    except tasks.MissingDataError:
        if recipe.data.root.startswith("s3://") or tasks.own_data(recipe):
            raise
        if recipe.data.dataset == "web":
            from .web import make_web

            log(f"prepare: making the web world in {recipe.data.root}")
            make_web(recipe.data.root, seed=recipe.train.seed)
        else:
            from .data import make_digits

            log(f"prepare: making the digits datasets in {recipe.data.root}")
            make_digits(recipe.data.root, seed=recipe.train.seed)
    if recipe.reference.checkpoint is None and not (recipe.reference_path / "model.safetensors").is_file():
        from .train_reference import train_reference

        log("prepare: training the reference")
        train_reference(recipe, log=log)
    if recipe.cache.path and not _cache_exists(recipe):
        from .precompute import precompute

        log(f"prepare: precomputing reference scores into {recipe.cache.path}")
        precompute(recipe, log=log)


def _cache_exists(recipe: Recipe) -> bool:
    from curate.files import filesystem, remote_errors

    assert recipe.cache.path is not None
    with remote_errors(recipe.cache.path, recipe.data.storage_options, "listing"):  # bounded S3 timeouts
        fs, path = filesystem(recipe.cache.path, recipe.data.storage_options)
        return fs.exists(path) and bool(fs.glob(f"{path.rstrip('/')}/part-*.parquet"))


def _recipe(args) -> Recipe:
    import json

    from .recipe import load_recipe

    overrides = list(args.set or [])
    recipe = load_recipe(args.recipe, overrides)
    # --compare RULE (repeated, or comma-separated) adds baselines to the recipe's own list; the recipe validates them
    given = [name.strip() for value in getattr(args, "compare", None) or [] for name in value.split(",")]
    added = [name for name in dict.fromkeys(given) if name and name not in recipe.compare]
    if added:
        recipe = load_recipe(args.recipe, [*overrides, f"compare={json.dumps([*recipe.compare, *added])}"])
    return recipe


def _data(args) -> None:
    if args.name == "web":
        if args.format != "npy" or args.image_size != 16:
            raise SystemExit("curate data web: the web world is written as npy shards of 16×16 images; drop "
                             "--format / --image-size")
        from .web import make_web

        given = (("n_train", args.n_train), ("shard_size", args.shard_size), ("tail", args.tail))
        made = make_web(args.out, seed=args.seed, **{k: v for k, v in given if v is not None})  # else its defaults
        splits = made["web"]["splits"]
        print(f"wrote {args.out}: web {'/'.join(str(s['count']) for s in splits.values())} (train/curated/test), "
              f"{made['web']['concepts']} concepts, {made['web']['tail']} tail; "
              f"train {splits['train']['noise_counts']}")
        return
    if args.tail is not None:
        raise SystemExit("curate data digits: --tail is the web world's; drop it")
    from .data import make_digits

    manifest = make_digits(args.out, seed=args.seed, n_train=args.n_train or 20_000, format=args.format,
                           image_size=args.image_size, shard_size=args.shard_size or 5_000)
    print(f"wrote {args.out} ({args.format}): " + ", ".join(
        f"{name} " + "/".join(f"{split['count']}" for split in ds["splits"].values())
        for name, ds in manifest.items() if isinstance(ds, dict) and "splits" in ds) + " (train/curated/test)")
    if args.format != "npy":  # what an own-data recipe points at
        from .shard_writers import SUFFIX

        suffix = SUFFIX[args.format]
        for name in ("pairs", "digits"):
            print(f"  {name}: data.train: {args.out}/{name}/train-*.{suffix}  data.curated: "
                  f"{args.out}/{name}/curated-*.{suffix}  data.eval: {args.out}/{name}/test-*.{suffix}")


def _train_reference(args) -> None:
    from .train_reference import train_reference

    recipe = _recipe(args)
    if recipe.prepare:
        from . import tasks

        try:
            tasks.check_data(recipe)
        except tasks.MissingDataError:
            prepare(recipe)
            return
    train_reference(recipe)


def _precompute(args) -> None:
    from .precompute import precompute

    precompute(_recipe(args), rank=args.rank, world_size=args.world_size, backend=args.backend,
               on_error=args.on_error, overwrite=args.overwrite, claim_timeout_s=args.claim_timeout)


def _curate_set(args) -> None:
    from .curate_set import curate_set

    # the flags are shorthands for --set curation.*=..., so the recipe validates them
    for flag in ("aligned_share", "embedding", "n_clusters", "threshold", "per_cluster"):
        if getattr(args, flag) is not None:
            args.set = [*(args.set or []), f"curation.{flag}={getattr(args, flag)}"]
    curate_set(_recipe(args), seed=args.seed)


def _run(args) -> None:
    from .train import run

    recipe = _recipe(args)
    # under torchrun, run() prepares on rank 0 only while the other ranks wait
    run(recipe, resume=args.resume, resume_anyway=args.resume_anyway, prepare=prepare if recipe.prepare else None)


def _inspect(args) -> None:
    from .precompute import inspect_cache

    inspect_cache(args.cache, png=args.png)


def main(argv: list[str] | None = None) -> int:
    keys = {"epilog": help_text(), "formatter_class": argparse.RawDescriptionHelpFormatter}
    parser = argparse.ArgumentParser(prog="curate", description="Choose what to train on.", **keys)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("data", help="make an embedded default dataset", **keys)
    p.add_argument("name", choices=["digits", "web"], help="digits: the pairs and noisy-digits datasets; web: the "
                   "long-tailed compositional web world (pipelines/web.py)")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=None,
                   help="train samples of each dataset (default 20000; web: 1000000 of its stream)")
    p.add_argument("--format", choices=["npy", "webdataset", "parquet"], default="npy",
                   help="npy: tar shards of .npy images, what the demo recipes read (default); webdataset: JPEG "
                        "tar shards as img2dataset writes them; parquet: tables of JPEG bytes and columns (the "
                        "last two are the shapes of your own data, for recipes/byo_*.yaml)")
    p.add_argument("--image-size", type=int, default=16, help="side of the square images (default 16)")
    p.add_argument("--shard-size", type=int, default=None, help="samples per shard (default 5000; web: 20000)")
    p.add_argument("--tail", choices=["shared", "distinct"], default=None,
                   help="web only: what its rare concepts are made of: the head's digits and colours (shared, the "
                        "default) or numbers the head never shows (distinct)")
    p.set_defaults(fn=_data)

    for name, fn, text in (("train-reference", _train_reference, "train the reference model"),
                           ("precompute", _precompute, "reference scores → Parquet cache"),
                           ("curate-set", _curate_set, "reference embeddings → align → dedup → balance → curated keys"),
                           ("run", _run, "train with curated batches")):
        p = commands.add_parser(name, help=text, description=text, **keys)
        p.add_argument("recipe", type=Path)
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value")
        p.set_defaults(fn=fn)
        if name == "run":
            p.add_argument("--compare", metavar="RULE", action="append",
                           help="also train this baseline (repeat, or comma-separate: uniform,easy_reference)")
            p.add_argument("--resume", action="store_true", help="continue from the runs' checkpoints")
            p.add_argument("--resume-anyway", action="store_true",
                           help="--resume even under a recipe changed since the checkpoint (the changes are logged)")
        if name == "precompute":
            p.add_argument("--rank", type=int, default=0)
            p.add_argument("--world-size", type=int, default=1)
            p.add_argument("--backend", choices=["local", "ray"], default="local")
            p.add_argument("--overwrite", action="store_true", help="rescore every part, also current ones")
            p.add_argument("--claim-timeout", type=float, default=600.0, metavar="S",
                           help="take over another run's claim on a shard after S seconds without a heartbeat")
            p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                           help="a shard that cannot be read whole: fail (default), or skip it and record it "
                                "in precompute_report.json")
        if name == "curate-set":
            p.add_argument("--aligned-share", type=float, default=None, metavar="F",
                           help="first keep only this share of the samples whose reference image and text "
                                "embeddings agree best (a CLIP-score filter; default: curation.aligned_share, all)")
            p.add_argument("--embedding", choices=["image", "text", "both"], default=None,
                           help="which reference embedding to compare (default: curation.embedding, image)")
            p.add_argument("--n-clusters", type=int, default=None, help="k-means clusters (default: √N)")
            p.add_argument("--threshold", type=float, default=None,
                           help="cosine at which samples are duplicates (default: curation.threshold, 0.95)")
            p.add_argument("--per-cluster", type=int, default=None, help="cap per cluster after dedup (default: none)")
            p.add_argument("--seed", type=int, default=None, help="k-means and balancing seed (default: train.seed)")

    p = commands.add_parser("inspect", help="summarise a score cache", **keys)
    p.add_argument("cache")
    p.add_argument("--png", type=Path, default=None, help="histogram path (default: scores.png here)")
    p.set_defaults(fn=_inspect)

    args = parser.parse_args(argv)
    # every command runs jobs of pipelines/, which need the app extra: say so before any work starts
    missing = extras.missing_message(f"curate {args.command}")
    if missing:
        print(f"curate {args.command}: error: {missing}", file=sys.stderr)
        return 2
    _bound_s3()
    _log_to_stderr()
    try:
        args.fn(args)
    except (OSError, ValueError, RuntimeError, ImportError) as error:  # RecipeError is a ValueError; DiskFullError,
        # StorageError (curate.files) and FileNotFoundError are OSErrors
        if isinstance(error, ModuleNotFoundError):  # an extra the command needs beyond the app's (faiss, s3fs, ray)
            error = extras.explain(error, f"curate {args.command}") or error
        print(f"curate {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # botocore's connection errors are no OSError: S3 reached outside curate.files
        storage = _storage_error(error)
        if storage is None:
            raise
        print(f"curate {args.command}: error: {storage}", file=sys.stderr)
        return 2
    return 0


def _log_to_stderr() -> None:
    """curate's log lines (progress where stderr is not a terminal, skipped samples, warnings) on stderr, as
    `curate: message`; only in the command's process, and only when nothing configured the `curate` logger."""
    import logging

    class Stderr(logging.StreamHandler):  # the stderr of the moment: a test (or a caller) may swap sys.stderr
        stream = property(lambda self: sys.stderr, lambda self, value: None)  # type: ignore[assignment]

    logger = logging.getLogger("curate")
    if not logger.handlers:
        handler = Stderr()
        handler.setFormatter(logging.Formatter("curate: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _bound_s3() -> None:
    """curate.files' S3 timeouts for every S3 filesystem this command opens, also those opened by plain
    fsspec.open (the shard readers of pipelines.data): fsspec fills them in wherever storage_options give no
    config_kwargs of their own. Only the command's process: the library sets no global defaults."""
    import fsspec.config

    from curate.files import S3_CONFIG

    fsspec.config.conf.setdefault("s3", {}).setdefault("config_kwargs", dict(S3_CONFIG))


def _one_line(error: BaseException) -> str:
    """The message on one line (multi-line messages, e.g. a recipe's list of invalid keys, joined with '; ')."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def _storage_error(error: BaseException) -> str | None:
    """A one-line message for an S3 connection failure or timeout that escaped curate.files' translation."""
    from curate.files import _connection_error, _timeout_error

    if not (_connection_error(error) or _timeout_error(error)):
        return None
    from urllib.parse import urlsplit

    what = "did not answer in time" if _timeout_error(error) else "could not be reached"
    url = urlsplit(str(getattr(error, "kwargs", {}).get("endpoint_url", "")))
    return (f"S3 endpoint {url.scheme}://{url.netloc} {what} "
            f"({type(error).__name__}: {_one_line(error)[:200]}): check data.storage_options' endpoint_url and the "
            "network, or raise the timeouts via data.storage_options.config_kwargs (read_timeout, retries)")


if __name__ == "__main__":
    sys.exit(main())
