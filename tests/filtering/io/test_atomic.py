import os

import pytest

from filtering.io.atomic import atomic_open, atomic_write_bytes


def test_file_appears_only_when_complete(tmp_path):
    target = tmp_path / "out" / "x.bin"
    with pytest.raises(RuntimeError), atomic_open(str(target)) as f:
        f.write(b"half")
        assert not target.exists()  # nothing under the real name while writing
        raise RuntimeError("killed mid-write")
    assert not target.exists()
    assert os.listdir(target.parent) == []  # the temporary file is cleaned up


def test_replace_is_all_or_nothing(tmp_path):
    target = tmp_path / "x.bin"
    atomic_write_bytes(str(target), b"old")
    with pytest.raises(RuntimeError), atomic_open(str(target)) as f:
        f.write(b"new but unfinished")
        raise RuntimeError
    assert target.read_bytes() == b"old"
    atomic_write_bytes(str(target), b"new")
    assert target.read_bytes() == b"new"


def test_fsspec_memory_url():
    url = "memory://poolsift-test/dir/x.bin"
    atomic_write_bytes(url, b"abc")
    import fsspec

    with fsspec.open(url, "rb") as f:
        assert f.read() == b"abc"
    fs = fsspec.filesystem("memory")
    assert [p for p in fs.ls("/poolsift-test/dir", detail=False)] == ["/poolsift-test/dir/x.bin"]
