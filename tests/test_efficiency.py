"""benchmarks/efficiency.py's figures: step savings both ways, FLOP ratios with the reference amortised, CIs."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def efficiency():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports its sibling results_io
    try:
        spec = importlib.util.spec_from_file_location("efficiency", ROOT / "benchmarks" / "efficiency.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _run(method, rule, accuracies, gflops, budget, every=25, schedule="constant"):
    history = [{"step": every * (i + 1), "accuracy": a, "flops": f * 1e9, "seconds": 1.0} for i, (a, f) in
               enumerate(zip(accuracies, gflops, strict=True))]
    return {"task": "web", "method": method, "seed": 0, "options": {"rule": rule, "filter_ratio": 0.8},
            "budget": budget, "schedule": schedule, "history": history, "flops_overhead": 0.0, "reference": "web"}


def test_per_run_measures_both_ways_and_charges_the_reference_only_to_runs_that_read_it(efficiency):
    # uniform trains twice the curated budget: 100 steps against 50
    uniform = _run("uniform", "uniform", [0.10, 0.20, 0.30, 0.40], [1, 2, 3, 4], budget=50)
    jest = _run("jest", "learnability", [0.30, 0.40], [2, 4], budget=50)
    hard = _run("hard", "hard_learner", [0.30, 0.40], [2, 4], budget=50)
    # the cache's pool (0.5 GFLOPs) is not what a run is charged: the forwards over what it read, 320 a step at 1e4
    reference = {"training_flops": 1.5e9, "precompute_flops": 0.5e9, "forward_flops_per_sample": 1e4}
    row = efficiency.per_run(jest, [uniform], [0.3], reference)
    assert row["uniform_best"] == 0.40 and row["steps_to_uniform_best"] == 50
    assert row["step_speedup_uniform_best"] == 100 / 50 and row["flops_ratio_uniform_best"] == 4 / 4
    # the other way: uniform needs 100 steps for jest's final 0.40, jest took 50
    assert row["uniform_steps_to_final"] == 100 and row["step_speedup_to_final"] == 2.0
    # and in compute: jest's whole ledger (4 GFLOPs) against uniform's to 0.40 (4), then with the reference's
    # training and the precompute of what jest read over its 50 steps
    assert row["flops_ratio_to_final"] == 4 / 4
    assert row["accuracy_at_budget"] == 0.40 and row["steps_to_0.3"] == 25 and row["step_speedup_0.3"] == 75 / 25
    read = 50 * 320 * 1e4 / 1e9  # GFLOPs: the precompute of the 16000 samples read by step 50
    assert row["flops_ratio_uniform_best_amortised_1"] == pytest.approx((4 + 1.5 + read) / 4)
    assert row["flops_ratio_uniform_best_amortised_10"] == pytest.approx((4 + (1.5 + read) / 10) / 4)
    assert row["flops_ratio_0.3_amortised_1"] == pytest.approx((2 + 1.5 + read / 2) / 3)  # step 25: half as much read
    assert row["flops_ratio_to_final_amortised_1"] == pytest.approx((4 + 1.5 + read) / 4)
    assert row["flops_ratio_to_final_amortised_10"] == pytest.approx((4 + (1.5 + read) / 10) / 4)
    online = efficiency.per_run(jest, [uniform], [], {**reference, "precompute_flops": 0.0})  # its ledger has them
    assert online["flops_ratio_uniform_best_amortised_1"] == pytest.approx((4 + 1.5) / 4)
    assert efficiency.per_run(hard, [uniform], [], reference)["flops_ratio_uniform_best_amortised_1"] == 1.0
    own = efficiency.per_run(uniform, [uniform], [], reference)  # uniform at the curated budget: its step 50
    assert own["accuracy_at_budget"] == 0.20 and own["final_accuracy"] == 0.40
    assert own["flops_ratio_uniform_best_amortised_1"] == 1.0
    never = efficiency.per_run(_run("x", "learnability", [0.2, 0.25], [2, 4], 50), [uniform], [], reference)
    assert never["steps_to_uniform_best"] is None and never["step_speedup_uniform_best"] is None
    assert never["uniform_steps_to_final"] == 75  # uniform's first evaluation at or above 0.25
    assert never["flops_ratio_to_final"] == 4 / 3  # its 4 GFLOPs against uniform's 3 at step 75


def test_with_a_decaying_lr_uniforms_steps_come_from_its_budgets_not_from_inside_a_longer_run(efficiency):
    """A cosine run is at its best only at its end: uniform's steps to an accuracy are the budget (each its own
    run) whose final reaches it, interpolated between budgets, never a long run's un-decayed middle."""
    # budgets 50 / 100 / 200 steps (1 GFLOP a step), finals 0.20 / 0.40 / 0.50; the long run passes 0.40 only late
    runs = [_run("uniform_x1", "uniform", [0.1, 0.2], [25, 50], 50, schedule="cosine"),
            _run("uniform_x2", "uniform", [0.1, 0.15, 0.25, 0.4], [25, 50, 75, 100], 50, schedule="cosine"),
            _run("uniform", "uniform", [0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.39, 0.5], [25 * i for i in range(1, 9)],
                 50, schedule="cosine")]
    assert efficiency.uniform_reached(runs, 0.40) == {"step": 100, "flops": 100e9}  # the 100-step run, not step 175
    assert efficiency.uniform_reached(runs, 0.30)["step"] == pytest.approx(75)  # halfway from 50 to 100 steps
    assert efficiency.uniform_reached(runs, 0.45)["step"] == pytest.approx(150)
    assert efficiency.uniform_reached(runs, 0.15)["step"] == 50  # below the smallest final: inside that run
    assert efficiency.uniform_reached(runs, 0.51) is None
    constant = [{**r, "schedule": "constant"} for r in runs]  # a longer run continues a shorter one: its own curve
    assert efficiency.uniform_reached(constant, 0.40)["step"] == 200
    jest = _run("jest", "learnability", [0.3, 0.45], [2, 4], budget=50, schedule="cosine")
    row = efficiency.per_run(jest, runs, [], {"training_flops": 0.0, "precompute_flops": 0.0,
                                              "forward_flops_per_sample": 0.0})
    assert row["uniform_best"] == 0.5 and row["uniform_steps_to_final"] == pytest.approx(150)
    assert row["step_speedup_to_final"] == pytest.approx(3.0)


