"""curate.integrations.hf against the real transformers: a tiny GPT-2 and a tiny BERT built from configs (no
download), CausalLMScorer / HFClassificationScorer checked by hand, and a real `Trainer` trained on RHO top-k
batches, checkpointed mid-epoch and resumed to the same batches."""

import pytest
import torch
import torch.nn.functional as F

import curate

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("curate.integrations.hf")

VOCAB, LENGTH = 64, 12


def tiny_gpt2(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def sequences(n: int, seed: int = 0) -> list[dict]:
    """Token sequences of 3..LENGTH tokens, right-padded; labels are HF's: the ids, -100 on padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        size = int(torch.randint(3, LENGTH + 1, (), generator=g))
        ids = torch.zeros(LENGTH, dtype=torch.long)
        ids[:size] = torch.randint(1, VOCAB, (size,), generator=g)
        mask = (torch.arange(LENGTH) < size).long()
        out.append({"__key__": f"seq{i:04d}", "input_ids": ids, "attention_mask": mask,
                    "labels": torch.where(mask.bool(), ids, -100)})
    return out


def by_hand(model, sample: dict) -> float:
    """Mean over the sequence's real tokens t >= 1 of -log p(token t | tokens < t), one position at a time."""
    n = int(sample["attention_mask"].sum())
    ids = sample["input_ids"][:n]
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    losses = [-F.log_softmax(logits[t - 1].double(), -1)[ids[t]] for t in range(1, n)]
    return float(torch.stack(losses).mean())


def test_causal_lm_scorer_is_the_mean_next_token_loss_over_each_sequences_real_tokens():
    model = tiny_gpt2(0).eval()
    data = sequences(10)
    batch = torch.utils.data.default_collate(data)
    scores = curate.score_model(model, batch, hf.CausalLMScorer(), micro_batch_size=4).loss
    expected = torch.tensor([by_hand(model, s) for s in data], dtype=torch.float64)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-5)
    # labels in HF's convention give the same losses; a label -100 on a real token leaves that token out
    with_labels = curate.score_model(model, batch, hf.CausalLMScorer(label_key="labels"), 16).loss
    torch.testing.assert_close(with_labels, scores)
    prompt = dict(batch, labels=batch["labels"].clone())
    prompt["labels"][:, :2] = -100  # the first two tokens are a prompt: token 1 is not scored
    masked = curate.score_model(model, prompt, hf.CausalLMScorer(label_key="labels"), 16).loss
    assert not torch.allclose(masked, scores)


def test_causal_lm_scorer_refuses_a_sequence_with_no_token_to_predict():
    data = sequences(4)
    data[2]["attention_mask"][1:] = 0  # one token: nothing to predict
    with pytest.raises(curate.TargetError, match=r"1 samples \(keys \['seq0002'\]\) have no token to predict"):
        curate.score_model(tiny_gpt2(0), torch.utils.data.default_collate(data), hf.CausalLMScorer(), 16)


def test_rho_topk_with_causal_lm_scorer_keeps_the_top_k_of_learner_minus_reference_loss_by_hand():
    learner, reference = tiny_gpt2(1).eval(), tiny_gpt2(2).eval()
    data = sequences(48)
    pipe = curate.pipeline(data, batch_size=4, filter_ratio=2 / 3, learner=learner, reference=reference,
                           scorer=hf.CausalLMScorer(), method="topk", shuffle_buffer=0)
    batches = list(pipe)
    assert len(batches) == len(pipe) == 4
    for i, batch in enumerate(batches):
        superbatch = data[12 * i:12 * (i + 1)]
        learnability = {s["__key__"]: by_hand(learner, s) - by_hand(reference, s) for s in superbatch}
        best = sorted(learnability, key=learnability.get, reverse=True)[:4]
        assert sorted(batch["__key__"]) == sorted(best)


