"""poolsift's tar reading gives webdataset's samples, on tars of every format Python writes."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from filtering.io.reader import ShardReadResult, _iter_shard_webdataset, iter_shard

MEMBERS = [
    ("000001.jpg", b"\xff\xd8" + bytes(range(256)) * 3),
    ("000001.txt", b"a dog on the beach"),
    ("000001.json", b'{"uid": "x"}'),
    ("000002.JPG", b""),  # upper-case extension, empty file
    ("000002.TXT", b"x" * 512),  # exactly one block
    ("dir.with.dots/000003.seg.json", b"{}"),  # dots in the folder, two-part extension
    ("dir.with.dots/000003.png", b"\x89PNG" * 100),
    ("__meta__", b"skipped"),
    ("__key__/thing.txt", b"skipped too"),
    ("noextension", b"grouped nowhere"),
    ("d" * 120 + "/000004.jpg", b"long name"),  # needs a GNU long name or pax path
    ("ünïcödé/000005.txt", "ünïcödé".encode()),
    ("p" * 150 + "/" + "q" * 90 + ".txt", b"fits ustar's prefix field"),
    ("000006.txt", b"y" * 1537),
]


def _tar(fmt: int, members=MEMBERS, extras: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        if extras:
            d = tarfile.TarInfo("somedir")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
        for name, data in members:
            if fmt == tarfile.USTAR_FORMAT and len(name.encode()) > 255:
                continue  # ustar cannot store it at all
            if fmt != tarfile.PAX_FORMAT and not name.isascii():
                continue
            if fmt == tarfile.USTAR_FORMAT and len(name) > 100 and "/" not in name[-101:]:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if extras:
            link = tarfile.TarInfo("000006.lnk")
            link.type, link.linkname = tarfile.SYMTYPE, "000006.txt"
            tf.addfile(link)
    return buf.getvalue()


def _read(path):
    result = ShardReadResult(str(path))
    samples = [(s.key, s.members) for s in iter_shard(str(path), result)]
    return samples, result


def _reference(path):
    """webdataset's own samples (its tar iterator and ``group_by_keys``), up to its first error."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    out = []
    try:
        with open(path, "rb") as f:
            files = ({**item, "__url__": str(path)} for item in tar_file_iterator(f))
            for s in group_by_keys(files):
                key = s.pop("__key__")
                s.pop("__url__", None)
                s.pop("__local_path__", None)
                out.append((key, s))
    except Exception:  # noqa: BLE001
        pass
    return out


@pytest.mark.parametrize(
    "fmt", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "ustar", "pax"]
)
def test_samples_equal_webdatasets(tmp_path, fmt):
    path = tmp_path / "s.tar"
    path.write_bytes(_tar(fmt))
    samples, result = _read(path)
    assert result.error is None and result.samples_read == len(samples)
    assert samples == _reference(path)
    keys = [k for k, _ in samples]
    assert "000002" in keys and set(dict(samples)["000002"]) == {"jpg", "txt"}
    assert len(samples) >= 6


def test_compressed_and_global_pax_tars_are_read_by_webdatasets_iterator(tmp_path):
    gz = tmp_path / "s.tar.gz"
    gz.write_bytes(gzip.compress(_tar(tarfile.PAX_FORMAT)))
    samples, result = _read(gz)
    assert result.error is None and samples == _reference(gz) and len(samples) >= 6

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as tf:
        for name, data in MEMBERS[:6]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    glob_pax = tmp_path / "g.tar"
    glob_pax.write_bytes(buf.getvalue())
    samples, result = _read(glob_pax)
    assert result.error is None and samples == _reference(glob_pax) and len(samples) == 3


def test_damage_is_reported_with_the_samples_before_it(tmp_path):
    data = _tar(tarfile.GNU_FORMAT, MEMBERS[:5], extras=False)
    cut = tmp_path / "cut.tar"
    # blocks: 000001.jpg header + 2 data, .txt 1 + 1, .json 1 + 1, 000002.JPG 1, 000002.TXT 1 + 1
    cut.write_bytes(data[: 512 * 9 + 100])  # inside 000002.TXT's data
    samples, result = _read(cut)
    assert result.error == "unreadable_shard: TarError: unexpected end of data"
    assert [k for k, _ in samples] == ["000001"] == [k for k, _ in _reference(cut)]  # webdataset stops there too

    bad = bytearray(data)
    bad[512 * 5 + 10] ^= 0xFF  # a byte of 000001.json's header: its checksum fails
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    samples, result = _read(tmp_path / "bad.tar")
    assert result.error == "unreadable_shard: TarError: bad checksum"

    (tmp_path / "empty.tar").write_bytes(b"")
    assert _read(tmp_path / "empty.tar")[1].error == "unreadable_shard: TarError: empty file"


def test_duplicate_member_fails_its_sample_where_webdataset_drops_the_shard(tmp_path):
    members = [("a.txt", b"1"), ("a.txt", b"2"), ("b.txt", b"3")]
    for fmt in (tarfile.GNU_FORMAT, "gz"):
        path = tmp_path / f"dup{fmt}.tar"
        data = _tar(tarfile.GNU_FORMAT, members, extras=False)
        path.write_bytes(gzip.compress(data) if fmt == "gz" else data)  # the fast reader and the fallback
        result = ShardReadResult(str(path))
        samples = [(s.key, s.members, s.error) for s in iter_shard(str(path), result)]
        assert result.error is None
        assert samples == [
            ("a", {"txt": b"1"}, "duplicate_member: a.txt appears twice in one sample"),
            ("b", {"txt": b"3"}, None),
        ]
    assert _reference(path) == []  # webdataset raises at the duplicate


def test_the_fallback_reader_gives_the_fast_readers_samples(tmp_path):
    path = tmp_path / "s.tar"
    path.write_bytes(_tar(tarfile.PAX_FORMAT))
    assert [(s.key, s.members) for s in _iter_shard_webdataset(str(path))] == _read(path)[0]
