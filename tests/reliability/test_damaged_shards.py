"""Finding 2: damage loses only what is after it; a repeated member fails one sample."""

from __future__ import annotations

import io
import tarfile

from filtering.io.reader import ShardReadResult, iter_shard
from tests.reliability.hostile import accounted, bundled_members, failures, present, run_pool, tar_bytes


def _layout(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getmembers()


def _keys(path) -> tuple[list[str], str | None]:
    result = ShardReadResult(str(path))
    return [s.key for s in iter_shard(str(path), result)], result.error


def test_a_cut_in_the_next_samples_first_member_keeps_the_complete_sample_before(tmp_path):
    data = tar_bytes(bundled_members(3))
    m = _layout(data)
    cases = {
        "in_data.tar": data[: m[3].offset_data + 100],  # inside 000000001.jpg's bytes
        "in_header.tar": data[: m[6].offset + 300],  # inside 000000002.jpg's header
        "mid_sample.tar": data[: m[7].offset_data + 5],  # inside 000000002.txt: 000000002 is incomplete
    }
    expect = {
        "in_data.tar": ["000000000"],
        "in_header.tar": ["000000000", "000000001"],
        "mid_sample.tar": ["000000000", "000000001"],
    }
    for name, cut in cases.items():
        (tmp_path / name).write_bytes(cut)
        keys, error = _keys(tmp_path / name)
        assert keys == expect[name], name
        assert error == "unreadable_shard: TarError: unexpected end of data"


def test_a_bad_checksum_keeps_the_complete_samples_before(tmp_path):
    data = bytearray(tar_bytes(bundled_members(3)))
    m = _layout(bytes(data))
    data[m[6].offset + 3] ^= 0x40  # 000000002.jpg's header: its name, and so its checksum
    shard = tmp_path / "bad.tar"
    shard.write_bytes(bytes(data))
    assert _keys(shard) == (["000000000", "000000001"], "unreadable_shard: TarError: bad checksum")
    data = bytearray(tar_bytes(bundled_members(3)))
    data[m[3].offset + 130] ^= 0x01  # 000000001.jpg's size field: the first sample is complete
    shard.write_bytes(bytes(data))
    assert _keys(shard) == (["000000000"], "unreadable_shard: TarError: bad checksum")
    data = bytearray(tar_bytes(bundled_members(3)))
    data[m[5].offset + 130] ^= 0x01  # 000000001.json's: 000000001 has fewer members than 000000000
    shard.write_bytes(bytes(data))
    assert _keys(shard) == (["000000000"], "unreadable_shard: TarError: bad checksum")


def test_a_repeated_member_fails_its_sample_and_the_rest_of_the_shard_is_read(tmp_path):
    members = bundled_members(4)
    dup = members[:4] + [members[3]] + members[4:]  # 000000001.jpg twice
    shard = tmp_path / "dup.tar"
    shard.write_bytes(tar_bytes(dup))
    code, err, manifest, out = run_pool(tmp_path, [shard])
    assert code == 0, err
    assert accounted(manifest) and manifest["counts"]["input"] == 4
    assert failures(out) == {"000000001": "duplicate_member: 000000001.jpg appears twice in one sample"}
    assert {k for _, k in present(out)} == {"000000000", "000000002", "000000003"}
