"""One rank of a `torchrun --nproc_per_node=2` job for tests/test_distributed.py (gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_worker.py SCENARIO OUT [DATA...]

Each rank saves what it saw to OUT/SCENARIO-RANK.pt; the test checks it against single-process references.
"""

from __future__ import annotations

import functools
import io
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import curate  # noqa: E402
from tests.conftest import linear_models, make_pairs, make_samples, tiny_clip  # noqa: E402

torch.set_num_threads(1)


class Recording:
    """A scorer that notes the keys of every superbatch it scores (learner and reference: each one twice)."""

    def __init__(self, scorer):
        self.scorer, self.keys, self.kind, self.seen = scorer, scorer.keys, scorer.kind, []

    def __call__(self, model, batch):
        if not self.seen or self.seen[-1] != list(batch["__key__"]):
            self.seen.append(list(batch["__key__"]))
        return self.scorer(model, batch)


# the global-selection cases: (name, data, models, scorer, options); the test rebuilds the same
GLOBAL_CASES = {
    "topk": dict(data=lambda: make_samples(240), models=linear_models, scorer=curate.ClassificationScorer,
                 options=dict(method="topk", batch_size=5, superbatch_size=20, shuffle_buffer=16)),
    "sample": dict(data=lambda: make_samples(240), models=linear_models, scorer=curate.ClassificationScorer,
                   options=dict(method="sample", batch_size=5, superbatch_size=20, shuffle_buffer=16)),
    "joint_sigmoid": dict(data=lambda: make_pairs(96), models=lambda: (tiny_clip(seed=0), tiny_clip(seed=1)),
                          scorer=lambda: curate.ContrastiveScorer(loss="sigmoid"),
                          options=dict(method="joint", batch_size=4, superbatch_size=16, n_chunks=3, shuffle_buffer=0)),
    # more chunks than a rank keeps (b=2) but no more than the global batch (W·b=4): the cap is the global batch
    "joint_many_chunks": dict(data=lambda: make_pairs(96), models=lambda: (tiny_clip(seed=0), tiny_clip(seed=1)),
                              scorer=lambda: curate.ContrastiveScorer(loss="sigmoid"),
                              options=dict(method="joint", batch_size=2, superbatch_size=8, n_chunks=4,
                                           shuffle_buffer=0)),
    "joint_softmax": dict(data=lambda: make_pairs(96),
                          models=lambda: (tiny_clip("softmax", seed=0), tiny_clip("softmax", seed=1)),
                          scorer=lambda: curate.ContrastiveScorer(loss="softmax"),
                          options=dict(method="joint", batch_size=4, superbatch_size=16, n_chunks=3, shuffle_buffer=0)),
    # half of each rank's batch uniform (`uniform_share`): each rank gets its own uniform picks, then its top-k slice
    "topk_uniform_share": dict(data=lambda: make_samples(240), models=linear_models, scorer=curate.ClassificationScorer,
                               options=dict(method="topk", batch_size=4, superbatch_size=20, shuffle_buffer=16,
                                            uniform_share=0.5)),
}
TRAIN = dict(batch_size=5, superbatch_size=20, steps=8, lr=0.5)