def test_mean_std_gives_students_t_interval_over_the_seeds_that_have_a_value(efficiency):
    cell = efficiency.mean_std([1.0, 2.0, 3.0, None])
    assert cell["mean"] == 2.0 and cell["std"] == 1.0 and (cell["n"], cell["of"]) == (3, 4)
    assert cell["ci95"] == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-6)  # t(0.975, 2 dof)
    assert efficiency.mean_std([0.5])["ci95"] is None and efficiency.mean_std([None])["mean"] is None
    assert efficiency.fmt(cell, 2) == "2.00±2.48 (3/4)"


def test_a_world_of_other_sizes_is_refused_by_name_not_reused(efficiency, tmp_path):
    """The grid reuses a world on disk only if its splits are the sizes it makes: an older default's world (200k,
    7200 curated) would otherwise be read silently under new defaults."""
    from pipelines.web import make_web

    make_web(tmp_path, n_train=1200, n_curated=600, n_test=600, shard_size=600)
    efficiency.check_world(tmp_path, "web", {"n_train": 1200, "n_curated": 600, "n_test": 600})  # the same: used
    with pytest.raises(SystemExit, match=r"has curated \[600\], the grid makes 24000; move it aside"):
        efficiency.check_world(tmp_path, "web", {"n_train": 1200})  # make_web's default curated split is 24000
    with pytest.raises(SystemExit, match="has a shared tail, the web_distinct grid reads a distinct one"):
        efficiency.check_world(tmp_path, "web_distinct", {"n_train": 1200, "n_curated": 600, "n_test": 600})


def test_the_grids_collated_train_split_trains_the_same_run_as_its_samples_one_by_one(efficiency, tmp_path,
                                                                                        monkeypatch):
    """The grid keeps the train split as collated chunks (a forked worker copies a per-sample dict's pages, not a
    big tensor's); the pipeline must read the same rows from them, across chunk boundaries, as from the samples."""
    from pipelines import tasks
    from pipelines.web import make_web

    make_web(tmp_path / "web", n_train=3000, n_curated=600, n_test=600, shard_size=1000)
    sets = ["web.train.steps=6", "web.train.eval_every=3", "web.train.warmup=0"]
    monkeypatch.setattr(efficiency, "TRAIN_CHUNK", 700)  # neither the superbatch (320) nor the shuffle block divides it
    chunked, test = efficiency.load_task("web", tmp_path / "work", tmp_path / "web", sets)
    recipe = efficiency.recipe_for("web", 0, tmp_path / "work", tmp_path / "web", sets)
    samples = [{k: v for k, v in s.items() if k not in ("caption", "noise")} for s in tasks.load_split(recipe, "train")]
    assert [len(b["__key__"]) for b in chunked] == [700] * 4 + [200]
    runs = [efficiency.run("web", "hard_learner", 1, tmp_path / "work", tmp_path / "web", sets, source, test)
            for source in (samples, chunked)]  # learner scores and the joint sampler over shuffled superbatches
    histories = [[{k: v for k, v in r.items() if k != "seconds"} for r in run["history"]] for run in runs]
    assert len(histories[0]) == 2 and histories[0] == histories[1]


