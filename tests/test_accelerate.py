"""curate.integrations.accelerate against the real accelerate: the pipeline's state goes into
`accelerator.save_state` (one file per rank, weights-only) and `load_state` resumes the same batches."""

import pytest
import torch

import curate

accelerate = pytest.importorskip("accelerate")

from .accelerate_worker import train  # noqa: E402
from .conftest import linear_models, make_samples  # noqa: E402


def _run(tmp_path, steps: int, *, save_at: int | None = None, load: bool = False) -> list[list[str]]:
    return train(accelerate.Accelerator(cpu=True), tmp_path, steps, save_at=save_at, load=load)


def test_accelerator_save_state_and_load_state_resume_the_pipelines_stream(tmp_path):
    full = _run(tmp_path, 30, save_at=13)  # 20 batches per epoch: the resumed run crosses into epoch 2
    assert (tmp_path / "ckpt" / "pipeline-rank00000-of-00001.pt").exists()
    assert _run(tmp_path, 17, load=True) == full[13:]


def test_the_readmes_accelerate_lines_keep_the_stream_in_save_state(tmp_path, monkeypatch):
    from torch.utils.data import DataLoader

    from .test_readme import readme_snippet

    monkeypatch.chdir(tmp_path)
    learner, reference = linear_models(0)
    namespace = {"curate": curate, "accelerator": accelerate.Accelerator(cpu=True), "model": learner,
                 "optimizer": torch.optim.SGD(learner.parameters(), lr=0.1), "reference_model": reference,
                 "loader": DataLoader(make_samples(700), batch_size=32), "scorer": curate.ClassificationScorer()}
    exec(compile(readme_snippet("register(accelerator"), "README.md", "exec"), namespace)
    assert (tmp_path / "checkpoints" / "step-100" / "pipeline-rank00000-of-00001.pt").is_file()
    batches = namespace["batches"]
    assert len(next(iter(batches))["__key__"]) == 64


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_under_torchrun_each_resume_their_own_stream_from_accelerates_state(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent

    def run(name: str) -> list[dict]:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   str(root / "tests" / "accelerate_worker.py"), name, str(tmp_path)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return [json.loads((tmp_path / f"{name}-{rank}.json").read_text()) for rank in range(2)]

    full = run("full")
    assert all(rank["world_size"] == 2 and len(rank["seen"]) == 12 for rank in full)
    assert not {k for b in full[0]["seen"] for k in b} & {k for b in full[1]["seen"][:10] for k in b}
    assert {p.name for p in (tmp_path / "ckpt").glob("pipeline-*.pt")} == {
        "pipeline-rank00000-of-00002.pt", "pipeline-rank00001-of-00002.pt"}
    resumed = run("resumed")
    for rank in range(2):
        assert resumed[rank]["seen"] == full[rank]["seen"][5:], f"rank {rank}"
