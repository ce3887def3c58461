import pytest

from filtering.errors import InputError
from filtering.io.paths import expand_shards, shard_id


@pytest.fixture
def shards(tmp_path):
    for i in range(4):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    return tmp_path


def test_brace_glob_directory_and_list(shards):
    names = [f"{shards}/{i:05d}.tar" for i in range(4)]
    assert expand_shards(f"{shards}/{{00000..00003}}.tar") == names
    assert expand_shards(f"{shards}/*.tar") == names
    assert expand_shards(str(shards)) == names
    assert expand_shards([names[2], names[0], names[2]]) == [names[0], names[2]]


def test_missing_input_names_the_pattern(shards):
    with pytest.raises(InputError, match=r"input.shards: no shards found at .*00004.tar"):
        expand_shards(f"{shards}/{{00000..00009}}.tar")


def test_shard_ids_differ_for_same_name_in_different_folders(tmp_path):
    assert shard_id("/a/00000.tar") != shard_id("/b/00000.tar")
    assert shard_id("/a/00000.tar").startswith("00000-")
