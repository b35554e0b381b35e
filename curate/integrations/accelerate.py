"""accelerate: every rank's pipeline state in `accelerator.save_state` / `load_state` (`pip install "curate[hf]"`).

    pipe = curate.pipeline(loader, learner=model, ..., device=accelerator.device)  # batches arrive on the device
    curate.integrations.accelerate.register(accelerator, pipe)
    accelerator.save_state("ckpt")   # every rank writes ckpt/pipeline-rank{r}-of-{w}.pt; load_state("ckpt") reads it

Not `accelerator.register_for_checkpointing(pipe)`: that writes rank 0's state only (after a resume every rank would
replay rank 0's stream) and loads it with `weights_only=False`, which runs whatever code a planted file holds.
`accelerator.prepare(pipe)` returns the pipeline unchanged, so it may stay in a loop that prepares everything.
"""

from __future__ import annotations

from ..pipeline import Pipeline
from ..state import load_state, save_state
from . import require

require("accelerate", "hf", "accelerate", "curate.integrations.accelerate")

__all__ = ["register"]


def register(accelerator, pipe: Pipeline) -> tuple:
    """Save `pipe`'s state (this rank's, one file per rank, `curate.save_state`) into each `accelerator.save_state`
    folder and load it back in `accelerator.load_state`. Returns the two hook handles (`.remove()` undoes it)."""
    if not isinstance(pipe, Pipeline):
        raise TypeError(f"register: pipe must be a curate.Pipeline (what curate.pipeline returns), got "
                        f"{type(pipe).__name__}")
    saving = accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: save_state(output_dir, pipe))
    loading = accelerator.register_load_state_pre_hook(lambda models, input_dir: load_state(input_dir, pipe))
    return saving, loading
