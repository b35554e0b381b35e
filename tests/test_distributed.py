"""curate.distributed and the DDP path of pipelines.train, in real `torchrun --nproc_per_node=2` jobs (gloo, CPU).

Each torchrun job (tests/dist_worker.py, or the curate CLI) runs two real ranks; what they saw is compared with
brute force and with single-process runs here: disjoint data, equal step counts over unequal shards, global
selection equal to one process selecting over the concatenated superbatch, DDP training equal to one process
training on the global batch, exact resume, and bad input failing every rank with a clear error.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

import curate
from curate.distributed import RankSplit, Shards, local_sizes, resolve_world
from curate.stage import Stage, chain_stats, local_stats
from pipelines.recipe import RecipeError, parse_recipe

from .conftest import linear_models, make_samples
from .dist_worker import GLOBAL_CASES, TRAIN

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")


def _torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # --standalone: a local rendezvous on a free port, so parallel jobs never collide
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # a hang: end torchrun and both ranks, then fail
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"torchrun {' '.join(args)} hung for {timeout} s:\n{stdout[-2000:]}{stderr[-4000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _worker(scenario: str, out: Path, *args: str) -> list[dict]:
    proc = _torchrun(str(WORKER), scenario, str(out), *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [torch.load(out / f"{scenario}-{rank}.pt", weights_only=True) for rank in range(2)]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    from pipelines.data import make_digits

    root = tmp_path_factory.mktemp("data")
    made = {"even": (600, 100), "unequal": (500, 200), "one_shard": (100, 100)}  # n_train, shard size
    for name, (n_train, shard_size) in made.items():
        make_digits(root / name, n_train=n_train, n_curated=200, n_test=200, shard_size=shard_size)
    return {name: root / name for name in made}


@pytest.fixture(scope="module")
def library(digits, tmp_path_factory) -> list[dict]:
    return _worker("library", tmp_path_factory.mktemp("library"), str(digits["unequal"]))


# ---------------------------------------------------------------- in one process


def test_sources_that_split_by_node_themselves_are_recognised():
    import webdataset as wds
    from datasets import IterableDataset as HFIterable
    from datasets.distributed import split_dataset_by_node

    from curate.distributed import already_split

    urls = ["shards/a-{0..3}.tar"]
    split = [wds.WebDataset(urls, nodesplitter=wds.split_by_node, shardshuffle=False),
             wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_node, wds.tarfile_to_samples()),
             split_dataset_by_node(HFIterable.from_generator(lambda: iter([{"x": 1}])), rank=0, world_size=2)]
    whole = [wds.WebDataset(urls, nodesplitter=None, shardshuffle=False),
             wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples()),
             HFIterable.from_generator(lambda: iter([{"x": 1}])), make_samples(10)]
    assert [already_split(s) for s in split] == [True] * 3
    assert [already_split(DataLoader(s, batch_size=None)) for s in split] == [True] * 3
    assert [already_split(s) for s in whole] == [False] * 4


def test_rank_and_world_come_from_arguments_then_the_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_world() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_world() == (2, 3)
    assert resolve_world(1, 4) == (1, 4)
    with pytest.raises(ValueError, match="give both rank= and world_size="):
        resolve_world(rank=1)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        resolve_world(3, 3)


def test_local_sizes_need_sizes_the_ranks_divide():
    assert local_sizes(64, 320, 4) == (16, 80)
    with pytest.raises(ValueError, match="superbatch_size=45 does not divide by world_size=2"):
        local_sizes(8, 45, 2)


def _numbered(urls: list[str], per_shard: int = 5) -> list[dict]:
    return [{"__key__": f"{url}/{i}"} for url in urls for i in range(per_shard)]


def test_shards_split_by_rank_and_by_dataloader_worker():
    urls = [f"shard{i}" for i in range(7)]
    seen = []
    for rank in range(3):
        shards = Shards(urls, functools.partial(_numbered), rank=rank, world_size=3)
        assert shards.urls == urls[rank::3]
        keys = [s["__key__"] for s in DataLoader(shards, batch_size=None, num_workers=2)]
        assert sorted(keys) == sorted(s["__key__"] for s in _numbered(urls[rank::3]))  # no worker reads twice
        seen += keys
    assert sorted(seen) == sorted(s["__key__"] for s in _numbered(urls))
    with pytest.raises(ValueError, match=r"2 shards for 3 ranks leaves rank\(s\) \[2\] with no data"):
        Shards(urls[:2], _numbered, rank=0, world_size=3)


READS: list[str] = []  # the shards `_counted` opened, in this process


def _counted(urls: list[str], per_shard: int = 9) -> list[dict]:
    READS.extend(urls)
    return [{"__key__": f"{url}/{i}", "input": torch.randn(4, generator=torch.Generator().manual_seed(len(url) + i))}
            for url in urls for i in range(per_shard)]


def test_shards_resume_from_their_shard_and_offset_exactly():
    """Shards as the source: the state is (shard, offset); a resumed epoch opens that shard only (no replay)."""
    urls = [f"shard{i}" for i in range(8)]

    def build():
        source = curate.Source(Shards(urls, _counted, rank=0, world_size=1), group_size=4)
        return curate.pipeline(source, rule="uniform", method="sample", filter_ratio=0.0, batch_size=6,
                               shuffle_buffer=12, seed=3)

    from .conftest import check_resume

    check_resume(build, points=[1, 5, 8])
    first = build()
    it = iter(first)
    for _ in range(9):  # 54 of 72 samples: half-way through the 5th shuffle block (samples 48-59)
        next(it)
    state = first.state_dict()
    READS.clear()
    resumed = build()
    resumed.load_state_dict(state)
    next(iter(resumed))
    # the block re-read from its first sample, 48 = shard 5's 4th (9 per shard), through 59 in shard 6
    assert READS == ["shard5", "shard6"], "a resumed epoch re-reads one shuffle block, opening its shards only"
    with pytest.raises(ValueError, match="this one reads 4"):
        Shards(urls[:4], _counted, rank=0, world_size=1).load_state_dict({"shard": 1, "offset": 0, "urls": 8})


def test_shards_under_a_stateful_dataloader_resume_per_worker():
    """Each worker saves its own (shard, offset); a mid-epoch state resumes exactly. (A StatefulDataLoader's state
    at its epoch's very end starts a fresh epoch on load, not the rest of this one: issue 13.)"""
    from torchdata.stateful_dataloader import StatefulDataLoader

    urls = [f"shard{i}" for i in range(6)]

    def build():
        loader = StatefulDataLoader(Shards(urls, _counted, rank=0, world_size=1), batch_size=4, num_workers=2)
        return curate.pipeline(loader, rule="uniform", method="sample", filter_ratio=0.0, batch_size=4,
                               shuffle_buffer=0)

    full = [b["__key__"] for b in build()]
    assert sorted(k for b in full for k in b) == sorted(f"{u}/{i}" for u in urls for i in range(9))
    for p in (1, 4, 7):
        first = build()
        it = iter(first)
        head = [next(it)["__key__"] for _ in range(p)]
        READS.clear()
        resumed = build()
        resumed.load_state_dict(first.state_dict())
        assert head + [b["__key__"] for b in resumed] == full, p
        assert len(READS) <= 4, "each worker opens only the shards it has left"


def test_without_a_process_group_data_is_split_by_sample_but_global_selection_refuses():
    data = make_samples(21)
    with pytest.warns(UserWarning, match="not kept in step"):
        p = curate.pipeline(data, rule="uniform", method="sample", filter_ratio=0.0, batch_size=4, shuffle_buffer=0,
                            rank=1, world_size=2)
    batches = [b["__key__"] for b in p]  # everything kept, in sampled order within each batch
    assert [sorted(b) for b in batches] == [sorted(s["__key__"] for s in data[1::2][i:i + 4]) for i in (0, 4, 8)]
    assert isinstance(p.stages["rank_split"], RankSplit)
    with pytest.raises(ValueError, match="init_process_group"):
        curate.pipeline(data, rule="uniform", method="sample", batch_size=4, rank=0, world_size=2,
                        selection_scope="global")
    with pytest.raises(ValueError, match="selection_scope must be one of"):
        curate.pipeline(data, rule="uniform", method="sample", batch_size=4, selection_scope="everywhere")


def test_recipes_take_a_distributed_section():
    recipe = parse_recipe("name: x\ndistributed: {selection_scope: global, backend: gloo}\n")
    assert recipe.distributed.selection_scope == "global"
    assert parse_recipe("name: x\n").distributed.selection_scope == "local"
    with pytest.raises(RecipeError, match="distributed.scope: unknown key"):
        parse_recipe("name: x\ndistributed:\n  scope: global\n")


def test_merged_stats_add_counts_and_recompute_ratios():
    """Two ranks' stats merged as their stages declare: counts and FLOPs added, means weighted by the counts,
    ratios recomputed from the totals, seconds the slowest rank's (two real chains stand for the ranks)."""
    ranks = []
    for n in (40, 20):
        learner, reference = linear_models()
        p = curate.pipeline(make_samples(n), learner=learner, reference=reference, scorer=curate.ClassificationScorer(),
                            method="topk", batch_size=5, superbatch_size=20, shuffle_buffer=0)
        list(p)
        ranks.append(p)
    parts = [local_stats(p.chain) for p in ranks]
    stages = [s for s in ranks[1].chain if isinstance(s, Stage)]
    parts[1][next(i for i, s in enumerate(stages) if isinstance(s, curate.Score))]["score_seconds"] = 1e3  # slow
    merged = chain_stats(ranks[0].chain, parts)
    one, two = (p.stats() for p in ranks)
    assert (merged["seen"], merged["kept"], merged["score_seconds"]) == (60, 15, 1e3)
    assert merged["score_mean"] == pytest.approx((one["score_mean"] * 40 + two["score_mean"] * 20) / 60)
    assert merged["kept_score_mean"] == pytest.approx((one["kept_score_mean"] * 10 + two["kept_score_mean"] * 5) / 15)
    assert merged["scoring_flops"] == one["scoring_flops"] + two["scoring_flops"]
    assert merged["training_flops"] == one["training_flops"] + two["training_flops"]
    assert merged["flops_overhead"] == pytest.approx(merged["scoring_flops"] / merged["training_flops"])
    assert merged["score_quantiles"] == one["score_quantiles"] and "rank" not in merged  # snapshots: rank 0's


# ---------------------------------------------------------------- torchrun: data split and step counts


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sources_split_by_node_already_are_not_split_again_under_torchrun(digits, tmp_path):
    """webdataset's split_by_node and HF's split_dataset_by_node give each rank its part; curate keeps all of it
    (it used to split it again: rank 0 of 2 got 150 of its 300). A plain stream is still split, and says so."""
    from pipelines.data import shard_urls

    ranks = _worker("split_sources", tmp_path, str(digits["even"]))
    urls = shard_urls(digits["even"], "digits", "train")  # 6 shards of 100
    keys = {url: sorted({name.split(".")[0] for name in tarfile.open(url).getnames()}) for url in urls}
    for rank, out in enumerate(ranks):
        assert sorted(out["wds_keys"]) == sorted(k for url in urls[rank::2] for k in keys[url])  # all 300 of them
        assert out["wds_stats"]["rank_split"] == "source"
        # HF splits a one-shard iterable by example: rank r keeps rows r, r + 2, ...
        assert sorted(out["hf_keys"]) == [f"row{i:04d}" for i in range(120) if i % 2 == rank]
        assert out["plain_split"] == "pipeline: every world_size-th sample" and len(out["plain_keys"]) == 300


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_samples_are_split_disjointly_and_ranks_take_equal_steps(library):
    keys = [s["__key__"] for s in make_samples(203)]  # 102 for rank 0, 101 for rank 1; superbatch 10
    for epoch in range(2):
        assert [len(out["split_samples"][epoch]) for out in library] == [10, 10]
        assert [out["split_samples_len"] for out in library] == [10, 10]  # len(pipeline), under lockstep
        for rank, out in enumerate(library):
            mine = keys[rank::2]  # rank r: samples r, r + 2, ... (each batch keeps all 10, in sampled order)
            assert [sorted(b) for b in out["split_samples"][epoch]] == [mine[i:i + 10] for i in range(0, 100, 10)]
    assert [out["split_samples_stats"]["dropped_unequal"] for out in library] == [2 * 2, 1 * 2]  # counted, per epoch


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_unequal_shards_are_split_by_rank_and_worker_and_ranks_stop_together(library, digits):
    from pipelines.data import load_digits, shard_urls

    urls = shard_urls(digits["unequal"], "digits", "train")  # 200, 200 and 100 samples
    shard_keys = [{s["__key__"] for s in load_digits([url])} for url in urls]
    assert [out["split_shards_urls"] for out in library] == [[urls[0], urls[2]], [urls[1]]]
    ranks = [[k for batch in out["split_shards"] for k in batch] for out in library]
    assert len(ranks[0]) == len(ranks[1]) == 200  # 5 steps each: rank 1 has 200 samples, rank 0 stops with it
    assert set(ranks[0]) <= shard_keys[0] | shard_keys[2] and set(ranks[1]) == shard_keys[1]
    assert len(set(ranks[0])) == 200  # each DataLoader worker read its own shard...
    first = set(library[0]["split_shards"][0])
    assert first & shard_keys[0] and first & shard_keys[2]  # ...and they are read side by side
    total = library[0]["split_shards_stats"]
    assert (total["seen"], total["dropped_unequal"], total["world_size"]) == (400, 40, 2)


# ---------------------------------------------------------------- torchrun: global selection


def _merge(parts: list[dict]) -> dict:
    return {k: torch.cat([p[k] for p in parts]) if isinstance(v, torch.Tensor) else [x for p in parts for x in p[k]]
            for k, v in parts[0].items()}


def _global_order(b: int, share: float, world_size: int = 2) -> list[int]:
    """Where each rank's picks sit in one process's batch of world_size·b: with a uniform share, one process puts
    all world_size·k uniform picks first (k = round(share·b)), a rank its own k and then its slice of the rest."""
    k, rest = round(share * b), world_size * round(share * b)
    return [i for r in range(world_size) for i in [*range(r * k, (r + 1) * k),
                                                   *range(rest + r * (b - k), rest + (r + 1) * (b - k))]]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(GLOBAL_CASES))
