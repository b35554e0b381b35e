"""One rank of a `torchrun --nproc_per_node=2` job training through accelerate (CPU, gloo) on curated batches,
for tests/test_accelerate.py.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/accelerate_worker.py RUN OUT

RUN "full" trains 12 steps and saves accelerate's state after step 5; "resumed" loads it and trains the rest. Each
rank writes the keys of its batches to OUT/RUN-RANK.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import accelerate
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import curate  # noqa: E402
from curate.integrations.accelerate import register  # noqa: E402
from tests.conftest import linear_models, make_samples  # noqa: E402

torch.set_num_threads(1)
STEPS, SAVE_AT = 12, 5  # 10 batches an epoch per rank (320 samples / 2 ranks / superbatch 16): crosses an epoch


def train(accelerator, out: Path, steps: int, *, save_at: int | None = None, load: bool = False) -> list[list[str]]:
    """`steps` steps on curated batches (loading accelerate's state from OUT/ckpt first with `load`, saving it there
    after step `save_at`); returns the keys of each batch this rank trained on."""
    learner, reference = linear_models(0)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.5)
    learner, optimizer = accelerator.prepare(learner, optimizer)
    pipe = curate.pipeline(make_samples(320), learner=learner, reference=reference,
                           scorer=curate.ClassificationScorer(), batch_size=8, filter_ratio=0.5, method="sample",
                           shuffle_buffer=64, seed=4, device=accelerator.device)
    assert accelerator.prepare(pipe) is pipe
    register(accelerator, pipe)
    if load:
        accelerator.load_state(str(out / "ckpt"))
    seen: list[list[str]] = []
    it = iter(pipe)
    while len(seen) < steps:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(pipe)
            continue
        seen.append(list(batch["__key__"]))
        accelerator.backward(F.cross_entropy(learner(batch["input"]), batch["target"]))
        optimizer.step()
        optimizer.zero_grad()
        if len(seen) == save_at:
            accelerator.save_state(str(out / "ckpt"))
    return seen


def main(run: str, out: Path) -> None:
    accelerator = accelerate.Accelerator(cpu=True)
    if run == "full":
        seen = train(accelerator, out, STEPS, save_at=SAVE_AT)
    else:
        seen = train(accelerator, out, STEPS - SAVE_AT, load=True)
    (out / f"{run}-{accelerator.process_index}.json").write_text(json.dumps(
        {"seen": seen, "world_size": accelerator.num_processes}))
    # a clean gloo teardown: without it a rank could exit while the other's gloo threads still ran, and once (on a
    # loaded machine) one aborted with "terminate called without an active exception"
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
