"""No hangs: a stalled rank ends a torchrun job within the timeout, a stalled S3 endpoint within about a minute.

Real components only: `torchrun` with two gloo ranks on 127.0.0.1 (one stopped with SIGSTOP mid-run), and a
moto S3 server in its own process, stopped with SIGSTOP after the bucket exists (its socket still accepts
connections, so only read timeouts can end a request).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
TIMEOUT = 10  # seconds a collective may wait in these tests

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def _torchrun(*args: str, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    log = open(out / "torchrun.log", "w")  # noqa: SIM115 (the job outlives this function)
    return subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _ranks(job: subprocess.Popen, deadline: float) -> dict[int, psutil.Process]:
    """The job's rank processes by RANK, once both have started."""
    while time.monotonic() < deadline:
        ranks = {}
        for child in psutil.Process(job.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if rank is not None and child.environ().get("LOCAL_RANK") is not None:
                ranks[int(rank)] = child
        if len(ranks) == 2:
            return ranks
        time.sleep(0.1)
    raise AssertionError("torchrun did not start two ranks")


def _ended(process: psutil.Process) -> bool:
    try:
        return process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True


def _wait_stopped(process: psutil.Process, deadline: float) -> float:
    while time.monotonic() < deadline:
        if process.status() == psutil.STATUS_STOPPED:
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"rank process {process.pid} never stopped")


def _wait_ended(process: psutil.Process, limit: float) -> float | None:
    """Seconds until `process` ended, or None if it still runs after `limit` seconds."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if _ended(process):
            return time.monotonic() - start
        time.sleep(0.1)
    return None


def _finish(job: subprocess.Popen, stopped: psutil.Process) -> None:
    """SIGKILL the stopped rank, then the whole job if it still runs."""
    try:
        stopped.kill()
    except psutil.NoSuchProcess:
        pass
    try:
        job.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


# ---------------------------------------------------------------- a stalled rank


@needs_gloo
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_stopped_rank_ends_the_pipeline_within_its_timeout_naming_the_group(tmp_path):
    # the default group waits 120 s; the pipeline's own group must use curate.pipeline(timeout=10)
    job = _torchrun(str(WORKER), "stall", str(tmp_path), str(TIMEOUT), out=tmp_path)
    deadline = time.monotonic() + 60
    ranks = _ranks(job, deadline)
    try:
        _wait_stopped(ranks[1], deadline)  # rank 1 stops itself after two batches
        waited = _wait_ended(ranks[0], TIMEOUT + 10 + 5)
        log = (tmp_path / "torchrun.log").read_text()
        assert waited is not None, f"rank 0 still runs {TIMEOUT + 15} s after rank 1 stopped:\n{log[-3000:]}"
        seconds, error = (tmp_path / "error-0").read_text().split("\n", 1)
        print(f"pipeline(timeout={TIMEOUT}): rank 0 failed {seconds} s after its last batch")
        assert float(seconds) <= TIMEOUT + 10, error
        assert "pipeline" in error and f"{TIMEOUT:g} s" in error and "timeout" in error, error
        assert "rank(s) [1]" in error, error  # the rank that never marked itself alive
    finally:
        _finish(job, ranks[1])
    assert job.returncode != 0


def _run_recipe(tmp_path: Path, digits: Path) -> Path:
    text = f"""name: stall