def test_global_selection_equals_one_process_selecting_over_the_concatenated_superbatch(library, case):
    spec = GLOBAL_CASES[case]
    runs = [out[f"global_{case}"] for out in library]
    steps = len(runs[0]["batches"])
    assert steps >= 3 and len(runs[1]["batches"]) == steps
    by_key = {s["__key__"]: s for s in spec["data"]()}
    stream = [by_key[k] for step in range(steps) for run in runs for k in run["superbatches"][step]]
    options = dict(spec["options"])
    b, big_b = options.pop("batch_size"), options.pop("superbatch_size")
    learner, reference = spec["models"]()
    single = list(curate.pipeline(stream, learner=learner, reference=reference, scorer=spec["scorer"](), seed=3,
                                  batch_size=2 * b, superbatch_size=2 * big_b, micro_batch_size=big_b,
                                  **{**options, "shuffle_buffer": 0}))
    assert len(single) == steps
    order = _global_order(b, options.get("uniform_share", 0.0))  # the identity without a share
    single = [{k: v[order] if isinstance(v, torch.Tensor) else [v[i] for i in order] for k, v in batch.items()}
              for batch in single]
    exchanged = 0
    for step in range(steps):
        parts = [run["batches"][step] for run in runs]
        assert [len(p["__key__"]) for p in parts] == [b, b]
        merged = _merge(parts)
        assert merged.keys() == single[step].keys()
        for name, value in merged.items():
            assert torch.equal(value, single[step][name]) if isinstance(value, torch.Tensor) else value == \
                single[step][name], f"step {step}: field {name} differs"
        exchanged += len(set(parts[0]["__key__"]) & set(runs[1]["superbatches"][step]))
    assert exchanged > 0  # rank 0 trained on samples rank 1 had read: the rows were exchanged


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_training_on_global_selection_with_prefetch_equals_one_process(library):
    runs = [out["train"] for out in library]
    assert torch.equal(runs[0]["weights"]["weight"], runs[1]["weights"]["weight"])  # DDP kept the ranks equal
    steps, b, big_b = TRAIN["steps"], TRAIN["batch_size"], TRAIN["superbatch_size"]
    by_key = {s["__key__"]: s for s in make_samples(400, seed=1)}
    # each rank also scored the superbatch it prefetched after the last step: one more than the steps
    assert [len(run["superbatches"]) for run in runs] == [steps + 1] * 2
    stream = [by_key[k] for step in range(steps + 1) for run in runs for k in run["superbatches"][step]]
    learner, _ = linear_models(seed=1)
    optimizer = torch.optim.SGD(learner.parameters(), lr=TRAIN["lr"])
    p = curate.pipeline(stream, learner=learner, scorer=curate.ClassificationScorer(), rule="hard_learner",
                        method="sample", batch_size=2 * b, superbatch_size=2 * big_b, micro_batch_size=big_b,
                        shuffle_buffer=0, prefetch=1)
    for step, batch in zip(range(steps), p, strict=False):
        assert batch["__key__"] == runs[0]["keys"][step] + runs[1]["keys"][step], f"step {step}"
        optimizer.zero_grad()
        F.cross_entropy(learner(batch["input"]), batch["target"]).backward()
        optimizer.step()
    for name, value in learner.state_dict().items():
        torch.testing.assert_close(runs[0]["weights"][name], value, rtol=1e-5, atol=1e-6)
    p.stages["prefetch"].wait()
    single, total = p.stats(), runs[0]["global_stats"]
    assert total == runs[1]["global_stats"]
    for key in ("seen", "kept", "scoring_flops", "training_flops", "flops_overhead"):
        assert total[key] == pytest.approx(single[key]), key  # rank 0 reports the job's FLOP ledger
    assert total["seen"] == sum(run["stats"]["seen"] for run in runs)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_global_pipeline_resumes_mid_epoch_exactly(library):
    for out in library:
        assert len(out["resume"]["full"]) == 6
        assert out["resume"]["resumed"] == out["resume"]["full"]


