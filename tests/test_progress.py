"""Progress of long jobs: a tqdm bar on a terminal (a real pseudo-terminal here), log lines with samples/s and
an ETA through `logging` where stderr is a file or a pipe (SLURM, torchrun logs)."""

import fcntl
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from pipelines.data import make_digits
from pipelines.progress import LogProgress, progress

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"uniform: (\d+)/6 steps \((\d+)%\), [\d.]+ steps/s, [\d.]+ samples/s, ETA \d+s")


def test_log_lines_count_rate_and_eta(caplog, monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 30.0, 40.0])  # start, then one update every 10 s
    monkeypatch.setattr("pipelines.progress.time.monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="curate.progress"):
        bar = LogProgress(400, "precompute", "sample", every_s=15)
        for _ in range(3):
            bar.update(100)  # at 10 s (too soon), 20 s (a line) and 30 s (10 s after it: too soon)
        bar.close()  # at 40 s: the last line, always
    assert [r.getMessage() for r in caplog.records] == [
        "precompute: 200/400 samples (50%), 10.0 samples/s, ETA 20s",
        "precompute: 300/400 samples (75%), 7.5 samples/s, ETA 13s",
    ]


def test_the_period_comes_from_the_environment_and_a_bad_one_is_named(monkeypatch):
    monkeypatch.setenv("CURATE_PROGRESS_EVERY_S", "300")
    assert progress(10, "x", "step").every_s == 300  # pytest's stderr is no terminal
    monkeypatch.setenv("CURATE_PROGRESS_EVERY_S", "soon")
    with pytest.raises(ValueError, match="CURATE_PROGRESS_EVERY_S: expected seconds .* got 'soon'"):
        progress(10, "x", "step")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    make_digits(out, n_train=300, n_curated=50, n_test=100, shard_size=300)
    return out


def _command(digits: Path, out: Path) -> list[str]:
    values = [f"data.root={digits}", f"train.out={out}", "train.steps=6", "train.eval_every=3", "train.batch_size=8"]
    return [sys.executable, "-m", "pipelines.cli", "run", "recipes/uniform.yaml",
            *[arg for value in values for arg in ("--set", value)]]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_job_logging_to_a_file_writes_progress_lines(digits, tmp_path):
    env = {**os.environ, "CURATE_PROGRESS_EVERY_S": "0"}
    with open(tmp_path / "job.log", "w") as log:  # as SLURM's --error=job.log does
        subprocess.run(_command(digits, tmp_path / "run"), cwd=ROOT, env=env, stderr=log, check=True,
                       stdout=subprocess.DEVNULL, timeout=240)
    text = (tmp_path / "job.log").read_text()
    steps = [int(m.group(1)) for m in LINE.finditer(text)]
    assert steps == [1, 2, 3, 4, 5, 6, 6], text  # every step, then the closing line
    assert "\r" not in text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_job_on_a_terminal_draws_a_tqdm_bar(digits, tmp_path):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    try:
        proc = subprocess.Popen(_command(digits, tmp_path / "run"), cwd=ROOT, stderr=follower,
                                stdout=subprocess.DEVNULL)
        os.close(follower)
        chunks = []
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:  # the job closed its end
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=240) == 0
    finally:
        os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    assert re.search(r"uniform: 100%\|.*\| 6/6 \[", text), text  # tqdm's bar, drawn with carriage returns
    assert "\r" in text and not LINE.search(text)