def test_the_reference_folder_is_named_by_the_reference_alone(efficiency, tmp_path):
    def folder(*overrides):
        return efficiency.recipe_for("web", 0, tmp_path, tmp_path / "data", list(overrides)).reference_path

    named = ["web.reference.model.kind=tiny_clip", "web.reference.model.loss=sigmoid"]
    assert folder(*named) == folder(*named, "web.model.options.heads=4")  # only the learner changed: reused
    assert folder(*named) != folder(*named, "web.reference.lr=1e-3")
    assert folder(*named) != folder(*named, "web.reference.model.options.heads=4")
    assert folder(*named) != folder(*named, "web.train.weight_decay=0.1")  # the reference trains with it too
    assert folder() != folder("web.model.options.heads=4")  # unset, the reference's model is the learner's
    assert folder() == folder(*named)  # the same reference, named or resolved from the learner's


def test_an_aligned_arm_trains_only_on_the_pairs_the_reference_finds_best_aligned(efficiency, tmp_path, monkeypatch):
    """`*_a70`: the key list is `curate.alignment_filter`'s over the cached reference's embeddings, and the run
    reads it through `curation.train_on_curated` (the pipeline's KeepKeys): every trained pair is on it."""
    from curate.cache import ScoreCache
    from curate.curation import alignment_filter, read_keys
    from pipelines import train
    from pipelines.web import make_web

    make_web(tmp_path / "web", n_train=3000, n_curated=600, n_test=600, shard_size=1000)
    sets = ["web.train.steps=6", "web.train.eval_every=3", "web.train.warmup=0", "web.reference.steps=20",
            "web.reference.warmup=0"]
    efficiency.prepare("web", 0, tmp_path / "work", tmp_path / "web", sets)
    path = efficiency.aligned_keys("web", 0.7, tmp_path / "work", tmp_path / "web", sets)
    recipe = efficiency.recipe_for("web", 0, tmp_path / "work", tmp_path / "web", sets, aligned_share=0.7)
    assert recipe.curation.train_on_curated and recipe.out != efficiency.recipe_for(
        "web", 0, tmp_path / "work", tmp_path / "web", sets).out  # its own run folder: no other arm reads the list
    cache = ScoreCache.open(recipe.cache.path)
    expected = alignment_filter(cache.keys.to_list(), cache.image_emb, cache.text_emb, share=0.7).kept_keys
    assert read_keys(path) == sorted(expected) and len(expected) == 2100
    trained: list[str] = []
    count = train._count
    monkeypatch.setattr(train, "_count", lambda tally, batch: (trained.extend(batch["__key__"]), count(tally, batch)))
    samples, test = efficiency.load_task("web", tmp_path / "work", tmp_path / "web", sets)
    efficiency.run("web", "easy_reference_a70", 0, tmp_path / "work", tmp_path / "web", sets, samples, test)
    assert len(trained) == 6 * 64 and set(trained) <= set(expected)


@pytest.mark.slow
def test_quick_grid_runs_end_to_end_from_a_fresh_world(tmp_path):
    """`efficiency.py --quick` (the issue's smoke run) on the web task: the world, the reference and its cache made
    fresh, then uniform, JEST and the filter for QUICK's steps; every run recorded, the curated runs' scoring in
    their ledger, the summary and the plot written where --out says (never over the committed results)."""
    import json
    import math
    import subprocess

    out = tmp_path / "quick.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "efficiency.py"), "--quick", "--tasks", "web",
                    "--jobs", "2", "--data", str(tmp_path / "data"), "--work", str(tmp_path / "work"),
                    "--out", str(out)], check=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    runs = {r["method"]: r for r in report["runs"]}
    assert sorted(runs) == ["easy_reference", "jest", "uniform"] and report["quick"]
    for name, run in runs.items():  # uniform trains 4x the curated budget (the web task's uniform_steps_factor)
        last = run["history"][-1]
        assert run["budget"] == 100 and last["step"] == (400 if name == "uniform" else 100)
        assert math.isfinite(last["accuracy"]) and 0 <= last["accuracy"] <= 1
    uniform, jest = runs["uniform"]["history"][-1], runs["jest"]["history"][-1]
    # JEST scores a 320-pair superbatch a step with the learner: its ledger holds more than its training
    assert jest["flops"] > jest["training_flops"] and uniform["flops"] == uniform["training_flops"]
    assert sorted(report["summary"]["web"]) == ["easy_reference", "jest", "uniform"]
    assert [Path(p).name for p in report["plots"]] == ["quick_web.png"] and Path(report["plots"][0]).is_file()
