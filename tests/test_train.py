"""pipelines.train.run_one: the training loop `curate run` and the efficiency benchmark share."""

import pytest

from pipelines import tasks
from pipelines.data import make_digits
from pipelines.recipe import parse_recipe
from pipelines.train import plan_runs, run_one
from pipelines.train_reference import train_reference


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_digits(root / "data", n_train=600, n_curated=200, n_test=100, shard_size=200)
    text = f"""name: t
data: {{root: {root / "data"}, dataset: digits}}
model: {{kind: mlp}}
reference: {{steps: 20, batch_size: 32}}
selection: {{rule: learnability, method: topk, filter_ratio: 0.75, shuffle_buffer: 64}}
train: {{steps: 12, eval_every: 4, batch_size: 8, out: {root / "runs"}}}
"""
    recipe = parse_recipe(text)
    train_reference(recipe, log=lambda *a: None)
    return recipe


def _without_timing(history: list[dict]) -> list[dict]:
    return [{**r, "seconds": None, "pipeline": {k: v for k, v in r["pipeline"].items() if k != "score_seconds"}}
            for r in history]


def test_in_memory_samples_without_checkpoints_train_as_the_shards_do(recipe):
    options = plan_runs(recipe)["learnability"]
    from_shards = run_one(recipe, "shards", options, progress=False)
    samples = [{k: v for k, v in s.items() if k not in ("caption", "noise")} for s in tasks.load_split(recipe, "train")]
    in_memory = run_one(recipe, "memory", options, progress=False, source=samples, checkpoint=False)
    assert [r["step"] for r in in_memory] == [4, 8, 12]
    assert _without_timing(in_memory) == [{**r, "run": "memory"} for r in _without_timing(from_shards)]
    assert (recipe.out / "shards" / "checkpoint.pt").is_file()
    assert not (recipe.out / "memory" / "checkpoint.pt").exists()
    assert (recipe.out / "memory" / "metrics.jsonl").is_file()
    # and it trains on what it is given, not on the recipe's shards (30% of whose labels are flipped)
    uniform = {"rule": "uniform", "method": "sample", "filter_ratio": 0.0}
    clean = [s for s in samples if not s["is_noisy"]]
    assert all(r["noisy_kept"] > 0 for r in run_one(recipe, "noisy", uniform, progress=False, checkpoint=False))
    assert all(r["noisy_kept"] == 0 for r in run_one(recipe, "clean", uniform, progress=False, source=clean,
                                                     checkpoint=False))


def test_every_boolean_diagnostic_and_the_label_coverage_of_the_trained_batches_are_reported(recipe):
    samples = [{k: v for k, v in s.items() if k not in ("caption", "noise")}
               for s in tasks.load_split(recipe, "train")][:96]  # 12 steps of 8: one epoch, every sample once
    for i, s in enumerate(samples):  # flags whose totals are known, one label (coverage 1/8 in every batch)
        s.update(is_tail=i % 3 == 0, is_duplicate=i < 12, label=3)
    uniform = {"rule": "uniform", "method": "sample", "filter_ratio": 0.0}
    history = run_one(recipe, "flags", uniform, progress=False, source=samples, checkpoint=False)
    assert [r["step"] for r in history] == [4, 8, 12]
    for key, total in (("tail_kept", 32), ("duplicate_kept", 12),
                       ("noisy_kept", sum(s["is_noisy"] for s in samples))):
        assert sum(r[key] * 32 for r in history) == pytest.approx(total), key  # each interval trained 32
    assert all(r["label_coverage"] == 1 / 8 for r in history)


def test_resume_needs_checkpoints(recipe):
    with pytest.raises(ValueError, match="resume=True needs checkpoint=True"):
        run_one(recipe, "x", plan_runs(recipe)["learnability"], resume=True, checkpoint=False)


def test_the_reference_schedule_warms_up_linearly_then_decays_by_cosine_to_zero():
    from math import cos, pi

    from pipelines.schedule import lr_factor

    steps, warmup = 1000, 100
    assert [lr_factor(i, steps, warmup, "constant") for i in (0, 49, 99, 100, 999)] == [0.01, 0.5, 1.0, 1.0, 1.0]
    cosine = [lr_factor(i, steps, warmup, "cosine") for i in range(steps + 1)]
    assert cosine[:100] == [(i + 1) / 100 for i in range(100)]
    for i in (100, 325, 550, 775, 1000):  # the published form: ½(1 + cos(π · progress)) after the warmup
        assert cosine[i] == pytest.approx(0.5 * (1 + cos(pi * (i - warmup) / (steps - warmup))), abs=1e-12)
    assert cosine[100] == 1.0 and cosine[550] == pytest.approx(0.5) and cosine[1000] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(cosine[100:], cosine[101:], strict=False))
    with pytest.raises(ValueError, match="schedule"):
        parse_recipe("name: t\ndata: {dataset: digits}\nmodel: {kind: mlp}\nreference: {schedule: linear}\n")


