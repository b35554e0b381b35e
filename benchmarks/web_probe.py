"""What the web world's learner encodes: linear probes of its image and text embeddings for each attribute.

Trains the web task's learner (`tiny_clip`, SigLIP, the efficiency grid's settings) uniformly on the web
stream for `--steps`, then fits a logistic regression from the curated split's L2-normalised embeddings to each
concept attribute (tens, units, number, colour) and the unnamed background, and scores it on the test split.
Chance is 0.1 for a digit, 0.01 for the number, 1/6 for the colour and 1/3 for the background. An attribute the
probe cannot read is one the model has not learnt (the background is a nuisance: reading it is not needed).

    .venv/bin/python benchmarks/web_probe.py --steps 1200     # ~3 min on one thread
    .venv/bin/python benchmarks/web_probe.py --marginals      # how rare each attribute value is (no training)
    .venv/bin/python benchmarks/web_probe.py --marginals --tail distinct   # in the world whose tail has its own parts
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def marginals(seed: int = 0, tail: str = "shared") -> dict:
    """The tail's and the head's mass, and per attribute the range of its values' shares of the stream and of their
    occurrences in tail concepts (`web.attribute_shares`)."""
    from pipelines import web

    p, ranks = web.concept_probabilities(seed, tail), web.concept_ranks(seed, tail)
    head = ranks < round(web.HEAD_SHARE * web.N_CONCEPTS)  # the concepts near-duplicates copy
    out: dict = {"tail_mass": float(p[ranks >= web.TAIL_RANK].sum()), "head_5pct_mass": float(p[head].sum())}
    for name, (share, in_tail) in web.attribute_shares(seed, tail).items():
        out[name] = {"values": len(share), "share_min": float(share.min()), "share_max": float(share.max()),
                     "in_tail_min": float(in_tail.min()), "in_tail_max": float(in_tail.max())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--data", default="/tmp/curate-bench/data-web", help="a web world; made if missing")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, e.g. model.options.patch_size=2")
    parser.add_argument("--marginals", action="store_true", help="print how rare each attribute value is and stop")
    parser.add_argument("--tail", default="shared", help="with --marginals: the world's tail (shared or distinct)")
    args = parser.parse_args()
    if args.marginals:
        for name, value in marginals(tail=args.tail).items():
            print(name, {k: round(v, 4) for k, v in value.items()} if isinstance(value, dict) else round(value, 4))
        return
    from sklearn.linear_model import LogisticRegression

    from pipelines import tasks, web
    from pipelines.recipe import parse_recipe

    torch.set_num_threads(1)
    if not (Path(args.data) / "manifest.json").is_file():
        web.make_web(args.data)
    text = ("name: web-probe\ndata: {dataset: web}\nmodel: {kind: tiny_clip, loss: sigmoid}\n"
            "train: {batch_size: 64, lr: 0.001, device: cpu}\n")
    recipe = parse_recipe(text, "web_probe", [f"data.root={args.data}", f"train.out={tempfile.mkdtemp()}",
                                              *args.set])
    task, cfg, device = tasks.task_of(recipe), recipe.model, torch.device("cpu")
    model = tasks.build_model(cfg, recipe, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
    stream = itertools.cycle(tasks.in_memory_batches(tasks.load_split(recipe, "train"), recipe.train.batch_size))
    model.train()
    for _ in range(args.steps):  # uniform training on the stream in its order
        optimizer.zero_grad(set_to_none=True)
        task.train_loss(model, next(stream), cfg, device).backward()
        optimizer.step()
    model.eval()

    def embeddings(split: str):
        batches = tasks.in_memory_batches(tasks.load_split(recipe, split))
        with torch.no_grad():
            image = torch.cat([model.encode_image(b["image"], normalize=True) for b in batches]).numpy()
            caption = torch.cat([model.encode_text(b["text"], normalize=True) for b in batches]).numpy()
        attributes = web.concept_attributes(torch.cat([b["label"] for b in batches]))
        attributes["background"] = torch.cat([b["background"] for b in batches])
        return {"image": image, "text": caption}, {k: v.numpy() for k, v in attributes.items()}

    (fit, fit_y), (test, test_y) = embeddings("curated"), embeddings("test")
    evaluation = task.evaluate(model, tasks.in_memory_batches(tasks.load_split(recipe, "test")), cfg, device)
    print(f"{args.steps} uniform steps; {evaluation}")
    print("| tower | " + " | ".join(fit_y) + " |")
    print("|---" * (len(fit_y) + 1) + "|")
    for tower in ("image", "text"):
        scores = [LogisticRegression(max_iter=2000).fit(fit[tower], fit_y[a]).score(test[tower], test_y[a])
                  for a in fit_y]
        print(f"| {tower} | " + " | ".join(f"{s:.3f}" for s in scores) + " |")


if __name__ == "__main__":
    main()
