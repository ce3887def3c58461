import hashlib

from filtering import provenance
from filtering.io.paths import file_info


def _inputs(paths):
    return [{"path": str(p), **file_info(str(p))} for p in paths]


def test_small_local_inputs_get_full_sha256(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"x" * 1000)
    records, method = provenance.checksum_inputs(_inputs([p]))
    assert method == "sha256"
    assert records[0]["sha256"] == hashlib.sha256(b"x" * 1000).hexdigest()
    assert records[0]["size"] == 1000


def test_large_local_inputs_get_a_head_tail_fingerprint_that_sees_edits(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "FULL_HASH_LIMIT", 0)
    block = provenance.HEAD_TAIL_BYTES
    data = bytearray(b"a" * (3 * block))
    p = tmp_path / "big.bin"
    p.write_bytes(data)
    records, method = provenance.checksum_inputs(_inputs([p]))
    assert method.startswith("sha256_head_tail") and "sha256" not in records[0]
    first = records[0]["sha256_head_tail"]
    expected = hashlib.sha256(len(data).to_bytes(8, "big") + data[:block] + data[-block:]).hexdigest()
    assert first == expected
    data[-1:] = b"b"  # an edit in the tail (a Parquet footer, an npz directory)
    p.write_bytes(data)
    assert provenance.checksum_inputs(_inputs([p]))[0][0]["sha256_head_tail"] != first
    p.write_bytes(data[:-1])  # truncation changes the size
    assert provenance.checksum_inputs(_inputs([p]))[0][0]["sha256_head_tail"] != first


def test_remote_inputs_keep_size_and_mtime():
    records, method = provenance.checksum_inputs([{"path": "s3://bucket/00000.tar", "size": 5, "mtime": "t"}])
    assert method == "size+mtime" and records == [{"path": "s3://bucket/00000.tar", "size": 5, "mtime": "t"}]
