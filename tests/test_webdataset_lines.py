"""curate on both webdataset lines. `open_clip_torch[training]` pins webdataset<=0.2.86, so an install with the
open_clip extra (CI's dev install among them) gets 0.2.86, and one without it gets 1.x. This installs the line the
environment does not have beside it (pip --target, no dependencies: from the package index, as CI's own install)
and runs the tests that call webdataset's API with that line first on the path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

wds = pytest.importorskip("webdataset")

ROOT = Path(__file__).resolve().parent.parent
OTHER = "webdataset>=1.0,<2" if wds.__version__.startswith("0.") else "webdataset==0.2.86"
TESTS = [
    "tests/test_pipeline.py::test_consumes_webdataset_shards",
    "tests/test_distributed.py::test_sources_that_split_by_node_themselves_are_recognised",
    "tests/test_resume.py::test_re_iterable_sources_are_never_refused",
    "tests/test_data.py::test_jpeg_tar_and_parquet_exports_hold_the_npy_datasets_samples",
    "tests/test_own_data.py::test_open_clip_vit_on_jpeg_webdataset_shards_every_job",
    "tests/test_own_data.py::test_a_corrupt_sample_fails_naming_shard_and_key_or_is_skipped_and_counted",
    "tests/test_distributed.py::test_sources_split_by_node_already_are_not_split_again_under_torchrun",
]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_webdataset_tests_pass_on_the_other_webdataset_line(tmp_path):
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), OTHER],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    version = subprocess.run([sys.executable, "-c", "import webdataset; print(webdataset.__version__)"], env=env,
                             capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert version != wds.__version__ and (version.startswith("0.") != wds.__version__.startswith("0.")), version
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=840)
    assert proc.returncode == 0, f"webdataset {version}:\n{proc.stdout[-4000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout and "deselected" not in proc.stdout