@pytest.mark.slow
def test_a_global_warmup_over_unevenly_split_sources_is_counted_alike_on_every_rank(library):
    # in step, both ranks yield the shorter rank's 2 superbatches; set_epoch(1) counts one epoch of 2 as warmed
    # up, so each rank draws its 3rd warmup batch and then selects (with counts apart, ranks stalled in a collective)
    for out in library:
        warmup = out["warmup"]
        assert warmup["len"] == 2 and len(warmup["batches"]) == 2 and warmup["stats"]["warmup_batches"] == 1
        assert all(len(keys) == 10 for keys in warmup["batches"])
    kept = [k for out in library for keys in out["warmup"]["batches"] for k in keys]
    assert len(set(kept)) == 40 and {k[:2] for k in kept} == {"r0", "r1"}  # one global selection, no repeats


def test_closing_a_pipeline_releases_its_process_group(library):
    for out in library:
        close = out["close"]
        assert close["open_files"][1:] == close["open_files"][:-1]  # without the release: 5 more files per pipeline
        assert len(close["keys"]) == 2 and close["kept"] == 20  # each rank's 20 samples, read before the release
        assert "was closed" in close["global_stats"] and "after close()" in close["iter"]


# ---------------------------------------------------------------- torchrun: bad input


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_input_fails_every_rank_before_training_and_nothing_hangs(digits, tmp_path):
    outs = _worker("bad", tmp_path, str(digits["even"]), str(digits["one_shard"]))
    expected = {
        "indivisible": "batch_size=9 does not divide by world_size=2",
        "mismatch": "rank(s) [1] have a different recipe than rank 0 (train.lr: rank 0=0.001, rank 1=0.002)",
        "no_shards": "1 shards for 2 ranks leaves rank(s) [1] with no data",
        "config": "rank(s) [1] have a different pipeline configuration than rank 0 (seed: rank 0=0, rank 1=1)",
        "empty_rank": "rank(s) [1] have fewer than 13 samples",
        "shards": "1 shards for 2 ranks leaves rank(s) [1] with no data",
    }
    for out in outs:
        assert out["alive"]
        for case, text in expected.items():
            assert out[case] is not None and text in out[case], (case, out[case])
    assert not (tmp_path / "bad" / "uniform" / "checkpoint.pt").exists()  # no run trained a step


