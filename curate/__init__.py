"""curate: choose what to train on, inside the data pipeline.

The public API. Everything a user needs is importable from here; submodules are implementation.
"""

from .actor import Actor, TrainActor
from .batch import concat_batches, take
from .cache import (
    CorruptPartError,
    DuplicateKeysError,
    KeyTypeError,
    MissingKeysError,
    ProvenanceError,
    ScoreCache,
    model_hash,
    write_part,
)
from .curation import AlignmentResult, DedupResult, alignment_filter, balance, read_keys, semantic_dedup, write_keys
from .distributed import GlobalScope, Lockstep, RankSplit, RankStalledError, Shards, local_sizes, resolve_world
from .flops import TrainingFlops, forward_flops
from .joint_select import METHODS, JointSelect, LocalScope
from .learner import LearnerSide, resolve_learner
from .losses import cross_entropy_losses, sigmoid_example_losses, sigmoid_pair_losses, softmax_example_losses
from .nodes import Batch, KeepKeys, Shuffle, Source, Superbatch, ToDevice, Unbatch
from .pipeline import Pipeline, pipeline, superbatch_size_for
from .prefetch import Prefetch
from .rules import RULES, Rule, get_rule
from .score import Score, ScoredSuperbatch
from .scorers import (
    ClassificationScorer,
    ContrastiveScorer,
    ModelProvider,
    ModelScores,
    ScoreProvider,
    Scorer,
    TargetError,
    score_model,
)
from .seeding import derive_seed, make_generator
from .selection import joint, sample, topk
from .stage import Counter, Merge, Stage
from .state import load_state, save_state, state_path
from .sync import WeightSync

__version__ = "0.1.0"

__all__ = [
    "Actor",
    "AlignmentResult",
    "Batch",
    "ClassificationScorer",
    "ContrastiveScorer",
    "CorruptPartError",
    "Counter",
    "DedupResult",
    "DuplicateKeysError",
    "GlobalScope",
    "JointSelect",
    "KeepKeys",
    "KeyTypeError",
    "LearnerSide",
    "LocalScope",
    "Lockstep",
    "METHODS",
    "Merge",
    "MissingKeysError",
    "ModelProvider",
    "ModelScores",
    "Pipeline",
    "Prefetch",
    "ProvenanceError",
    "RULES",
    "RankSplit",
    "RankStalledError",
    "Rule",
    "Score",
    "ScoreCache",
    "ScoreProvider",
    "ScoredSuperbatch",
    "Scorer",
    "Shards",
    "Shuffle",
    "Source",
    "Stage",
    "Superbatch",
    "TargetError",
    "ToDevice",
    "TrainActor",
    "TrainingFlops",
    "Unbatch",
    "WeightSync",
    "alignment_filter",
    "balance",
    "concat_batches",
    "cross_entropy_losses",
    "derive_seed",
    "forward_flops",
    "get_rule",
    "joint",
    "load_state",
    "local_sizes",
    "make_generator",
    "model_hash",
    "pipeline",
    "read_keys",
    "resolve_learner",
    "resolve_world",
    "sample",
    "save_state",
    "score_model",
    "semantic_dedup",
    "sigmoid_example_losses",
    "sigmoid_pair_losses",
    "softmax_example_losses",
    "state_path",
    "superbatch_size_for",
    "take",
    "topk",
    "write_keys",
    "write_part",
]
