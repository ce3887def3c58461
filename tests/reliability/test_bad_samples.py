"""Finding 1: one bad sample must not abort the run; it fails alone, or loses one field."""

from __future__ import annotations

import json
import tarfile

from tests.reliability.hostile import (
    accounted,
    bundled_members,
    failures,
    meta_of,
    present,
    rows,
    run_pool,
    strip_end,
    tar_bytes,
    with_json,
)


def test_json_nested_too_deep_fails_that_sample_only(tmp_path):
    members = with_json(bundled_members(3), "000000001", b"[" * 100_000 + b"]" * 100_000)
    shard = tmp_path / "deep.tar"
    shard.write_bytes(tar_bytes(members))
    code, err, manifest, out = run_pool(tmp_path, [shard])
    assert code == 0, err
    assert accounted(manifest) and manifest["counts"]["input"] == 3
    assert failures(out)["000000001"] == "bad_json: nested too deep"
    assert {k for _, k in present(out)} == {"000000000", "000000002"}


def test_sizes_that_do_not_fit_are_left_empty_and_counted(tmp_path):
    members = bundled_members(3)
    big = {**meta_of(members, "000000001"), "original_width": 3_000_000_000, "original_height": -(2**40)}
    rest = {k: v for k, v in meta_of(members, "000000002").items() if k != "original_width"}
    inf = b'{"original_width": 1e400, ' + json.dumps(rest).encode()[1:]  # json.dumps cannot write it
    members = with_json(with_json(members, "000000001", json.dumps(big).encode()), "000000002", inf)
    shard = tmp_path / "sizes.tar"
    shard.write_bytes(tar_bytes(members))
    code, err, manifest, out = run_pool(tmp_path, [shard], dropped=True)
    assert code == 0, err
    assert accounted(manifest) and manifest["counts"]["failed"] == 0
    assert manifest["stages"]["score"]["field_warnings"] == {"original_height": 1, "original_width": 2}
    assert "warning: 3 unusable .json fields left empty" in err
    assert len(present(out)) == 3
    kept = {r["key"]: r for r in rows(out, "subset")}
    for key in set(kept) & {"000000001", "000000002"}:
        assert kept[key]["original_width"] is None
    if "000000000" in kept:  # the untouched sample keeps its field
        assert kept["000000000"]["original_width"] == meta_of(bundled_members(1), "000000000")["original_width"]


def test_a_header_claiming_a_terabyte_is_a_shard_failure_that_keeps_the_samples_before(tmp_path):
    info = tarfile.TarInfo("000000003.jpg")
    info.size = 1 << 40
    shard = tmp_path / "claim.tar"
    shard.write_bytes(strip_end(tar_bytes(bundled_members(3))) + info.tobuf(tarfile.GNU_FORMAT) + b"\xff\xd8" * 600)
    code, err, manifest, out = run_pool(tmp_path, [shard])
    assert code == 0, err
    assert accounted(manifest)
    assert {k for _, k in present(out)} == {"000000000", "000000001", "000000002"}
    assert failures(out)["__shard__"] == "unreadable_shard: TarError: unexpected end of data"


def test_an_exception_without_a_message_is_reported_not_raised(tmp_path, monkeypatch):
    import filtering.io.reader as reader

    def no_memory(f):
        yield from ()
        raise MemoryError()

    monkeypatch.setattr(reader, "tar_members", no_memory)
    shard = tmp_path / "s.tar"
    shard.write_bytes(tar_bytes(bundled_members(1)))
    result = reader.ShardReadResult(str(shard))
    assert list(reader.iter_shard(str(shard), result)) == []
    assert result.error == "unreadable_shard: MemoryError"
