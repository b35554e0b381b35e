"""`curate` under faults, as real CLI subprocesses: a changed recipe on --resume, an unreachable S3 endpoint, a full
disk (a tiny tmpfs when this host lets us mount one, and a file size limit: EFBIG), bad YAML in --set, and output
paths outside the working directory. Each gives one line on stderr naming the problem and the fix, exit code 2, and
leaves no temporary file behind."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.data import make_digits
from pipelines.recipe import RecipeError, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
UNIFORM = str(ROOT / "recipes" / "uniform.yaml")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    make_digits(out, n_train=400, n_curated=100, n_test=100, shard_size=200)
    return out


def _small(digits: Path, out: Path, *extra: str) -> list[str]:
    values = ["prepare=false", f"data.root={digits}", f"train.out={out}", "train.steps=4", "train.eval_every=2",
              "train.batch_size=8", "selection.shuffle_buffer=16", *extra]
    return [arg for value in values for arg in ("--set", value)]


def _curate(*args: str, cwd: Path = ROOT, preexec_fn=None, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec_fn)


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("curate run: error: "), proc.stderr[-4000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]


# ---------------------------------------------------------------- resume under a changed recipe


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_under_a_changed_recipe_is_refused_naming_the_keys_unless_asked(digits, tmp_path):
    assert _curate("run", UNIFORM, *_small(digits, tmp_path)).returncode == 0
    state = torch.load(tmp_path / "uniform" / "checkpoint.pt", weights_only=True)  # plain data, no pickled objects
    assert state["recipe"]["train"]["lr"] == parse_recipe("name: x").train.lr and state["recipe"]["name"] == "uniform"
    changed = _small(digits, tmp_path, "train.lr=0.5", "selection.shuffle_buffer=8", "train.steps=6")
    refused = _curate("run", UNIFORM, *changed, "--resume")
    line = _one_line_error(refused, "train.lr: 0.001 → 0.5", "selection.shuffle_buffer: 16 → 8", "--resume-anyway")
    assert "train.steps" not in line  # a longer run continues the same trajectory: not a change
    # asked to, it resumes under the new learning rate, saying so (a changed shuffle buffer would change the
    # pipeline's stages, whose state the pipeline itself checks)
    lr_only = _small(digits, tmp_path, "train.lr=0.5", "train.steps=6")
    anyway = _curate("run", UNIFORM, *lr_only, "--resume-anyway")
    assert anyway.returncode == 0, anyway.stderr[-3000:]
    assert "train.lr: 0.001 → 0.5" in anyway.stderr and "warning" in anyway.stderr.lower()
    state = torch.load(tmp_path / "uniform" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6 and state["recipe"]["train"]["lr"] == 0.5
    # a longer run under the recipe it was written with resumes without a word
    longer = _curate("run", UNIFORM, *_small(digits, tmp_path, "train.lr=0.5", "train.steps=8"), "--resume")
    assert longer.returncode == 0 and "warning" not in longer.stderr.lower(), longer.stderr[-3000:]


# ---------------------------------------------------------------- S3, disk, YAML, paths


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_an_unreachable_s3_endpoint_is_one_line_naming_it(tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    options = f'data.storage_options={{"key": "k", "secret": "s", "client_kwargs": {{"endpoint_url": "{endpoint}"}}}}'
    proc = _curate("run", UNIFORM, "--set", "data.root=s3://nowhere/digits", "--set", options,
                   "--set", f"train.out={tmp_path / 'out'}")
    line = _one_line_error(proc, endpoint, "storage_options")
    print(line)


def _fsize_limit(nbytes: int):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_file_size_limit_fails_the_checkpoint_cleanly(digits, tmp_path):
    # every file this process writes may be 40 KB at most (EFBIG): metrics fit, the checkpoint does not
    proc = _curate("run", UNIFORM, *_small(digits, tmp_path), preexec_fn=_fsize_limit(40_000))
    _one_line_error(proc, "checkpoint.pt", "too large")
    assert not (tmp_path / "uniform" / "checkpoint.pt").exists()
    assert _temps(tmp_path) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KB tmpfs, when this process may mount one (root in a container); skipped otherwise."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_full_disk_fails_the_checkpoint_cleanly(digits, tiny_disk):
    proc = _curate("run", UNIFORM, *_small(digits, tiny_disk))
    _one_line_error(proc, "no space left", "checkpoint.pt", "train.out")
    assert not (tiny_disk / "uniform" / "checkpoint.pt").exists()
    assert _temps(tiny_disk) == []


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bad_yaml_in_set_is_one_line_naming_the_override(digits, tmp_path):
    proc = _curate("run", UNIFORM, "--set", "train.steps=[1,", "--set", f"train.out={tmp_path}")
    _one_line_error(proc, "--set 'train.steps=[1,'", "YAML", "quote")


def test_bad_yaml_in_set_is_a_recipe_error():
    with pytest.raises(RecipeError, match="not valid YAML"):
        parse_recipe("name: x", overrides=["selection.rule={oops"])


@pytest.mark.parametrize("key", ["train.out", "reference.path", "cache.path"])
def test_relative_output_paths_must_stay_in_the_working_directory(key):
    with pytest.raises(RecipeError, match="outside the working directory"):
        parse_recipe("name: x", overrides=[f"{key}=../../elsewhere"])
    assert parse_recipe("name: x", overrides=[f"{key}=/tmp/elsewhere"])  # an absolute path says so explicitly
    assert parse_recipe("name: x", overrides=[f"{key}=runs/a/../b"])  # stays inside