# ---------------------------------------------------------------- torchrun: the CLI, restart


def _recipe(tmp_path: Path, digits: Path) -> Path:
    from pipelines.train_reference import train_reference

    text = f"""name: dist
data: {{root: {digits}, dataset: digits}}
model: {{kind: mlp}}
reference: {{path: {tmp_path / "reference"}, steps: 5, batch_size: 32}}
selection: {{rule: learnability, method: sample, filter_ratio: 0.8, shuffle_buffer: 32}}
train: {{steps: 30, eval_every: 5, batch_size: 8}}
compare: [uniform]
distributed: {{selection_scope: global, backend: gloo, timeout_s: 60}}
"""
    path = tmp_path / "dist.yaml"
    path.write_text(text)
    train_reference(parse_recipe(text), log=lambda *a: None)
    return path


def _metrics(out: Path, run: str) -> list[dict]:
    records = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("seconds")
        record["pipeline"].pop("score_seconds")
    return records


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_curate_run_under_torchrun_resumes_exactly_after_a_restart(digits, tmp_path):
    recipe = _recipe(tmp_path, digits["even"])

    def run(out: str, *extra: str) -> str:
        proc = _torchrun("-m", "pipelines.cli", "run", str(recipe), "--set", f"train.out={tmp_path / out}", *extra)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return proc.stdout

    printed = run("whole")  # 30 steps: 2 epochs of 15 superbatches of 20 per rank
    assert printed.count("final accuracy") == 1  # rank 0 alone reports
    run("restarted", "--set", "train.steps=15")  # stops at step 15, checkpointed...
    run("restarted", "--resume")  # ...and a new job continues from there
    for name in ("learnability", "uniform"):
        whole = _metrics(tmp_path / "whole", name)
        assert [r["step"] for r in whole] == [5, 10, 15, 20, 25, 30]
        assert _metrics(tmp_path / "restarted", name) == whole
        superbatch = 40 if name == "learnability" else 8  # global: filter_ratio 0.8, or everything kept
        assert whole[-1]["pipeline"]["world_size"] == 2 and whole[-1]["pipeline"]["seen"] == 30 * superbatch
    state = torch.load(tmp_path / "restarted" / "learnability" / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["pipelines"]) == 2


