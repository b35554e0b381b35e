"""What each recipe key means, for `curate --help` and every subcommand's `--help`.

Stdlib only, so help works before the app extra is checked (and without it). `tests/test_recipe_keys.py`
checks that this lists exactly the leaf keys of `pipelines.recipe.Recipe`: a key added to the schema without
a line here fails the suite. `reference.model.*` and `selection.actor.model.*` take the `model.*` keys.
"""

from __future__ import annotations

import textwrap

__all__ = ["KEYS", "MODEL_PREFIXES", "help_text"]

# the sections whose keys are model.*'s
MODEL_PREFIXES = ("reference.model", "selection.actor.model")

KEYS: dict[str, str] = {
    "name": "the run's name: outputs go to runs/<name> unless train.out says otherwise",
    "prepare": "true: make what is missing (data, reference, cache) before training; false: a missing piece is "
               "an error naming the command that makes it",
    "compare": "baselines trained in the same run, from the same initial weights: rule names, e.g. [uniform]",
    # data
    "data.format": "digits (the embedded demo, default) | webdataset (tar shards, as img2dataset writes them) | "
                   "parquet (image bytes + columns, as Hugging Face / DataComp export)",
    "data.root": "format digits: where `curate data digits ROOT` wrote the demo (default data/digits)",
    "data.dataset": "format digits: pairs (image-text, contrastive) | digits (noisy labels, classification)",
    "data.task": "your own shards: contrastive (image + text) | classification (image + label)",
    "data.train": "your own shards to train on: a glob (shards/train-*.tar), a brace pattern "
                  "(shards/train-{000000..000099}.tar) or a list; local or s3://",
    "data.curated": "clean shards `curate train-reference` trains the reference on",
    "data.eval": "held-out shards for evaluation",
    "data.fields.image": "the member (tar: the file extension; Parquet: the column) holding the image; "
                         "alternatives separated by ';' (default jpg;jpeg;png;webp)",
    "data.fields.text": "the member holding the caption (default txt)",
    "data.fields.label": "the member holding the class index (default cls)",
    "data.fields.key": "the sample's key: __key__ (webdataset's) or a Parquet column (default __key__)",
    "data.image_size": "images resized and centre-cropped to this side, for models without their own "
                       "preprocessing (torchvision, factory); open_clip models use their own",
    "data.transforms": "torchvision.transforms.v2 ops applied in order to each image as a float tensor in [0, 1], "
                       "e.g. [{Resize: {size: 256}}, {CenterCrop: {size: 224}}, {Normalize: {mean: [...], "
                       "std: [...]}}]; deterministic ones only (augment in your training step); they replace the "
                       "model's own preprocessing",
    "data.on_corrupt": "a sample that does not decode: fail naming its shard and key (default) | skip it and "
                       "count its key in the reports",
    "data.storage_options": "fsspec/s3fs options for s3:// data, e.g. {endpoint_url: ..., key: ..., secret: ...}",
    # models
    "model.kind": "the learner: tiny_clip | small_cnn | mlp (the demo's built-ins) | open_clip | torchvision | "
                  "factory",
    "model.name": "open_clip: an architecture (ViT-B-32); torchvision: a torchvision.models name (resnet18)",
    "model.config": "open_clip: a model config JSON of your own, instead of model.name",
    "model.pretrained": "open_clip / torchvision: a local weights file (safetensors or torch state_dict); "
                        "default: random initialisation (nothing is downloaded)",
    "model.factory": "kind factory: 'package.module:function' returning the model (or open_clip's "
                     "(model, preprocess_train, preprocess_val))",
    "model.loss": "contrastive tasks: sigmoid (SigLIP, default) | softmax (CLIP)",
    "model.options": "the builder's keyword arguments, e.g. {num_classes: 10} for torchvision",
    # reference
    "reference.path": "where `curate train-reference` saves the reference (default runs/<name>/reference)",
    "reference.checkpoint": "a given reference's weights file (safetensors or torch): used, never trained",
    "reference.model": "the reference's architecture, as model.* (default: the learner's)",
    "reference.steps": "reference training steps on data.curated (default 400)",
    "reference.batch_size": "reference training batch size (default 128)",
    "reference.lr": "reference training learning rate (default 0.002)",
    "reference.schedule": "constant, or cosine: warmup then cosine decay to 0 at reference.steps (default constant)",
    "reference.warmup": "linear warmup steps from 0 to reference.lr (default 0)",
    # cache
    "cache.path": "the reference scores' Parquet cache (local or s3://); unset: the reference scores online",
    "cache.missing": "a key the cache lacks: error (default) | online (score it with the reference)",
    "cache.batch_size": "samples per batch when `curate precompute` scores (default 512)",
    # selection
    "selection.rule": "learnability (learner loss - reference loss; alias rho) | easy_reference | "
                      "hard_learner | uniform",
    "selection.method": "topk (RHO-LOSS) | sample (softmax sampling) | joint (JEST, contrastive)",
    "selection.filter_ratio": "share of each superbatch dropped: 0.8 scores 5x the batch and keeps a fifth",
    "selection.n_chunks": "joint: chunks each batch is sampled in (default 16)",
    "selection.temperature": "sample / joint: softmax temperature over scores (0: greedy; default 1)",
    "selection.uniform_share": "share of each batch drawn uniformly from the superbatch, the rest selected "
                               "(default 0: the published methods)",
    "selection.warmup": "the first N training steps take uniform batches from their superbatches, nothing scored; "
                        "selection starts at step N (default 0: the published methods)",
    "selection.shuffle_buffer": "samples shuffled ahead of the superbatch (default 1024; 0: none)",
    "selection.actor.model": "ACL: a small proxy model, as model.*, trained online and scoring for the learner",
    "selection.actor.lr": "ACL: the actor's learning rate (default 0.001)",
    "selection.flexi.downsample": "Flexi-JEST: score the superbatch at 1/k image resolution (default 2)",
    "selection.flexi.train_share": "Flexi-JEST: share of each batch the learner trains at that resolution "
                                   "(default 0.5)",
    # curation
    "curation.aligned_share": "`curate curate-set` first keeps only this share of samples, those whose reference "
                              "image and text embeddings agree best (a CLIP-score filter; default: all)",
    "curation.embedding": "`curate curate-set` compares reference embeddings of: image (default) | text | both",
    "curation.n_clusters": "k-means clusters (default: round(sqrt(N)))",
    "curation.threshold": "cosine at or above which two samples are duplicates (default 0.95)",
    "curation.per_cluster": "cap on samples per cluster after dedup (default: none)",
    "curation.train_on_curated": "`curate run` trains only on the curated key list",
    # training
    "train.steps": "training steps per run (default 300)",
    "train.batch_size": "the global training batch (default 64); the superbatch is batch / (1 - filter_ratio)",
    "train.lr": "learning rate (AdamW; default 0.001)",
    "train.warmup": "steps of linear warmup to train.lr (default 0)",
    "train.schedule": "constant after the warmup, or cosine: decay to 0 at train.steps (default constant)",
    "train.weight_decay": "AdamW weight decay (default 0)",
    "train.eval_every": "steps between evaluations (default 50)",
    "train.seed": "seeds data order, initial weights and selection (default 0)",
    "train.device": "auto (CUDA when there is one) | cpu | cuda",
    "train.out": "output directory (default runs/<name>)",
    # evaluation
    "eval.classnames": "contrastive own data: class names in label order, for zero-shot accuracy; unset: "
                       "image-to-text retrieval R@1 over the eval pairs",
    "eval.templates": "zero-shot prompts, {} for the class name (default ['a photo of a {}.'])",
    # distributed
    "distributed.selection_scope": "under torchrun: local (each rank selects from its own superbatch) | "
                                   "global (the decision one process would make over all ranks)",
    "distributed.backend": "the process group's: auto (nccl on CUDA, else gloo) | gloo | nccl",
    "distributed.timeout_s": "seconds a collective waits before failing a stalled rank (default 600)",
}


def help_text(width: int = 100) -> str:
    """The recipe keys with their meanings, wrapped to `width` columns, for argparse's epilog."""
    column = max(len(key) for key in KEYS) + 4
    lines = ["recipe keys (in the YAML, or --set KEY=VALUE):"]
    for key, meaning in KEYS.items():
        lines.append(textwrap.fill(meaning, width, initial_indent=f"  {key}".ljust(column),
                                   subsequent_indent=" " * column, break_on_hyphens=False))
    lines.append(f"  ({' and '.join(MODEL_PREFIXES)} take the model.* keys)")
    return "\n".join(lines)
