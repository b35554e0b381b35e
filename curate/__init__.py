"""curate: choose what to train on, inside the data pipeline.

The public API. Everything a user needs is importable from here; submodules are implementation.
"""

from .actor import Actor
from .cache import ScoreCache, model_hash, write_part
from .curation import DedupResult, balance, read_keys, semantic_dedup, write_keys
from .distributed import Shards, local_sizes, resolve_world
from .flops import forward_flops
from .losses import cross_entropy_losses, sigmoid_example_losses, sigmoid_pair_losses, softmax_example_losses
from .nodes import Batch, KeepKeys, Shuffle, Source, Superbatch, Unbatch
from .pipeline import Pipeline, Prefetch, pipeline, superbatch_size_for
from .rules import RULES, get_rule
from .score import Score, Scored, ScoreProvider
from .scorers import ClassificationScorer, ContrastiveScorer, Scores
from .seeding import derive_seed, make_generator
from .select import METHODS, JointSelect
from .selection import joint, sample, topk
from .sync import WeightSync

__version__ = "0.1.0"

__all__ = [
    "pipeline",
    "Pipeline",
    "superbatch_size_for",
    "Shards",
    "resolve_world",
    "local_sizes",
    "WeightSync",
    "Actor",
    "Prefetch",
    "forward_flops",
    "Source",
    "KeepKeys",
    "Shuffle",
    "Superbatch",
    "Score",
    "JointSelect",
    "Unbatch",
    "Batch",
    "Scored",
    "Scores",
    "ScoreProvider",
    "ClassificationScorer",
    "ContrastiveScorer",
    "RULES",
    "get_rule",
    "METHODS",
    "topk",
    "sample",
    "joint",
    "cross_entropy_losses",
    "sigmoid_pair_losses",
    "sigmoid_example_losses",
    "softmax_example_losses",
    "semantic_dedup",
    "balance",
    "write_keys",
    "read_keys",
    "DedupResult",
    "ScoreCache",
    "write_part",
    "model_hash",
    "derive_seed",
    "make_generator",
]
