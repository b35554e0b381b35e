"""curate.files: a file appears whole or not at all, locally and on a real S3 server (moto on 127.0.0.1)."""

import json
import os

import pytest

from curate.files import atomic_write, stale_temps, write_json

from .conftest import make_bucket


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path, "w") as stream:
            stream.write('{"v": 2, "half')
            raise RuntimeError("disk full")
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_the_file_appears_only_when_the_block_ends(tmp_path):
    path = tmp_path / "part.bin"
    with atomic_write(path) as stream:
        stream.write(b"x" * 10)
        assert not path.exists()
        (temp,) = stale_temps(path)  # what a writer killed now would leave: found by stale_temps
        assert os.path.basename(temp).startswith(".part.bin.") and temp.endswith(".tmp")
    assert path.read_bytes() == b"x" * 10 and stale_temps(path) == []


def test_missing_directories_are_an_error_unless_asked_for(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_json(tmp_path / "a" / "b.json", {})
    write_json(tmp_path / "a" / "b.json", {}, parents=True)
    assert json.loads((tmp_path / "a" / "b.json").read_text()) == {}
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_write(tmp_path / "x", "a"):
            pass


def test_remote_writes_are_one_put_and_nothing_on_failure(s3_server):
    fs = make_bucket(s3_server, "files")
    with atomic_write("s3://files/dir/a.txt", "w", storage_options=s3_server) as stream:
        stream.write("hello")
    assert fs.cat("files/dir/a.txt") == b"hello"
    with pytest.raises(RuntimeError):
        with atomic_write("s3://files/dir/b.txt", storage_options=s3_server) as stream:
            stream.write(b"half")
            raise RuntimeError("killed")
    fs.invalidate_cache()
    assert fs.ls("files/dir") == ["files/dir/a.txt"]
