"""How long to train a reference: its learning curve on a held-out tenth of the curated split.

The reference is trained on clean curated data only, so its training length is chosen the way any supervised
model's is: by its own held-out accuracy, never by how a selection method does with it. This trains the
efficiency benchmark's reference configuration of a task (and, with `--acl`, ACL's small reference) on 90% of the
curated split and prints the held-out and test accuracy every `--every` steps.

    .venv/bin/python benchmarks/reference_curve.py --data /tmp/curate-bench/data-long-web --steps 9000 \
        --out benchmarks/results/reference_curve_web.json   # 14 min; --acl 32: ACL's width-32 reference
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def curve(recipe, *, steps: int, every: int, holdout: float = 0.1, downsample: int = 1, low_share: float = 1.0,
          log=print) -> list[dict]:
    """Train `recipe`'s reference model as `train_reference` does, on all but a random `holdout` share of the
    curated split; evaluate on the held-out share and on the test split every `every` steps.

    `downsample` k > 1 with `low_share` 1 trains and evaluates on images average-pooled by k (Flexi-JEST's low
    resolution, `pipelines.flexi`): how much of the task a model that only ever sees that resolution can learn,
    the ceiling of low-resolution scoring. With `low_share` < 1 it trains as Flexi-JEST's learner does, that share
    of every batch at low resolution and the rest at full, and is evaluated at both (`test_low`)."""
    from pipelines import tasks
    from pipelines.train_reference import fit

    task, device = tasks.task_of(recipe), torch.device("cpu")
    cfg = recipe.reference_model
    model = tasks.build_model(cfg, recipe, seed=recipe.train.seed + 1_000)
    curated = list(tasks.load_split(recipe, "curated"))
    test_split = list(tasks.load_split(recipe, "test"))
    pool_images = lambda samples: [{**s, "image": torch.nn.functional.avg_pool2d(s["image"], downsample)}  # noqa: E731
                                   for s in samples]
    mixed = downsample > 1 and low_share < 1
    flexi = None
    if downsample > 1:
        from pipelines.flexi import make_flexible
        from pipelines.recipe import FlexiConfig

        make_flexible(model)
        if mixed:
            flexi = FlexiConfig(downsample=downsample, train_share=low_share)
        else:
            curated, test_split = pool_images(curated), pool_images(test_split)
    split = torch.randperm(len(curated), generator=torch.Generator().manual_seed(12345))
    n_held = int(len(curated) * holdout)
    held = tasks.in_memory_batches([curated[i] for i in split[:n_held].tolist()]) if n_held else []
    kept = split[n_held:] if n_held else torch.arange(len(curated))  # no holdout: `train_reference`'s very run
    (pool,) = tasks.in_memory_batches([curated[i] for i in kept.tolist()], batch_size=1 << 30)
    test = tasks.in_memory_batches(test_split)
    test_low = tasks.in_memory_batches(pool_images(test_split)) if mixed else None
    n, rows, start = len(pool["__key__"]), [], time.perf_counter()

    def evaluate(step: int, loss: torch.Tensor) -> None:
        if step % every == 0:
            row = {"step": step, "epochs": round(step * recipe.reference.batch_size / n, 1),
                   "loss": round(loss.item(), 4),
                   "held_out": round(task.evaluate(model, held, cfg, device)["accuracy"], 4) if held else None,
                   "test": round(task.evaluate(model, test, cfg, device)["accuracy"], 4),
                   **({"test_low": round(task.evaluate(model, test_low, cfg, device)["accuracy"], 4)} if mixed else {}),
                   "seconds": round(time.perf_counter() - start)}
            log(row)
            rows.append(row)

    fit(model, pool, recipe, steps=steps, device=device, on_step=evaluate, flexi=flexi)
    return rows


def main() -> None:
    from efficiency import TASKS, recipe_for

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="web")
    parser.add_argument("--data", required=True, help="the task's world root (made by `curate data`)")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--acl", type=int, default=None, metavar="WIDTH", help="ACL's small reference of this width")
    parser.add_argument("--set", action="append", default=[], metavar="TASK.KEY=VALUE")
    parser.add_argument("--holdout", type=float, default=0.1, help="share of the curated split held out (0: none)")
    parser.add_argument("--downsample", type=int, default=1,
                        help="train and evaluate at 1/k resolution (Flexi-JEST's scoring resolution)")
    parser.add_argument("--low-share", type=float, default=1.0,
                        help="with --downsample: this share of every batch at low resolution, the rest at full "
                             "(Flexi-JEST's learner: 0.5)")
    parser.add_argument("--out", default=None, help="also write the curve to this JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    acl = args.acl and {"width": args.acl, "layers": 1, "text_width": args.acl, "text_layers": 1,
                        "embed_dim": args.acl}
    recipe = recipe_for(args.task, 0, Path("/tmp/curate-reference-curve"), Path(args.data), args.set, acl=acl or None)
    rc = recipe.reference
    print(f"{args.task} reference {recipe.reference_model.model_dump(exclude_none=True)}, batch {rc.batch_size}, "
          f"lr {rc.lr} (the benchmark trains it {TASKS[args.task]['recipe']['reference']['steps']} steps)")
    rows = curve(recipe, steps=args.steps, every=args.every, holdout=args.holdout, downsample=args.downsample,
                 low_share=args.low_share,
                 log=lambda row: print(row, flush=True))
    if args.out:
        from results_io import write_json

        write_json({"benchmark": "reference_curve", "argv": sys.argv[1:], "task": args.task,
                    "model": recipe.reference_model.model_dump(exclude_none=True), "batch_size": rc.batch_size,
                    "lr": rc.lr, "downsample": args.downsample, "low_share": args.low_share, "curve": rows}, args.out)


if __name__ == "__main__":
    main()