def scenario_library(out: dict, digits: str) -> None:
    # 1. a plain list split by sample index, two epochs, everything kept (filter_ratio=0)
    p = curate.pipeline(make_samples(203), rule="uniform", method="sample", filter_ratio=0.0, batch_size=10,
                        shuffle_buffer=0)
    out["split_samples"] = [[b["__key__"] for b in p] for _ in range(2)]
    out["split_samples_stats"] = p.stats()
    out["split_samples_len"] = len(p)  # known ahead: the ranks stop together at the shorter share's full superbatches
    # 2. webdataset shards of unequal sizes (200, 200, 100) split by shard, then by 2 DataLoader workers
    from pipelines import data

    urls = data.shard_urls(digits, "digits", "train")
    shards = curate.distributed.Shards(urls, data.load_digits)
    loader = DataLoader(shards, batch_size=None, num_workers=2)
    p = curate.pipeline(loader, rule="uniform", method="sample", filter_ratio=0.0, batch_size=40, shuffle_buffer=0)
    out["split_shards"] = [b["__key__"] for b in p]
    out["split_shards_urls"] = shards.urls
    out["split_shards_stats"] = p.global_stats()
    # 3. global selection: what each rank scored and what it trains on
    for name, case in GLOBAL_CASES.items():
        learner, reference = case["models"]()
        scorer = Recording(case["scorer"]())
        p = curate.pipeline(case["data"](), learner=learner, reference=reference, scorer=scorer, seed=3,
                            selection_scope="global", **case["options"])
        out[f"global_{name}"] = {"batches": list(p), "superbatches": scorer.seen}
    # 4. DDP training on globally selected batches, scored from a WeightSync snapshot in a prefetch thread
    learner, _ = linear_models(seed=1)
    ddp = nn.parallel.DistributedDataParallel(learner)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=TRAIN["lr"])
    scorer = Recording(curate.ClassificationScorer())
    p = curate.pipeline(make_samples(400, seed=1), learner=ddp, scorer=scorer, rule="hard_learner", method="sample",
                        batch_size=TRAIN["batch_size"], superbatch_size=TRAIN["superbatch_size"], shuffle_buffer=8,
                        selection_scope="global", prefetch=1)
    keys = []
    for _, batch in zip(range(TRAIN["steps"]), p, strict=False):
        optimizer.zero_grad()
        F.cross_entropy(ddp(batch["input"]), batch["target"]).backward()
        optimizer.step()
        keys.append(batch["__key__"])
    total = p.global_stats()  # waits for the superbatch being prefetched
    out["train"] = {"keys": keys, "superbatches": scorer.seen, "weights": learner.state_dict(), "stats": p.stats(),
                    "global_stats": total}
    # 5. resume mid-epoch: a fresh pipeline from a checkpoint continues exactly
    def build():
        learner, reference = linear_models()
        return curate.pipeline(make_samples(240, seed=2), learner=learner, reference=reference, method="sample",
                               scorer=curate.ClassificationScorer(), batch_size=5, superbatch_size=20,
                               shuffle_buffer=16, selection_scope="global")

    full = [b["__key__"] for b in build()]
    first = build()
    it = iter(first)
    head = [next(it)["__key__"] for _ in range(3)]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = build()
    second.load_state_dict(torch.load(buffer, weights_only=True))
    out["resume"] = {"full": full, "resumed": head + [b["__key__"] for b in second]}
    # 6. a selection warmup under a global scope, over sources split unevenly before curate (150 and 100 samples:
    # 3 and 2 superbatches of 50), resumed by set_epoch(1) alone: every rank must count the same warmup
    rank = dist.get_rank()
    mine = [{**s, "__key__": f"r{rank}-{s['__key__']}"} for s in make_samples(150 - 50 * rank, seed=rank)]
    learner, reference = linear_models()
    p = curate.pipeline(mine, learner=learner, reference=reference, scorer=curate.ClassificationScorer(),
                        method="topk", batch_size=10, superbatch_size=50, shuffle_buffer=0, seed=3,
                        selection_scope="global", rank_split="none", selection_warmup=3)
    p.set_epoch(1)
    out["warmup"] = {"len": len(p), "batches": [b["__key__"] for b in p], "stats": p.stats()}
    # 7. closing releases the process group each pipeline makes (a gloo group holds a socket to every other rank):
    # a job that builds a pipeline per epoch or per run keeps its open files flat
    open_files, kept = [], []
    for _ in range(6):
        with curate.pipeline(make_samples(40), rule="uniform", method="sample", filter_ratio=0.0, batch_size=10,
                             shuffle_buffer=0, prefetch=1) as p:
            keys = [b["__key__"] for b in p]
        kept.append(p)  # a closed pipeline still referenced (a list of runs, a framework's loader) holds no sockets
        open_files.append(len(os.listdir("/proc/self/fd")))
    out["close"] = {"open_files": open_files, "keys": keys, "kept": p.stats()["kept"],
                    "iter": _error(lambda: iter(p)), "global_stats": _error(p.global_stats)}


def _error(fn) -> str | None:
    try:
        fn()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def _decoded(sample: dict) -> dict:
    import numpy as np

    return {"__key__": sample["__key__"], "input": torch.from_numpy(np.load(io.BytesIO(sample["npy"]))).float(),
            "target": int(sample["cls"])}