def test_the_learners_cosine_schedule_decays_over_its_own_steps_and_refuses_a_resume_at_another_length(recipe):
    from pipelines.schedule import lr_factor
    from pipelines.train import load_checkpoint, recipe_changes

    train = recipe.train.model_copy(update={"warmup": 4, "schedule": "cosine"})
    cosine = recipe.model_copy(update={"train": train})
    options = plan_runs(cosine)["learnability"]
    history = run_one(cosine, "cosine", options, progress=False)
    state = load_checkpoint(cosine.out / "cosine" / "checkpoint.pt")
    last = train.lr * lr_factor(train.steps - 1, train.steps, 4, "cosine")  # the rate of the last step taken
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([last]) and 0 < last < train.lr
    constant = run_one(recipe.model_copy(update={"train": train.model_copy(update={"schedule": "constant"})}),
                       "constant", options, progress=False, checkpoint=False)
    assert _without_timing(constant) != [{**r, "run": "constant"} for r in _without_timing(history)]
    # a cosine run's rates depend on its length: a checkpoint of a shorter one is another run
    longer = cosine.model_copy(update={"train": train.model_copy(update={"steps": train.steps + 4})})
    assert recipe_changes(cosine.model_dump(mode="json"), longer) == [
        f"train.steps: {train.steps} → {train.steps + 4}"]
    steady = {k: v.model_copy(update={"train": v.train.model_copy(update={"schedule": "constant"})})
              for k, v in {"saved": cosine, "now": longer}.items()}
    assert recipe_changes(steady["saved"].model_dump(mode="json"), steady["now"]) == []  # constant: continues


def test_the_learners_warmup_follows_the_step_count_so_a_resumed_run_matches_an_uninterrupted_one(recipe):
    from pipelines.train import load_checkpoint

    warm = recipe.model_copy(update={"train": recipe.train.model_copy(update={"warmup": 20})})
    options = plan_runs(warm)["learnability"]
    whole = run_one(warm, "warm", options, progress=False)
    state = load_checkpoint(warm.out / "warm" / "checkpoint.pt")
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx([warm.train.lr * 12 / 20])
    short = warm.model_copy(update={"train": warm.train.model_copy(update={"steps": 8})})
    run_one(short, "halves", options, progress=False)
    resumed = run_one(warm, "halves", options, progress=False, resume=True)
    assert _without_timing(resumed) == [{**r, "run": "halves"} for r in _without_timing(whole)]
    cold = run_one(recipe, "cold", options, progress=False, checkpoint=False)  # and the warmup changes the run
    assert _without_timing(cold) != [{**r, "run": "cold"} for r in _without_timing(whole)]


def test_a_recipes_uniform_share_reaches_every_selected_run(recipe):
    shared = recipe.model_copy(update={"selection": recipe.selection.model_copy(update={"uniform_share": 0.5}),
                                       "compare": ["uniform", "easy_reference"]})
    runs = plan_runs(shared)
    assert runs["learnability"]["uniform_share"] == runs["easy_reference"]["uniform_share"] == 0.5
    assert "uniform_share" not in runs["uniform"]
    samples = [{k: v for k, v in s.items() if k not in ("caption", "noise")} for s in tasks.load_split(recipe, "train")]
    mixed = run_one(shared, "mixed", runs["easy_reference"], progress=False, source=samples, checkpoint=False)
    plain = run_one(recipe, "plain", {**runs["easy_reference"], "uniform_share": 0.0}, progress=False,
                    source=samples, checkpoint=False)
    # the reference's easiest quarter holds few flipped labels; half of each batch drawn uniformly holds ~30% of them
    noisy = [sum(r["noisy_kept"] for r in history) / len(history) for history in (mixed, plain)]
    assert noisy[0] > noisy[1] + 0.05, noisy


def test_a_recipes_selection_warmup_reaches_every_selected_run_and_trains_its_first_steps_uniformly(recipe):
    warm = recipe.model_copy(update={"selection": recipe.selection.model_copy(update={"warmup": 5}),
                                     "compare": ["uniform"]})
    runs = plan_runs(warm)
    assert runs["learnability"]["selection_warmup"] == 5 and "selection_warmup" not in runs["uniform"]
    history = run_one(warm, "warm", runs["learnability"], progress=False, checkpoint=False)
    last = history[-1]["pipeline"]
    assert last["warmup_batches"] == 5 and last["kept"] == 12 * 8
    plain = run_one(recipe, "plain", plan_runs(recipe)["learnability"], progress=False, checkpoint=False)
    # 7 of the 12 superbatches scored: the scoring FLOPs are 7/12 of the plain run's
    assert last["scoring_flops"] == pytest.approx(plain[-1]["pipeline"]["scoring_flops"] * 7 / 12)


def test_a_checkpoint_written_before_a_recipe_key_existed_resumes_while_the_key_keeps_its_default(recipe):
    from pipelines.train import recipe_changes

    older = recipe.model_dump(mode="json")
    del older["selection"]["warmup"], older["selection"]["uniform_share"]  # knobs added since 0.1
    assert recipe_changes(older, recipe) == []
    warm = recipe.model_copy(update={"selection": recipe.selection.model_copy(update={"warmup": 5})})
    assert recipe_changes(older, warm) == ["selection.warmup: 0 → 5"]
    older["selection"]["knob_since_removed"] = 1  # no longer validates: compared as saved, every difference shown
    assert recipe_changes(older, warm) == ["selection.knob_since_removed: 1 → (unset)",
                                           "selection.uniform_share: (unset) → 0.0", "selection.warmup: (unset) → 5"]