def tiny_bert(seed: int, labels: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=labels,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def test_hf_classification_scorer_scores_a_bert_classifier_and_checks_its_labels():
    model = tiny_bert(0).eval()
    data = sequences(12)
    for i, sample in enumerate(data):
        sample["labels"] = torch.tensor(i % 3)
    batch = torch.utils.data.default_collate(data)
    scores = curate.score_model(model, batch, hf.HFClassificationScorer(), micro_batch_size=5).loss
    expected = []
    for sample in data:  # one sequence at a time, unpadded: the attention mask must make padding irrelevant
        n = int(sample["attention_mask"].sum())
        with torch.no_grad():
            logits = model(input_ids=sample["input_ids"][None, :n]).logits
        expected.append(F.cross_entropy(logits, sample["labels"][None]))
    torch.testing.assert_close(scores, torch.stack(expected), rtol=1e-4, atol=1e-5)
    batch["labels"][4] = 7
    with pytest.raises(curate.TargetError, match=r"class indices outside \[0, 3\): \[7\]"):
        curate.score_model(model, batch, hf.HFClassificationScorer(), 16)
    with pytest.raises(TypeError, match="input_keys takes a sequence of field names"):
        hf.HFClassificationScorer(input_keys="input_ids")


# ---------------------------------------------------------------- Trainer


def _trainer(out_dir, model, pipe, max_steps: int):
    args = transformers.TrainingArguments(output_dir=str(out_dir), max_steps=max_steps, save_steps=3,
                                          per_device_train_batch_size=4, learning_rate=3e-3, use_cpu=True,
                                          report_to=[], logging_steps=1, seed=0, save_only_model=False,
                                          dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args)
    hf.attach(trainer, pipe)
    return trainer


def _recorded(model) -> list:
    """The input ids of every training forward of `model` (not the scoring passes, which run in eval mode)."""
    seen: list = []

    def hook(module, args, kwargs):
        if module.training:
            seen.append(kwargs["input_ids"].clone())
    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _curated(model, reference, data):
    return curate.pipeline(data, batch_size=4, filter_ratio=0.5, learner=model, reference=reference,
                           scorer=hf.CausalLMScorer(), method="topk", shuffle_buffer=16, seed=5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_trainer_trains_on_curated_batches_and_resumes_mid_epoch_to_the_same_batches(tmp_path):
    data = sequences(40)  # 5 batches of 4 per epoch: 8 steps cross into the second epoch
    reference = tiny_gpt2(9).eval()
    model = tiny_gpt2(3)
    seen = _recorded(model)
    trainer = _trainer(tmp_path, model, _curated(model, reference, data), max_steps=8)
    result = trainer.train()
    assert len(seen) == 8 and all(ids.shape == (4, LENGTH) for ids in seen)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and all(loss == loss for loss in losses)
    assert result.global_step == 8
    for step in (3, 6):  # mid-epoch 0 and mid-epoch 1
        assert (tmp_path / f"checkpoint-{step}" / "pipeline-rank00000-of-00001.pt").exists()
        resumed_model = tiny_gpt2(3)
        again = _recorded(resumed_model)
        resumed = _trainer(tmp_path, resumed_model, _curated(resumed_model, reference, data), max_steps=8)
        resumed.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{step}"))
        assert len(again) == 8 - step
        for got, want in zip(again, seen[step:], strict=True):
            assert torch.equal(got, want)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_trainer_resume_without_curates_state_names_the_folder(tmp_path):
    data = sequences(40)
    model = tiny_gpt2(3)
    _trainer(tmp_path, model, _curated(model, tiny_gpt2(9), data), max_steps=3).train()
    (tmp_path / "checkpoint-3" / "pipeline-rank00000-of-00001.pt").unlink()
    model = tiny_gpt2(3)
    resumed = _trainer(tmp_path, model, _curated(model, tiny_gpt2(9), data), max_steps=6)
    with pytest.raises(FileNotFoundError, match=r"resuming at step 3, but .*checkpoint-3 holds no curate pipeline "
                                                r"state of rank 0"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_readmes_trainer_lines_train_and_checkpoint_the_stream(tmp_path, monkeypatch):
    from .test_readme import readme_snippet

    monkeypatch.chdir(tmp_path)
    model = tiny_gpt2(3)
    seen = _recorded(model)
    namespace = {"curate": curate, "transformers": transformers, "model": model, "reference_model": tiny_gpt2(9),
                 "loader": torch.utils.data.DataLoader(sequences(64), batch_size=16)}
    exec(compile(readme_snippet("hf.attach("), "README.md", "exec"), namespace)
    assert len(seen) == 10 and all(ids.shape == (8, LENGTH) for ids in seen)
    assert (tmp_path / "out" / "checkpoint-10" / "pipeline-rank00000-of-00001.pt").is_file()


def test_acl_an_actor_gpt2_trained_on_the_selected_sequences_scores_them_with_causal_lm_scorer():
    actor_model = tiny_gpt2(4)
    before = [p.detach().clone() for p in actor_model.parameters()]
    actor = curate.Actor(actor_model, torch.optim.AdamW(actor_model.parameters(), lr=1e-3))
    pipe = curate.pipeline(sequences(48), batch_size=4, filter_ratio=2 / 3, learner=actor, reference=tiny_gpt2(2),
                           scorer=hf.CausalLMScorer(), method="sample", shuffle_buffer=0, train_model=tiny_gpt2(3))
    batches = list(pipe)
    stats = pipe.stats()
    assert len(batches) == 4 and stats["actor_updates"] == 4
    assert 0 < stats["actor_loss_mean"] < float("inf")
    assert any(not torch.equal(a, b) for a, b in zip(before, actor_model.parameters(), strict=True))