def scenario_split_sources(out: dict, digits: str) -> None:
    """Sources split by node already (webdataset's split_by_node, HF's split_dataset_by_node): not split again."""
    import webdataset as wds
    from datasets import IterableDataset as HFIterable
    from datasets.distributed import split_dataset_by_node

    from pipelines.data import shard_urls

    urls = shard_urls(digits, "digits", "train")
    options = dict(rule="uniform", method="sample", filter_ratio=0.0, batch_size=10, shuffle_buffer=0)
    by_node = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_node, wds.tarfile_to_samples(),
                               wds.map(_decoded))
    p = curate.pipeline(by_node, **options)
    out["wds_keys"] = [k for b in p for k in b["__key__"]]
    out["wds_stats"] = p.stats()
    rows = [{"__key__": f"row{i:04d}", "input": [float(i)] * 8, "target": i % 3} for i in range(120)]
    hf = split_dataset_by_node(HFIterable.from_generator(lambda: iter(rows)), rank=dist.get_rank(), world_size=2)
    p = curate.pipeline(hf.with_format("torch"), **options)
    out["hf_keys"] = [k for b in p for k in b["__key__"]]
    plain = curate.pipeline(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(),
                                             wds.map(_decoded)), **options)
    out["plain_keys"] = [k for b in plain for k in b["__key__"]]
    out["plain_split"] = plain.stats()["rank_split"]


def scenario_bad(out: dict, digits: str, one_shard: str) -> None:
    from pipelines import train
    from pipelines.recipe import Recipe

    rank = dist.get_rank()
    base = {"name": "bad", "data": {"root": digits, "dataset": "digits"}, "model": {"kind": "mlp"},
            "selection": {"rule": "uniform", "shuffle_buffer": 8},
            "train": {"steps": 3, "eval_every": 3, "batch_size": 8, "out": f"{out['tmp']}/bad"}}

    def recipe(**train_options):
        return Recipe.model_validate({**base, "train": {**base["train"], **train_options}})

    out["indivisible"] = _error(lambda: train.run(recipe(batch_size=9), progress=False))
    out["mismatch"] = _error(lambda: train.run(recipe(lr=0.001 * (1 + rank)), progress=False))
    base["data"]["root"] = one_shard
    out["no_shards"] = _error(lambda: train.run(recipe(), progress=False))
    out["config"] = _error(lambda: curate.pipeline(make_samples(40), rule="uniform", method="sample", batch_size=5,
                                                   seed=rank))
    short = curate.pipeline(make_samples(25), rule="uniform", method="sample", batch_size=5, superbatch_size=13,
                            shuffle_buffer=0)
    out["empty_rank"] = _error(lambda: list(short))
    out["shards"] = _error(lambda: curate.distributed.Shards(["only.tar"], functools.partial(list)))
    dist.barrier()  # every rank got here: nothing hangs after the errors
    out["alive"] = True


def scenario_stall(out: dict, timeout: str) -> None:
    """Rank 1 stops itself (SIGSTOP) after two batches; rank 0 must fail within the pipeline's `timeout`, not the
    default group's 120 s. Each rank notes its pid first (the test kills the stopped one)."""
    import os
    import signal
    import time

    rank = dist.get_rank()
    Path(out["tmp"], f"pid-{rank}").write_text(str(os.getpid()))
    p = curate.pipeline(make_samples(100_000), rule="uniform", method="sample", batch_size=5, shuffle_buffer=0,
                        timeout=float(timeout))
    start = None
    try:
        for step, _ in enumerate(p):
            if step == 2:
                start = time.monotonic()
                if rank == 1:
                    os.kill(os.getpid(), signal.SIGSTOP)
    except Exception as error:
        Path(out["tmp"], f"error-{rank}").write_text(f"{time.monotonic() - start:.1f}\n{type(error).__name__}: {error}")
        raise


def main() -> None:
    scenario, target, *args = sys.argv[1:]
    dist.init_process_group("gloo", timeout=timedelta(seconds=120 if scenario == "stall" else 60))
    out: dict = {"tmp": target}
    {"library": scenario_library, "bad": scenario_bad, "stall": scenario_stall,
     "split_sources": scenario_split_sources}[scenario](out, *args)
    torch.save(out, Path(target) / f"{scenario}-{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