def test_a_rank_of_curate_run_loads_only_its_shards_cache_parts(digits, tmp_path):
    from curate.distributed import Comm
    from pipelines import tasks
    from pipelines.train import _reference

    recipe = parse_recipe(f"""name: parts
data: {{root: {digits["even"]}, dataset: digits}}
model: {{kind: mlp}}
cache: {{path: {tmp_path / "cache"}}}
""")
    n_shards = len(tasks.shard_urls(recipe, "train"))
    assert n_shards == 6
    dataset = tasks.dataset_identity(recipe)  # what curate run checks a part against
    for i in range(n_shards):
        curate.write_part(str(tmp_path / "cache" / f"part-{i:05d}.parquet"), [f"k{i}"], ref_loss=[float(i)],
                          metadata={"reference_hash": "h", "scorer": "example", "dataset": dataset})
    mine = _reference(recipe, torch.device("cpu"), Comm(1, 4))  # shards 1 and 5
    assert len(mine) == 2
    assert mine.scores({"__key__": ["k5", "k1"]}, curate.ClassificationScorer(), 16).loss.tolist() == [5.0, 1.0]
    with pytest.raises(curate.MissingKeysError):
        mine.scores({"__key__": ["k2"]}, curate.ClassificationScorer(), 16)
    assert len(_reference(recipe, torch.device("cpu"), Comm(0, 1))) == n_shards