data: {{root: {digits}, dataset: digits}}
model: {{kind: mlp}}
selection: {{rule: uniform, method: sample, filter_ratio: 0.0, shuffle_buffer: 0}}
train: {{steps: 1000000, eval_every: 5, batch_size: 8, out: {tmp_path / "out"}}}
distributed: {{backend: gloo, timeout_s: {TIMEOUT}}}
"""
    path = tmp_path / "stall.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from pipelines.data import make_digits

    root = tmp_path_factory.mktemp("data")
    make_digits(root, n_train=600, n_curated=100, n_test=100, shard_size=100)
    return root


@needs_gloo
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_stopped_rank_of_curate_run_ends_every_other_rank_within_the_recipes_timeout(tmp_path, digits):
    recipe = _run_recipe(tmp_path, digits)
    job = _torchrun("-m", "pipelines.cli", "run", str(recipe), out=tmp_path)
    deadline = time.monotonic() + 90
    ranks = _ranks(job, deadline)
    metrics = tmp_path / "out" / "uniform" / "metrics.jsonl"
    try:
        while not metrics.exists():  # training is under way: stop rank 1 mid-run
            assert time.monotonic() < deadline and job.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
            time.sleep(0.1)
        ranks[1].send_signal(signal.SIGSTOP)
        waited = _wait_ended(ranks[0], TIMEOUT + 10)
        print(f"rank 0 of curate run ended {waited} s after rank 1 was stopped (timeout_s={TIMEOUT})")
        log = (tmp_path / "torchrun.log").read_text()
        assert waited is not None, f"rank 0 still runs {TIMEOUT + 10} s after rank 1 stopped:\n{log[-3000:]}"
        errors = [line for line in log.splitlines() if line.startswith("curate run: error:")]
        assert errors, log[-3000:]  # rank 0 ended with curate's one-line error, not killed by torchrun
        error = errors[0]
        assert "rank(s) [1]" in error and f"{TIMEOUT:g} s" in error and "distributed.timeout_s" in error, error
    finally:
        _finish(job, ranks[1])
    assert job.returncode != 0


# ---------------------------------------------------------------- a stalled S3 endpoint


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def stalled_s3():
    """A moto server process with bucket `stalled` holding `there.bin`, then stopped (SIGSTOP): storage options."""
    pytest.importorskip("moto")
    import boto3

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = {"key": "test", "secret": "test",
               "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}}
    try:
        client = boto3.client("s3", aws_access_key_id="test", aws_secret_access_key="test",
                              **options["client_kwargs"])
        for _ in range(100):
            try:
                client.create_bucket(Bucket="stalled")
                break
            except Exception:  # not listening yet
                time.sleep(0.1)
        client.put_object(Bucket="stalled", Key="there.bin", Body=b"x")
        server.send_signal(signal.SIGSTOP)
        yield options
    finally:
        server.send_signal(signal.SIGCONT)
        server.kill()
        server.wait()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_stalled_s3_endpoint_fails_a_write_and_a_read_within_90_s_naming_the_endpoint(stalled_s3):
    from curate import files

    endpoint = stalled_s3["client_kwargs"]["endpoint_url"]
    start = time.monotonic()
    with pytest.raises(files.StorageTimeoutError) as write:
        with files.atomic_write("s3://stalled/new.bin", storage_options=stalled_s3) as stream:
            stream.write(b"payload")
    wrote = time.monotonic() - start
    start = time.monotonic()
    with pytest.raises(files.StorageTimeoutError) as read:
        files.read_bytes("s3://stalled/there.bin", storage_options=stalled_s3)
    read_s = time.monotonic() - start
    print(f"stalled S3: write failed after {wrote:.1f} s, read after {read_s:.1f} s")
    for error, seconds in ((write, wrote), (read, read_s)):
        assert seconds < 90, f"took {seconds:.0f} s: {error.value}"
        message = str(error.value)
        assert endpoint in message and "did not answer" in message and "storage_options" in message, message


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_s3_timeouts_are_configurable_through_storage_options(stalled_s3):
    from curate import files

    options = {**stalled_s3, "config_kwargs": {"read_timeout": 2, "retries": {"total_max_attempts": 1}}}
    # botocore's 2 s read timeout, or, on a loaded machine, the call's overall limit derived from it first
    # (1 attempt × (5 s connect + 2 s read) + 2 s backoff): either way the timeouts given here, not the defaults
    given = r"did not answer within (2 s \(1 attempts\)|9 s)"
    start = time.monotonic()
    with pytest.raises(files.StorageTimeoutError, match=given):
        files.read_bytes("s3://stalled/there.bin", storage_options=options)
    assert time.monotonic() - start < 15
    # the jobs' shard lists and shard reads go through the same limits (they used plain fsspec.open: ~200 s)
    from pipelines import data

    start = time.monotonic()
    with pytest.raises(files.StorageTimeoutError, match=given):
        data.shard_urls("s3://stalled", "digits", "train", storage_options=options)
    with pytest.raises(files.StorageTimeoutError, match=given):
        list(data.load_digits(["s3://stalled/there.bin"], storage_options=options))
    assert time.monotonic() - start < 30


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_stalled_s3_endpoint_fails_a_polars_scan_of_a_cache_within_90_s(stalled_s3):
    from curate.cache import scan

    start = time.monotonic()
    with pytest.raises(Exception, match="(?i)timed? ?out|deadline"):  # Polars' object store: 20 s per request
        scan("s3://stalled/cache", storage_options=stalled_s3).collect()
    assert time.monotonic() - start < 90
